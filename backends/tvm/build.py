"""Build an integer graph into model.so with apache-tvm (llvm in process; cuda in a child
process, which needs nvcc and, on a machine without a GPU, a stub libcuda.so.1 so TVM's
CUDA module loads and compiles kernels to machine code instead of storing source).

    python -m qcompiler.backends.tvm.build GRAPH.json GRAPH.bin KIND OPTION OUT.so
is the child's command line (the graph in qcompiler.graph_io form).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile

from qcompiler.errors import QCError

STUB_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuLaunchKernelEx", "cuModuleGetFunction",
                "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled")


def _tvm():
    try:
        import tvm
    except ImportError:
        raise QCError("the tvm-* targets need apache-tvm to build (pip install 'qcompiler[tvm]')") from None
    return tvm


def target_for(kind: str, option: str | None):
    tvm = _tvm()
    from tvm.target import Target
    if kind == "llvm":
        mcpu = option or tvm.target.codegen.llvm_get_system_cpu()
        return Target({"kind": "llvm", "mcpu": mcpu, "num-cores": os.cpu_count() or 1})
    return Target({"kind": "cuda", "arch": option or "sm_90"}, host="llvm")


def int8_dot(target) -> str | None:
    """The int8 dot-product instruction the target has that the schedules use (None: plain code)."""
    from tvm.target import codegen
    if target.kind.name == "llvm" and codegen.target_has_features("avx512vnni", target):
        return "vnni"
    return None


def compile_so(graph, kind: str, option: str | None, out_path: str) -> dict:
    """Translate, compile and export; returns build facts for the manifest."""
    tvm = _tvm()
    from .pipeline import pipeline
    from .translate import to_relax
    target = target_for(kind, option)
    mod = to_relax(graph, dot=int8_dot(target))
    if kind == "cuda" and tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        # without TVM's CUDA runtime module, tvm.compile would silently store CUDA source
        raise QCError("TVM's CUDA runtime module did not load (libcuda.so.1 missing): cannot emit machine code")
    with target:
        ex = tvm.compile(mod, target=target, relax_pipeline=pipeline(target))
        ex.export_library(out_path)
    return {"target": str(target.export() if hasattr(target, "export") else target), "tvm": tvm.__version__}


def _runtime_lib_dir() -> str:
    return os.path.join(os.path.dirname(_tvm().__file__), "lib")


def _have_cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def _stub_libcuda(d: str) -> str:
    src, lib = os.path.join(d, "cuda_stub.c"), os.path.join(d, "libcuda.so.1")
    body = "\n".join(f"int {s}() {{ return 100; }}" for s in STUB_SYMBOLS)  # CUDA_ERROR_NO_DEVICE
    with open(src, "w") as f:
        f.write("/* build-time only: lets TVM's CUDA runtime module load on a machine without a GPU */\n" + body +
                '\nint cuGetErrorName(int e, const char** s) { *s = "CUDA_ERROR_NO_DEVICE (stub)"; return 0; }'
                '\nint cuGetErrorString(int e, const char** s) { *s = "no device (stub)"; return 0; }\n')
    r = subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", lib, src],
                       capture_output=True, text=True)
    if r.returncode:
        raise QCError(f"could not build the build-time libcuda stub: {r.stderr.strip()[:300]}")
    return d


def build(graph, kind: str, option: str | None) -> dict[str, bytes]:
    from . import RUNTIME_LIBS
    with tempfile.TemporaryDirectory(prefix="qc-tvm-") as d:
        so = os.path.join(d, "model.so")
        if kind == "llvm":
            compile_so(graph, kind, option, so)
        else:
            if shutil.which("nvcc") is None:
                raise QCError("tvm-cuda builds kernels with nvcc, which is not on PATH")
            from qcompiler import graph_io
            doc, blob = graph_io.dump(graph)
            gj, gb = os.path.join(d, "g.json"), os.path.join(d, "g.bin")
            with open(gj, "wb") as f:
                f.write(doc)
            with open(gb, "wb") as f:
                f.write(blob)
            env = dict(os.environ, TVM_CUDA_COMPILE_MODE="nvcc")
            if not _have_cuda_driver():
                os.makedirs(os.path.join(d, "stub"))
                env["LD_LIBRARY_PATH"] = _stub_libcuda(os.path.join(d, "stub")) + os.pathsep + env.get("LD_LIBRARY_PATH", "")
            r = subprocess.run([sys.executable, "-m", "qcompiler.backends.tvm.build", gj, gb, kind, option or "", so],
                               env=env, capture_output=True, text=True)
            if r.returncode:
                tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
                raise QCError("tvm-cuda build failed: " + " | ".join(tail)[:1500])
        with open(so, "rb") as f:
            files = {"model.so": f.read()}
    libdir = _runtime_lib_dir()
    for lib in RUNTIME_LIBS[kind]:
        with open(os.path.join(libdir, lib), "rb") as f:
            files[lib] = f.read()
    return files


def _main(argv):
    from qcompiler import graph_io, int_ops, ops  # noqa: F401  (the qc:: op library)
    gj, gb, kind, option, out = argv
    with open(gj, "rb") as f, open(gb, "rb") as b:
        graph = graph_io.load(f.read(), b.read())
    compile_so(graph, kind, option or None, out)


if __name__ == "__main__":
    try:
        _main(sys.argv[1:])
    except QCError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
