"""Run a TVM artifact with the TVM runtime only: tvm_ffi and ctypes, never `import tvm`.

Deploy footprint: model.so, the vendored runtime libraries the artifact carries
(libtvm_runtime.so, 3.4 MB; for CUDA also libtvm_runtime_cuda.so, 0.45 MB, the CUDA runtime
libcudart.so.13, 0.7 MB, and qcompiler's kernel library when the graph calls it), numpy and
the apache-tvm-ffi wheel (`pip install qcompiler[runtime]`, or the wheel alone). CUDA also
needs the machine's CUDA driver.
"""
from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

from qcompiler.errors import QCError

KDL_CPU, KDL_CUDA = 1, 2
POOLED = 2
_loaded: dict[str, ctypes.CDLL] = {}


def _installed_tvm_lib_dir(version: str | None) -> str | None:
    """The lib/ folder of an installed apache-tvm of the artifact's version, found without importing it."""
    try:
        from importlib import metadata, util
        if version is None or metadata.version("apache-tvm") != version:
            return None
        spec = util.find_spec("tvm")
        return os.path.join(list(spec.submodule_search_locations)[0], "lib") if spec else None
    except (ImportError, ValueError, metadata.PackageNotFoundError):
        return None


def load_runtime(artifact_dir: str, libs: tuple[str, ...], tvm_version: str | None = None) -> None:
    """dlopen the TVM runtime libraries (RTLD_GLOBAL, once per process) so model.so links.

    One process must hold one copy of the runtime: where apache-tvm is imported already, its
    libraries are the runtime; where the artifact's version of it is installed, its files are
    loaded (so a later `import tvm` finds them loaded); otherwise the artifact's vendored copy."""
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    try:
        import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which the runtime needs)
    except ImportError:
        raise QCError("running a TVM artifact needs apache-tvm-ffi (pip install 'qcompiler[runtime]')") from None
    if "tvm" in sys.modules:
        return
    dirs = [d for d in (_installed_tvm_lib_dir(tvm_version), artifact_dir) if d]
    for lib in libs:
        if lib in _loaded:
            continue
        for d in dirs:
            path = os.path.join(d, lib)
            if os.path.isfile(path):
                try:
                    _loaded[lib] = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError as e:
                    raise QCError(f"cannot load the TVM runtime library {path}: {e}") from None
                break
        else:
            raise QCError(f"{artifact_dir}: the TVM runtime library {lib} is neither in the artifact nor in an "
                          f"installed apache-tvm {tvm_version or ''}")


