"""qcompiler's own CUDA kernels (backends/tvm/kernels/*.cu), built with nvcc into one shared
library that a tvm-cuda artifact carries beside model.so.

Why our own: apache-tvm 0.27.0.post1's int8 tensor-core schedule (dlight
MatmulInt8Tensorization) segfaults and its wheel has no cuBLAS / CUTLASS offload, so TVM alone
emits int8 GEMMs as scalar int32 multiply-adds. The kernels here are CUTLASS 3 (headers from
the `nvidia-cutlass` wheel; TVM's vendored copy lacks the collective builders) TMA +
WGMMA GEMMs for sm_90a with qc::requant fused into the epilogue (gemm_s8_sm90.cuh; two
epilogues, general and `hi`, compiled side by side in gemm_s8_sm90.cu and gemm_s8_hi_sm90.cu).
Beside them: the fused attention block (int_attention.cu: mma.sync int8, see fuse_attention.py) and the row
and table kernels (int_rows.cu: LayerNorm with its add and requant, LUT, softmax). They register
themselves as tvm_ffi global functions (`qc.cuda.*`) when the library is loaded, and the Relax
graph calls them with `call_dps_packed`.

The library is cached per (sources, arch, nvcc) under $QC_CACHE (default ~/.cache/qcompiler), so
a model's build pays the compile (4 to 5 minutes on 2 cores, the sources side by side) once.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

from qcompiler.errors import QCError

LIB_NAME = "libqc_kernels_cuda.so"
SOURCES = ("gemm_s8_sm90.cu", "gemm_s8_hi_sm90.cu", "int_rows.cu", "int_attention.cu")
HEADERS = ("qc_int.cuh", "gemm_s8_sm90.cuh")  # included by the sources: part of the cache key
# tile configurations compiled into the library: name -> (tile M, tile N)
GEMM_TILES = {"128x128": (128, 128), "128x256": (128, 256), "256x128": (256, 128), "128x64": (128, 64),
              "pp64x128": (64, 128), "pp128x128": (128, 128), "pp128x64": (128, 64)}
GEMM_FUNC = "qc.cuda.gemm_s8_requant{out}_{hi}{tile}"
GEMM_OUTS = {"int8": "", "int16": "_i16"}  # output dtype -> name suffix
# the epilogue in int32 words (kernels/qc_int.cuh requant_hi), for calls whose every shift is 32..62
HI_SHIFTS = (32, 62)
# kernels/int_rows.cu: qc::int_softmax, qc::int_lut (+ the requant after it), qc::int_layer_norm
SOFTMAX_FUNC = "qc.cuda.int_softmax"
SOFTMAX_MASKED_FUNC = "qc.cuda.int_softmax_masked"
LUT_FUNC = "qc.cuda.int_lut"
LUT_REQUANT_FUNC = "qc.cuda.int_lut_requant"
LAYER_NORM_FUNC = "qc.cuda.int_layer_norm"
LAYER_NORM_REQUANT_FUNC = "qc.cuda.int_layer_norm_requant"
ADD_LAYER_NORM_FUNC = "qc.cuda.int_add_layer_norm"  # also writes the add's sum (a pre-LN residual)
ROW_FUNCS = (SOFTMAX_FUNC, SOFTMAX_MASKED_FUNC, LUT_FUNC, LUT_REQUANT_FUNC, LAYER_NORM_FUNC, LAYER_NORM_REQUANT_FUNC,
             ADD_LAYER_NORM_FUNC)
# row kernels with a `hi` variant (name + "_hi"): the same arithmetic in 32-bit words, for calls
# whose constants pass lut_hi_ok / ln_hi_ok (int_rows.cu lut_smem<.., Hi>, layer_norm_hi)
ROW_HI_FUNCS = (LUT_REQUANT_FUNC, LAYER_NORM_FUNC, LAYER_NORM_REQUANT_FUNC, ADD_LAYER_NORM_FUNC)
# Whether the translation picks the LUT's and the attention kernel's hi variants where their
# constants allow (bench/gpu.py's row checks, H100, all bit-exact: LUT + per-channel requant 15.1
# against 17.0 us at 4096 x 1536 and 34.2 against 42.3 at 12608 x 1536 (2026-12-07 22:30);
# attention, with its scores cached in shared memory, 34.7 against 62.9 us at MiniLM's shape,
# 67.6 against 74.4 at BERT-base's and 148.7 against 280.4 at DeiT-S's (2026-12-08 00:37)).
LUT_HI = True
ATTENTION_HI = True
# kernels/int_attention.cu: q k^T, requant, int_softmax, p v, requant(s) as one kernel
ATTENTION_FUNC = "qc.cuda.int_attention"
ATTENTION_MASKED_FUNC = "qc.cuda.int_attention_masked"


def attention_func(masked: bool, hi: bool = False) -> str:
    """The attention kernel's registered name; hi: attention_hi (fuse_attention.hi_ok)."""
    return (ATTENTION_MASKED_FUNC if masked else ATTENTION_FUNC) + ("_hi" if hi else "")


