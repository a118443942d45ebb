"""Build an integer graph into model.so with apache-tvm (llvm in process; cuda in a child
process, which needs nvcc and, on a machine without a GPU, a stub libcuda.so.1 so TVM's
CUDA module loads and compiles kernels to machine code instead of storing source).

    python -m qcompiler.backends.tvm.build GRAPH.json GRAPH.bin KIND OPTION OUT.so FACTS.json
is the child's command line (the graph in qcompiler.graph_io form; FACTS.json receives the
build facts, among them the qcompiler kernels the module calls).
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
        from .runtime import request_amx_permission
        if codegen.target_has_features("amx-int8", target) and request_amx_permission():
            return "amx"  # linears on AMX tiles (amx.py), the rest on VNNI
        return "vnni"
    if target.kind.name == "llvm" and codegen.target_has_features("avx2", target):
        return "avx2"  # vnni.py's kernel with vpmaddwd in place of vpdpbusd
    if target.kind.name == "cuda":
        from .cuda_kernels import supported_arch
        if supported_arch(str(target.attrs.get("arch", ""))):
            return "sm90"
    return None


# nvcc flags for TVM's CUDA kernels: IEEE float32 division and sqrt, no flush-to-zero, no FMA
# contraction, so the float ops at the graph's edges (quantize's x / s, dequantize) compute what
# the reference kernels compute. TVM 0.27 compiles with --use_fast_math by default, whose
# approximate division moved DeiT-S's input quantization by a level here and there.
CUDA_EXACT_FLOAT = ["--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false"]


def _exact_float_cuda_compile():
    """Replace TVM's CUDA compile callback with nvcc without fast math (CUDA_EXACT_FLOAT)."""
    import tvm_ffi
    from tvm.support import nvcc
    os.environ["TVM_CUDA_NVCC_NO_FAST_MATH"] = "1"

    def _compile(code):
        return nvcc.compile_cuda(code, target_format="fatbin", compiler="nvcc", options=list(CUDA_EXACT_FLOAT))
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile, override=True)


def compile_so(graph, kind: str, option: str | None, out_path: str) -> dict:
    """Translate, compile and export; returns the build facts (the artifact's build.json)."""
    tvm = _tvm()
    from .pipeline import pipeline
    from .translate import to_relax
    target = target_for(kind, option)
    dot = int8_dot(target)
    mod = to_relax(graph, dot=dot, kind=kind)
    extern = sorted({str(c.args[0].global_symbol) for f in mod.functions.values() if isinstance(f, tvm.relax.Function)
                     for c in _calls(f) if isinstance(c.args[0], tvm.relax.ExternFunc)})
    if kind == "cuda" and tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        # without TVM's CUDA runtime module, tvm.compile would silently store CUDA source
        raise QCError("TVM's CUDA runtime module did not load (libcuda.so.1 missing): cannot emit machine code")
    if kind == "cuda":
        _exact_float_cuda_compile()
    with target:
        ex = tvm.compile(mod, target=target, relax_pipeline=pipeline(target))
        ex.export_library(out_path)
    return {"target": str(target.export() if hasattr(target, "export") else target), "tvm": tvm.__version__,
            "int8_dot": dot, "kernels": extern}


def _calls(f):
    """The relax.Call nodes of a Relax function, in order."""
    from tvm import relax
    out = []
    relax.analysis.post_order_visit(f, lambda e: out.append(e) if isinstance(e, relax.Call) else None)
    return out


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
    import json
    from . import KERNEL_LIB, RUNTIME_LIBS
    with tempfile.TemporaryDirectory(prefix="qc-tvm-") as d:
        so = os.path.join(d, "model.so")
        facts = os.path.join(d, "facts.json")
        if kind == "llvm":
            with open(facts, "w") as f:
                json.dump(compile_so(graph, kind, option, so), f)
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
            r = subprocess.run([sys.executable, "-m", "qcompiler.backends.tvm.build", gj, gb, kind, option or "", so, facts],
                               env=env, capture_output=True, text=True)
            if r.returncode:
                tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
                raise QCError("tvm-cuda build failed: " + " | ".join(tail)[:1500])
        with open(so, "rb") as f:
            files = {"model.so": f.read()}
        with open(facts, "rb") as f:
            files["build.json"] = f.read()  # the Runner checks that this machine can run the int8 kernels
        used = json.loads(files["build.json"])["kernels"]
    if any(k.startswith("qc.cuda.") for k in used):
        from .cuda_kernels import build_library
        with open(build_library(option or "sm_90"), "rb") as f:
            files[KERNEL_LIB] = f.read()
    for lib in RUNTIME_LIBS[kind]:
        with open(_runtime_lib_path(lib), "rb") as f:
            files[lib] = f.read()
    return files


def _runtime_lib_path(lib: str) -> str:
    """Where a runtime library the artifact vendors is: TVM's wheel, or (libcudart) the CUDA toolkit."""
    if lib.startswith("libcudart"):
        homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
        nvcc = shutil.which("nvcc")
        if nvcc:
            homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        for h in filter(None, homes):
            for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
                p = os.path.join(h, sub, lib)
                if os.path.isfile(p):
                    return p
        raise QCError(f"tvm-cuda artifacts carry the CUDA runtime {lib}, which is not in the CUDA toolkit "
                      f"(set CUDA_HOME)")
    return os.path.join(_runtime_lib_dir(), lib)


def _main(argv):
    from qcompiler import graph_io, int_ops, ops  # noqa: F401  (the qc:: op library)
    gj, gb, kind, option, out, facts = argv
    with open(gj, "rb") as f, open(gb, "rb") as b:
        graph = graph_io.load(f.read(), b.read())
    import json
    with open(facts, "w") as f:
        json.dump(compile_so(graph, kind, option or None, out), f)


if __name__ == "__main__":
    try:
        _main(sys.argv[1:])
    except QCError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
