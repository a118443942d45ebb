"""TVM backends: the integer-only graph compiled by apache-tvm into one shared library.

Targets:
  tvm-llvm[:MCPU]   CPU code for MCPU (default: this machine's CPU, e.g. "skylake-avx512"; "x86-64" is portable)
  tvm-cuda[:ARCH]   CUDA code for ARCH (default sm_90), machine code built with nvcc, no GPU needed to build

The artifact is model.so plus the TVM runtime library it links against (vendored, so a
machine without TVM's 300 MB compiler runs it with `pip install apache-tvm-ffi numpy`):
backends/tvm/runtime.py loads it with tvm_ffi and ctypes only. Building needs apache-tvm
(`pip install qcompiler[tvm]`), and `nvcc` for tvm-cuda.

Translation (translate.py) reproduces each qc:: op's reference kernel bit for bit; the
schedules (pipeline.py) change only the loop order, never the arithmetic.
"""
from __future__ import annotations

from qcompiler.errors import QCError

# loaded in this order; libcudart.so.13 is the CUDA runtime apache-tvm 0.27's CUDA library links against
RUNTIME_LIBS = {"llvm": ("libtvm_runtime.so",), "cuda": ("libcudart.so.13", "libtvm_runtime.so", "libtvm_runtime_cuda.so")}
KERNEL_LIB = "libqc_kernels_cuda.so"  # qcompiler's own CUDA kernels (cuda_kernels.py), when the graph calls them
DEFAULT_ARCH = "sm_90"


class Backend:
    """One TVM target. emit() needs apache-tvm; load() needs only apache-tvm-ffi."""

    INTEGER = True
    INTEGER_ONLY = True  # a float graph is lowered to integer first (the compiler sets Config.integer)
    RUNTIME = "tvm"

    def __init__(self, kind: str, option: str | None = None):
        if kind not in RUNTIME_LIBS:
            raise QCError(f"unknown TVM target kind '{kind}'")
        self.kind = kind
        self.option = option or (DEFAULT_ARCH if kind == "cuda" else None)

    @property
    def name(self) -> str:
        return f"tvm-{self.kind}" + (f":{self.option}" if self.option else "")

    def emit(self, graph) -> dict[str, bytes]:
        from .build import build
        return build(graph, self.kind, self.option)

    def load(self, artifact_dir: str, manifest: dict):
        from .runtime import Runner
        return Runner(artifact_dir, manifest)


def backend(name: str) -> Backend:
    """'tvm-llvm', 'tvm-llvm:x86-64', 'tvm-cuda', 'tvm-cuda:sm_80', ..."""
    base, _, option = name.partition(":")
    return Backend(base.removeprefix("tvm-"), option or None)