def gemm_func(tile: str, out_dtype: str = "int8", hi: bool = False) -> str:
    """The registered name of the GEMM + requant kernel for a tile, an output dtype and an epilogue
    (hi: every shift within HI_SHIFTS)."""
    return GEMM_FUNC.format(out=GEMM_OUTS[out_dtype], hi="hi_" if hi else "", tile=tile)


def row_func(name: str, hi: bool = False) -> str:
    """The registered name of a row kernel, its hi variant where asked (ROW_HI_FUNCS only)."""
    if hi and name not in ROW_HI_FUNCS:
        raise ValueError(f"{name} has no hi variant")
    return name + "_hi" if hi else name


def _shifts_hi(shift) -> bool:
    c = np.asarray(shift, np.int64).reshape(-1)
    return c.size > 0 and HI_SHIFTS[0] <= int(c.min()) and int(c.max()) <= HI_SHIFTS[1]


ZP_HI = 2**16  # zero points the hi kernels take: x - zp stays within int32 for int16 x
ADD_MULT_BITS_HI = 44  # layer_norm_hi's add: |x - zp| <= 2^17 times |mult| < 2^44, two of them, < 2^62


def scale_shift_up(mults: list, shift: int, limit_bits: int):
    """(mults * 2^s, shift + s) with s = 32 - shift for a shift below 32, the same rounding shift of
    the same products (rshift_round(p 2^s, c + s) == rshift_round(p, c)), so that a hi kernel takes
    it; None where a scaled multiplier would reach 2^limit_bits. Shifts of 32 and more unchanged."""
    if shift >= HI_SHIFTS[0]:
        return [np.asarray(m, np.int64) for m in mults], shift
    s = HI_SHIFTS[0] - shift
    if any(int(np.abs(np.asarray(m, np.int64)).max(initial=0)) >= 2 ** (limit_bits - s) for m in mults):
        return None
    return [np.asarray(m, np.int64) << s for m in mults], HI_SHIFTS[0]


def lut_hi_ok(in_zp: int, mult, shift, out_zp: int) -> bool:
    """Whether int_lut + requant may take int_rows.cu's hi path (qc_int::requant_hi on the table
    value, an int16): every shift 32..62, |mult| < 2^31, |in_zp|, |out_zp| <= 2^16."""
    m = np.asarray(mult, np.int64).reshape(-1)
    return _shifts_hi(shift) and int(np.abs(m).max()) < 2**31 and abs(in_zp) <= ZP_HI and abs(out_zp) <= ZP_HI


def ln_hi_ok(prm, gamma, channels: int, rq_mult=None, rq_shift=None) -> bool:
    """Whether int_layer_norm (prm in int_rows.cu's L_* layout, as translate.layer_norm_params
    writes it; rq_mult / rq_shift: its per-channel requant, None without one) may take
    int_rows.cu's layer_norm_hi: the add's, the LayerNorm's and the requant's shifts 32..62,
    sqrt_bits even and <= 16 (the normalisation's shift 40 - k/2 is then 32..40), zero points within
    2^16, gamma and the requant's multipliers within int32, the add's within 2^44, C a multiple of 8
    up to 1024 (|C x'| < 2^28). Under these the kernel computes layer_norm_rows' integers; it falls
    back to that kernel where the buffers are not aligned for its 16-byte loads."""
    p = [int(v) for v in np.asarray(prm, np.int64).reshape(-1)]
    a_zp, a_mult, b_zp, b_mult, a_shift, a_zo, _lo, _hi, x_zp, _eps, k, shift, ozp, _qmin, _qmax, rzi, rzo = p[:17]
    small = lambda *v: all(abs(x) <= ZP_HI for x in v)  # noqa: E731
    i32 = lambda a: int(np.abs(np.asarray(a, np.int64)).max(initial=0)) < 2**31  # noqa: E731
    if channels % 8 or not 8 <= channels <= 1024 or not small(x_zp, ozp) or not (0 <= k <= 16 and k % 2 == 0):
        return False
    if not (_shifts_hi([shift]) and i32(gamma)):
        return False
    if p[19] and not (_shifts_hi([a_shift]) and small(a_zp, b_zp, a_zo) and
                      max(abs(a_mult), abs(b_mult)) < 2**ADD_MULT_BITS_HI):
        return False
    return rq_mult is None or (_shifts_hi(rq_shift) and i32(rq_mult) and small(rzi, rzo))


SMS = 132  # an H100 SXM's SMs: one wave of output tiles


