"""qcompiler: a compiler for quantized neural networks."""
__version__ = "0.1.0"

from . import int_ops, ops  # noqa: E402,F401  (register the qc:: custom ops)
from .compiler import compile, load, load_model  # noqa: E402
from .config import Config  # noqa: E402
from .errors import QCError  # noqa: E402
from .frontends.torch import trace  # noqa: E402
from .ir import Graph, TensorSpec, verify  # noqa: E402
from .pipeline import (EXACT, NUMERICS, TOLERANT, Pass, PassContext, PassManager, PassResult,  # noqa: E402
                       Rule, RuleSet, register)
from .qspec import QuantSpec  # noqa: E402

__all__ = ["compile", "load", "load_model", "trace", "Config", "QCError", "Graph", "TensorSpec", "verify",
           "Pass", "PassContext", "PassManager", "PassResult", "Rule", "RuleSet", "register", "QuantSpec",
           "EXACT", "TOLERANT", "NUMERICS"]