def physical_cores() -> int:
    """The physical cores this process may run on: its CPU affinity with SMT siblings counted
    once (from /sys topology), else the CPUs it may use."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/core_id") as f1, \
                    open(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id") as f2:
                cores.add((f2.read().strip(), f1.read().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def configure_threads() -> None:
    """Give the TVM runtime's thread pool one thread per physical core, unless TVM_NUM_THREADS
    is set (TVM 0.27 reads only that; OMP_NUM_THREADS measured no effect). Left alone, it takes
    half of std::thread::hardware_concurrency() on x86-64 to skip hyper-threads, whether or not
    the CPUs are siblings: on a 2-core VM without SMT every kernel ran on one core. Read when
    the pool starts, at the first parallel kernel of the process."""
    if "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())


_amx: bool | None = None


def request_amx_permission() -> bool:
    """Ask Linux for the AMX tile state for this process (arch_prctl ARCH_REQ_XCOMP_PERM
    XFEATURE_XTILEDATA; once): the AMX kernels of tvm-llvm artifacts (amx.py) need it before
    their first tile instruction. Whether it was granted (False on CPUs without AMX)."""
    global _amx
    if _amx is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _amx = libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
        except (OSError, AttributeError):
            _amx = False
    return _amx


def _check_int8_kernels(artifact_dir: str) -> None:
    """An artifact whose linears run on AMX tiles (build.json's int8_dot) needs the tile state:
    requested here, and a clear error where it is refused (a CPU without AMX, or a sandbox that
    blocks arch_prctl) instead of the illegal-instruction signal of the first tile load."""
    import json
    path = os.path.join(artifact_dir, "build.json")
    if not os.path.isfile(path):  # artifacts from before build.json: ask anyway (a no-op without AMX)
        request_amx_permission()
        return
    with open(path) as f:
        facts = json.load(f)
    if facts.get("int8_dot") == "amx" and not request_amx_permission():
        raise QCError(f"{artifact_dir}: its int8 linears run on AMX tiles ({facts.get('target', '?')}), which this "
                      "process may not use (a CPU without AMX-INT8, or arch_prctl refused); rebuild it for this "
                      "machine (--target tvm-llvm) or for a CPU without AMX (e.g. --target tvm-llvm:icelake-server)")


def aligned_copy(a: np.ndarray, align: int = 64) -> np.ndarray:
    """A C-contiguous copy of `a` whose data pointer is `align`-byte aligned (DLPack import needs it)."""
    a = np.asarray(a)
    buf = np.empty(a.nbytes + align, np.uint8)
    off = (-buf.ctypes.data) % align
    out = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


class Runner:
    """The VM of model.so on the device its target names (cpu:0, or cuda:0 with the host cpu)."""

    def __init__(self, artifact_dir: str, manifest: dict):
        from . import KERNEL_LIB, RUNTIME_LIBS
        self.kind = "cuda" if manifest["backend"].startswith("tvm-cuda") else "llvm"
        load_runtime(artifact_dir, RUNTIME_LIBS[self.kind], manifest.get("versions", {}).get("tvm"))
        kernels = os.path.join(artifact_dir, KERNEL_LIB)
        if os.path.isfile(kernels):  # registers the qc.cuda.* functions model.so calls
            try:
                _loaded.setdefault(kernels, ctypes.CDLL(kernels, mode=ctypes.RTLD_GLOBAL))
            except OSError as e:
                raise QCError(f"cannot load the kernel library {kernels}: {e}") from None
        if self.kind == "llvm":
            _check_int8_kernels(artifact_dir)
            configure_threads()
        import tvm_ffi
        self.ffi = tvm_ffi
        path = os.path.join(artifact_dir, "model.so")
        try:
            self.lib = tvm_ffi.load_module(path)
            self.vm = self.lib["vm_load_executable"]()
            if self.kind == "cuda":
                self.vm["vm_initialization"](KDL_CUDA, 0, POOLED, KDL_CPU, 0, POOLED)
            else:
                self.vm["vm_initialization"](KDL_CPU, 0, POOLED)
        except Exception as e:  # a driver or ABI problem: say which file
            raise QCError(f"{path}: cannot start the TVM VM ({type(e).__name__}: {str(e).splitlines()[0][:300]})") \
                from None
        self.fn = self.vm["main"]
        self.input_names = [d["name"] for d in manifest["inputs"]]
        self.output_names = [d["name"] for d in manifest["outputs"]]
        self.device = tvm_ffi.device("cuda" if self.kind == "cuda" else "cpu", 0)
        if self.kind == "cuda":
            self._alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
            self._from_bytes = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromBytes")
            self._to_bytes = tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")

    def to_device(self, a: np.ndarray):
        a = np.ascontiguousarray(a)
        if self.kind != "cuda":
            return self.ffi.from_dlpack(aligned_copy(a))
        t = self._alloc(self.ffi.Shape(list(a.shape)), self.ffi.dtype(str(a.dtype)), self.device, None)
        self._from_bytes(t, a.ctypes.data_as(ctypes.c_void_p), a.nbytes)
        return t

    def to_host(self, t) -> np.ndarray:
        if self.kind != "cuda":
            return np.from_dlpack(t).copy()
        out = np.empty(tuple(t.shape), dtype=str(t.dtype))
        self._to_bytes(t, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
        return out

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [self.to_device(feeds[n]) for n in self.input_names]
        try:
            out = self.fn(*args)
        except Exception as e:
            raise QCError(f"the TVM artifact failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        return {n: self.to_host(o) for n, o in zip(self.output_names, out)}