def pick_tile(m: int | None, n: int, k: int) -> str:
    """The tile configuration for an [M, K] x [K, N] GEMM (M None: not known when building), from
    bench/gpu.py's kernel table on an H100 (2026-12-07 21:25, device time, hi epilogue; "later runs"
    in bench/results/gpu.json):
    - N >= 2048: 256x128 (4096^3: 1355 TOP/s against 1353 for 128x256 and 1101 for 128x128; 8192^3:
      1466 against 1441; 4096 x 3072 x 768: 626 against 569 for 128x128);
    - K >= 2048, or N <= 768 where 128x128 tiles would fill more than one wave: ping-pong 64x128,
      whose epilogue overlaps the other warp group's main loop (4096 x 768 x 3072: 1024 against
      938 for pp128x64 and 850 for 256x128; 12608 x 384 x 1536: 737 against 717 for pp128x64 and 649 for
      128x64; 4096 x 768 x 768: 446 against 441 and 400; 12608 x 384 x 384: 272 against 279 for
      pp128x64, the one shape where another tile is ahead, by 3 %);
    - otherwise 128x128 (one wave at 4096 x 384 x 1536: 518 against 485 for pp128x64; 12608 x 1152
      x 384 and 12608 x 1536 x 384: 353 and 385, the best there)."""
    if n >= 2048:
        return "256x128"
    if k >= 2048 or (n <= 768 and (m is None or -(-m // 128) * -(-n // 128) > SMS)):
        return "pp64x128"
    return "128x128"


def supported_arch(arch: str) -> bool:
    """The kernels use Hopper's WGMMA and TMA: sm_90 / sm_90a only."""
    return arch in ("sm_90", "sm_90a")


def _src_dir() -> str:
    return os.path.join(os.path.dirname(__file__), "kernels")


def cutlass_include() -> str:
    try:
        from importlib import util
        spec = util.find_spec("cutlass_library")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise QCError("tvm-cuda's int8 tensor-core kernels need the CUTLASS headers: pip install 'qcompiler[cuda]' "
                      "(nvidia-cutlass)")
    inc = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    if not os.path.isfile(os.path.join(inc, "cutlass", "epilogue", "collective", "builders", "sm90_builder.inl")):
        raise QCError(f"{inc}: the CUTLASS headers there lack the sm90 collective builders")
    return inc


def _ffi_dirs() -> tuple[str, str]:
    import tvm_ffi
    root = os.path.dirname(tvm_ffi.__file__)
    return os.path.join(root, "include"), os.path.join(root, "lib")


def _nvcc_version(nvcc: str) -> str:
    r = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else "unknown"


def _cache_dir() -> str:
    return os.environ.get("QC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qcompiler")


def build_library(arch: str = "sm_90") -> str:
    """Path of the kernel library for `arch`, compiled now unless the cache holds it."""
    if not supported_arch(arch):
        raise QCError(f"qcompiler's CUDA kernels are written for Hopper (sm_90), not {arch}")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise QCError("tvm-cuda builds its kernels with nvcc, which is not on PATH")
    inc_cutlass = cutlass_include()
    inc_ffi, lib_ffi = _ffi_dirs()
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        with open(os.path.join(_src_dir(), name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    h.update(f"{arch}|{_nvcc_version(nvcc)}|{inc_cutlass}".encode())
    out_dir = os.path.join(_cache_dir(), "cuda-kernels", h.hexdigest()[:16])
    out = os.path.join(out_dir, LIB_NAME)
    if os.path.isfile(out):
        return out
    os.makedirs(out_dir, exist_ok=True)
    arch_flag = f"-arch={arch}a" if not arch.endswith("a") else f"-arch={arch}"
    flags = [nvcc, "-std=c++17", "-O3", "-DNDEBUG", arch_flag, "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
             "-I", inc_cutlass, "-I", inc_ffi]
    with tempfile.TemporaryDirectory(prefix=".nvcc-", dir=out_dir) as d:
        tmp = os.path.join(d, LIB_NAME)
        objs = [os.path.join(d, s + ".o") for s in SOURCES]
        # one nvcc per source, side by side (the CUTLASS GEMMs alone take minutes), then one link
        procs = [subprocess.Popen([*flags, "-c", os.path.join(_src_dir(), s), "-o", o], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for s, o in zip(SOURCES, objs)]
        logs = [(p.communicate()[0], p.returncode) for p in procs]
        link = subprocess.run([nvcc, arch_flag, "-shared", "-cudart", "static", *objs, "-L", lib_ffi, "-ltvm_ffi",
                               "-o", tmp], capture_output=True, text=True) if not any(rc for _l, rc in logs) else None
        if link is None or link.returncode:
            text = "\n".join(log for log, rc in logs if rc) if link is None else (link.stderr or link.stdout)
            err = [ln for ln in text.splitlines() if "error" in ln][:5]
            raise QCError("nvcc could not build qcompiler's CUDA kernels: " + " | ".join(err)[:1500])
        os.replace(tmp, out)  # atomic: a concurrent build sees the whole file or none
    return out
