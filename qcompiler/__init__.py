"""qcompiler: a compiler for quantized neural networks."""
from . import ops  # noqa: F401  (registers the qc:: custom ops)
from .errors import QCError
from .frontends.torch import trace
from .ir import Graph, TensorSpec, verify
from .pipeline import EXACT, NUMERICS, TOLERANT, Pass, PassContext, PassManager, PassResult, Rule, RuleSet, register
from .qspec import QuantSpec

__version__ = "0.1.0"
__all__ = ["QCError", "trace", "Graph", "TensorSpec", "verify", "Pass", "PassContext", "PassManager",
           "PassResult", "Rule", "RuleSet", "register", "QuantSpec", "EXACT", "TOLERANT", "NUMERICS"]
