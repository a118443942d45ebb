"""tvm-cuda: the int8 GEMMs and the requant after them become one call of qcompiler's CUTLASS
kernel (backends/tvm/kernels); the kernel library builds with nvcc; on a GPU (marked `gpu`) the
kernel and a whole artifact are bit-exact against the reference kernels."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import qcompiler
from qcompiler import int_ops as I

tvm = pytest.importorskip("tvm")
qc = torch.ops.qc
pytestmark = pytest.mark.filterwarnings("ignore")


class LinearRequant(nn.Module):
    def __init__(self, n=64, k=32, per_channel=True, out_int16=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g))
        self.register_buffer("b", torch.randint(-1000, 1000, (n,), dtype=torch.int32, generator=g))
        self.register_buffer("m", torch.full((n if per_channel else 1,), 1 << 30, dtype=torch.int64))
        self.register_buffer("s", torch.full((n if per_channel else 1,), 38, dtype=torch.int64))
        self.register_buffer("m1", torch.full((1,), 1 << 30, dtype=torch.int64))
        self.register_buffer("s1", torch.full((1,), 30, dtype=torch.int64))
        self.q = (-32768, 32767) if out_int16 else (-128, 127)

    def forward(self, x, y):
        acc = qc.int_linear(x, 0, self.w, self.b)
        att = qc.int_matmul(x, 0, y, 0)
        return (qc.requant(acc, 0, self.m, self.s, 2, *self.q, -1), qc.requant(att, 0, self.m1, self.s1, 0, -128, 127, -1))


def _externs(mod):
    from tvm import relax
    found = []
    for f in mod.functions.values():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(
                f, lambda e: found.append(str(e.args[0].global_symbol))
                if isinstance(e, relax.Call) and e.args and isinstance(e.args[0], relax.ExternFunc) else None)
    return found


def _translate(m, ex):
    from qcompiler.backends.tvm.translate import to_relax
    return to_relax(qcompiler.trace(m, ex, dynamic="batch"), dot="sm90")


# the batch is dynamic: M unknown, so pick_tile takes pp64x128 for these narrow N
def test_int8_linear_and_matmul_with_requant_become_one_kernel_call():
    """The linear's shifts (38) take the int32 (hi) epilogue; the matmul's (30) the general one."""
    ex = (torch.zeros(2, 16, 32, dtype=torch.int8), torch.zeros(2, 32, 48, dtype=torch.int8))
    calls = _translate(LinearRequant(), ex)
    assert calls and sorted(_externs(calls)) == ["qc.cuda.gemm_s8_requant_hi_pp64x128",
                                                 "qc.cuda.gemm_s8_requant_pp64x128"]


def test_int16_out_requant_uses_the_int16_kernel():
    ex = (torch.zeros(2, 16, 32, dtype=torch.int8), torch.zeros(2, 32, 48, dtype=torch.int8))
    assert sorted(_externs(_translate(LinearRequant(out_int16=True), ex))) == \
        ["qc.cuda.gemm_s8_requant_i16_hi_pp64x128", "qc.cuda.gemm_s8_requant_pp64x128"]


def test_one_shift_below_32_takes_the_general_epilogue():
    m = LinearRequant()
    m.s[5] = 31
    ex = (torch.zeros(2, 16, 32, dtype=torch.int8), torch.zeros(2, 32, 48, dtype=torch.int8))
    assert sorted(_externs(_translate(m, ex))) == ["qc.cuda.gemm_s8_requant_pp64x128"] * 2


def test_pick_tile_follows_the_kernel_table():
    from qcompiler.backends.tvm.cuda_kernels import pick_tile
    assert pick_tile(4096, 4096, 4096) == pick_tile(None, 4096, 4096) == pick_tile(8192, 8192, 8192) == "256x128"
    assert pick_tile(4096, 3072, 768) == pick_tile(4096, 2304, 768) == "256x128"
    assert pick_tile(4096, 768, 3072) == pick_tile(4096, 1536, 3072) == "pp64x128"
    assert pick_tile(4096, 768, 768) == pick_tile(12608, 384, 1536) == pick_tile(None, 384, 384) == "pp64x128"
    assert pick_tile(4096, 384, 384) == pick_tile(4096, 1536, 384) == pick_tile(12608, 1152, 384) == "128x128"
    assert pick_tile(4096, 384, 1536) == "128x128"  # 96 tiles of 128x128: one wave


def test_kernel_call_declines_what_the_kernel_does_not_compute():
    ex = (torch.zeros(2, 16, 32, dtype=torch.int8), torch.zeros(2, 32, 40, dtype=torch.int8))  # N = 40: not % 16
    narrow = LinearRequant()
    narrow.q = (-100, 100)  # a clamp narrower than the output dtype: not the kernel's saturation
    # the linear declines; the matmul's N = 40 is zero-padded to 48 (its requant is per tensor)
    assert _externs(_translate(narrow, ex)) == ["qc.cuda.gemm_s8_requant_pp64x128"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_kernel_library_builds_and_registers_its_functions():
    pytest.importorskip("cutlass_library", reason="needs the CUTLASS headers (pip install 'qcompiler[cuda]')")
    import ctypes

    import tvm_ffi

    from qcompiler.backends.tvm.cuda_kernels import GEMM_OUTS, GEMM_TILES, build_library, gemm_func
    path = build_library("sm_90")
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # loads without a GPU: registration only
    for t in GEMM_TILES:
        for out in GEMM_OUTS:
            for hi in (False, True):
                assert tvm_ffi.get_global_func(gemm_func(t, out, hi)) is not None


def test_kernel_library_refuses_other_architectures():
    from qcompiler.backends.tvm.cuda_kernels import build_library
    from qcompiler.errors import QCError
    with pytest.raises(QCError, match="Hopper"):
        build_library("sm_80")


@pytest.mark.gpu
def test_gemm_kernel_bit_exact_on_gpu():
    """Ties, saturation, per-channel shifts 0..40, partial tiles, against qc::requant in torch."""
    import ctypes

    import tvm_ffi

    from qcompiler.backends.tvm.cuda_kernels import GEMM_TILES, build_library, gemm_func
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ctypes.CDLL(build_library("sm_90"), mode=ctypes.RTLD_GLOBAL)
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, n, k in ((77, 384, 384), (300, 256, 1536)):
        x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda", generator=g)
        bias = torch.randint(-2**20, 2**20, (n,), dtype=torch.int32, device="cuda", generator=g)
        mult = torch.randint(2**30, 2**31 - 1, (n,), dtype=torch.int32, device="cuda", generator=g)
        shift = torch.randint(0, 41, (n,), dtype=torch.int32, device="cuda", generator=g)
        for out, (lo, hi), dt in (("int8", (-128, 127), torch.int8), ("int16", (-32768, 32767), torch.int16)):
            ref = I.requant(torch._int_mm(x, w.t()) + bias, 0, mult.long(), shift.long(), -5, lo, hi, -1)
            for t in GEMM_TILES:
                y = torch.empty((m, n), dtype=dt, device="cuda")
                tvm_ffi.get_global_func(gemm_func(t, out))(
                    *[tvm_ffi.from_dlpack(a) for a in (x, w, bias, mult, shift)], -5, lo, hi, tvm_ffi.from_dlpack(y))
                torch.cuda.synchronize()
                assert torch.equal(y, ref), (out, t, m, n, k, int((y != ref).sum()))


_REQUANT_HI = r"""
#include "qc_int.cuh"
extern "C" void rq_hi(const int32_t* a, const int32_t* m, const int32_t* c, int64_t n, int32_t zp, int32_t lo,
                     int32_t hi, int32_t* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = qc_int::requant_hi(a[i], m[i], c[i], zp, lo, hi);
}
"""


def _host_lib(tmp_path, name: str, src: str):
    """`src` (which includes kernels/qc_int.cuh) compiled by nvcc for the host, loaded by ctypes."""
    import ctypes
    import subprocess

    from qcompiler.backends.tvm.cuda_kernels import _ffi_dirs, _src_dir
    (tmp_path / f"{name}.cu").write_text(src)
    subprocess.run(["nvcc", "-O2", "-shared", "-Xcompiler", "-fPIC", "-I", _src_dir(), "-I", _ffi_dirs()[0],
                    str(tmp_path / f"{name}.cu"), "-o", str(tmp_path / f"{name}.so")], check=True, capture_output=True)
    return ctypes.CDLL(str(tmp_path / f"{name}.so"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_gemm_hi_epilogue_is_qc_requant(tmp_path):
    """The GEMM's hi epilogue (kernels/qc_int.cuh requant_hi, compiled here for the host by nvcc)
    against qc::requant: every shift 32..62, multipliers of both signs, products at exact ties and
    at multiples of 2^32 (the low word zero), saturation at int8 and int16."""
    import ctypes

    from qcompiler.backends.tvm.cuda_kernels import HI_SHIFTS
    rq_hi = _host_lib(tmp_path, "rq_hi", _REQUANT_HI).rq_hi
    g = torch.Generator().manual_seed(0)
    n = 200_000
    lo_c, hi_c = HI_SHIFTS
    a = torch.randint(-2**31, 2**31, (n,), dtype=torch.int64, generator=g)
    m = torch.randint(-2**31 + 1, 2**31, (n,), dtype=torch.int64, generator=g)
    c = torch.randint(lo_c, hi_c + 1, (n,), dtype=torch.int64, generator=g)
    # small operands: shifts that keep results in range (not all saturated)
    a[: n // 4] = torch.randint(-2**24, 2**24, (n // 4,), generator=g)
    m[: n // 4] = torch.randint(2**30, 2**31, (n // 4,), generator=g)
    c[: n // 4] = torch.randint(lo_c, 56, (n // 4,), generator=g)
    # exact ties: a m = odd 2^(c-1) = (odd 2^(c-31)) 2^30; and products that are multiples of 2^32
    k = torch.arange(n // 4, n // 2)
    c[k] = torch.randint(lo_c, 52, (len(k),), generator=g)
    odd = torch.randint(-64, 64, (len(k),), generator=g) * 2 + 1
    m[k], a[k] = 2**30 * torch.where(k % 2 == 0, 1, -1), odd * 2**(c[k] - 31)
    lowzero = torch.arange(n // 2, n // 2 + n // 8)
    m[lowzero], a[lowzero] = 2**30, torch.randint(-2**20, 2**20, (len(lowzero),), generator=g) * 4
    a = a.clamp(-2**31, 2**31 - 1)
    for zp, lo, hi in ((0, -128, 127), (-3, -128, 127), (5, -32768, 32767)):
        ref = I.requant(a, 0, m, c, zp, lo, hi, -1).to(torch.int64)
        ai, mi, ci = (t.to(torch.int32).contiguous() for t in (a, m, c))
        y = torch.empty(n, dtype=torch.int32)
        ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
        rq_hi(ptr(ai), ptr(mi), ptr(ci), ctypes.c_int64(n), zp, lo, hi, ptr(y))
        bad = (y.to(torch.int64) != ref).nonzero().flatten()
        assert len(bad) == 0, [(int(a[i]), int(m[i]), int(c[i]), int(y[i]), int(ref[i])) for i in bad[:5]]
        assert len(set(ref.tolist())) > 100  # not everything saturates


_RSHIFT_HI = r"""
#include "qc_int.cuh"
extern "C" void rs_hi(const int64_t* p, const int32_t* c, int64_t n, int32_t* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = qc_int::rshift_round_hi(p[i], c[i]);
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_rshift_round_hi_is_rshift_round(tmp_path):
    """qc_int.cuh rshift_round_hi (the hi row kernels' rounding shift of int64 sums: the LayerNorm's
    add, its normalisation and its n gamma + beta) against int_ops.rshift_round on int64 values of
    every size, both signs, exact ties and low words of zero, every shift 32..62."""
    import ctypes

    from qcompiler.backends.tvm.cuda_kernels import HI_SHIFTS
    rs_hi = _host_lib(tmp_path, "rs_hi", _RSHIFT_HI).rs_hi
    g = torch.Generator().manual_seed(1)
    n = 200_000
    c = torch.randint(HI_SHIFTS[0], HI_SHIFTS[1] + 1, (n,), dtype=torch.int64, generator=g)
    bits = torch.randint(0, 63, (n,), generator=g)  # magnitudes of every size below 2^62
    p = torch.randint(0, 2**62, (n,), dtype=torch.int64, generator=g) >> bits
    p = torch.where(torch.rand(n, generator=g) < 0.5, -p, p)
    k = torch.arange(n // 4)  # exact ties: odd multiples of 2^(c-1)
    c[k] = c[k].clamp(max=51)
    p[k] = (torch.randint(-2**10, 2**10, (len(k),), generator=g) * 2 + 1) << (c[k] - 1)
    low = torch.arange(n // 4, n // 2)  # low word zero, both signs
    p[low] = torch.randint(-2**29, 2**29, (len(low),), generator=g) << 32
    ref = I.rshift_round(p, c)
    y = torch.empty(n, dtype=torch.int32)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    ci = c.to(torch.int32).contiguous()
    rs_hi(ptr(p), ptr(ci), ctypes.c_int64(n), ptr(y))
    bad = (y.to(torch.int64) != ref).nonzero().flatten()
    assert len(bad) == 0, [(int(p[i]), int(c[i]), int(y[i]), int(ref[i])) for i in bad[:5]]
    assert len(set(ref.tolist())) > 1000


def test_hi_row_kernels_take_only_constants_they_compute():
    """ln_hi_ok / lut_hi_ok: each constant the hi kernels narrow to 32 bits, out of range, sends the
    call to the general kernel."""
    from qcompiler.backends.tvm.cuda_kernels import ZP_HI, ln_hi_ok, lut_hi_ok
    from qcompiler.backends.tvm.translate import layer_norm_params
    eps, k, gamma, beta, shift = I.layer_norm_consts(torch.rand(768) + 0.5, torch.randn(768), 768, 1e-5, 0.01, 0.05,
                                                     in_levels=65536)
    gamma = gamma.numpy()
    add = [3, 1439302324, -2, -881062436, 33, 1, -32768, 32767]
    ln = [5, eps, k, shift, 0, -128, 127]
    rq = [1, -3, -128, 127]
    m, c = np.full(768, 2**30, np.int64), np.full(768, 40, np.int64)
    prm = lambda add=add, ln=ln, rq=rq: layer_norm_params(add, ln, rq)  # noqa: E731
    assert shift >= 32 and ln_hi_ok(prm(), gamma, 768, m, c) and ln_hi_ok(prm(add=None), gamma, 768)
    assert not ln_hi_ok(prm(), gamma, 768, m, np.where(np.arange(768) == 7, 31, c))  # one channel's shift
    assert not ln_hi_ok(prm(), gamma, 768, np.where(np.arange(768) == 7, 2**31, m), c)
    assert not ln_hi_ok(prm(add=[*add[:4], 31, *add[5:]]), gamma, 768, m, c)  # the add's shift
    assert ln_hi_ok(prm(add=None), gamma, 768, m, c) and not ln_hi_ok(prm(add=[*add[:4], 31, *add[5:]]), gamma, 768)
    assert not ln_hi_ok(prm(add=[ZP_HI + 1, *add[1:]]), gamma, 768)
    assert not ln_hi_ok(prm(add=[add[0], 2**44, *add[2:]]), gamma, 768) and ln_hi_ok(prm(add=[add[0], 2**43, *add[2:]]), gamma, 768)
    assert not ln_hi_ok(prm(ln=[5, eps, k, 31, 0, -128, 127]), gamma, 768)  # the LayerNorm's shift
    assert not ln_hi_ok(prm(ln=[5, eps, 18, shift, 0, -128, 127]), gamma, 768)  # sqrt_bits > 16
    assert not ln_hi_ok(prm(ln=[-ZP_HI - 1, eps, k, shift, 0, -128, 127]), gamma, 768)
    assert not ln_hi_ok(prm(rq=[ZP_HI + 1, -3, -128, 127]), gamma, 768, m, c)
    assert not ln_hi_ok(prm(), gamma * 2**8, 768, m, c)  # gamma beyond int32
    assert not ln_hi_ok(prm(), gamma[:764], 764, m[:764], c[:764]) and not ln_hi_ok(prm(), gamma, 1032)
    assert lut_hi_ok(3, m, c, -2) and lut_hi_ok(0, m[:1], c[:1], 0)
    assert not lut_hi_ok(3, m, np.where(np.arange(768) == 0, 62 + 1, c), -2)
    assert not lut_hi_ok(3, m, np.where(np.arange(768) == 0, 31, c), -2)
    assert not lut_hi_ok(ZP_HI + 1, m, c, 0) and not lut_hi_ok(0, m, c, -ZP_HI - 1)
    assert not lut_hi_ok(0, m * 2, c, 0)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_kernels_compile_with_ieee_float_and_no_fma(monkeypatch):
    """TVM's CUDA kernels are built with CUDA_EXACT_FLOAT: quantize's x / s is IEEE division
    (div.rn), a * b + c stays two roundings (no fma), as in the reference kernels."""
    from tvm.support import nvcc

    from qcompiler.backends.tvm.build import CUDA_EXACT_FLOAT
    monkeypatch.setenv("TVM_CUDA_NVCC_NO_FAST_MATH", "1")  # as build._exact_float_cuda_compile sets it
    code = 'extern "C" __global__ void f(float* a, const float* b) { a[0] = rintf(a[1] / b[0]) + a[2] * b[1]; }'
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}):
        exact = nvcc.compile_cuda(code, target_format="ptx", arch="sm_90", options=list(CUDA_EXACT_FLOAT),
                                  compiler="nvcc").decode()
        fast = nvcc.compile_cuda(code, target_format="ptx", arch="sm_90", options=["--use_fast_math"],
                                 compiler="nvcc").decode()
    assert "div.rn.f32" in exact and "fma" not in exact and "approx" not in exact
    assert "approx" in fast or "fma" in fast  # what TVM's default flags give: the test can tell them apart


# -- the row and table kernels (kernels/int_rows.cu): softmax, LUT (+ requant), LayerNorm ------------

from test_tvm import Ops  # noqa: E402  (forward(*xs) = fn(self, *xs): qc:: ops on keyword buffers)


def _row_ops(softmax_dim=-1):
    eps, k, gamma, beta, shift = I.layer_norm_consts(torch.rand(32) + 0.5, torch.randn(32), 32, 1e-5, 0.01, 0.05,
                                                     in_levels=65536)
    table = torch.arange(65536, dtype=torch.int64).remainder(300).to(torch.int16)  # an int16 LUT over int16 codes
    return Ops(lambda s, x, mask, y: (
        qc.int_softmax(x, mask, s.exp, softmax_dim, 1 << 30, 23, -128, -128, 127),
        qc.int_softmax(x, None, s.exp, softmax_dim, 1 << 30, 23, 0, 0, 255),
        qc.requant(qc.int_lut(y, s.table, -32768), 0, s.m, s.c, 1, -128, 127, -1),
        qc.int_lut(y, s.table, -32768),
        qc.int_layer_norm(y, 5, eps, k, s.gamma, s.beta, shift, 0, -128, 127)),
        exp=I.exp_table(0.05, 65536), table=table, gamma=gamma, beta=beta,
        m=torch.full((32,), 1 << 30, dtype=torch.int64), c=torch.arange(32, dtype=torch.int64))


_ROW_EX = (torch.zeros(2, 3, 8, 16, dtype=torch.int16), torch.ones(2, 1, 1, 16, dtype=torch.bool),
           torch.zeros(2, 6, 32, dtype=torch.int16))


def test_softmax_lut_layer_norm_become_kernel_calls(monkeypatch):
    from qcompiler.backends.tvm.cuda_kernels import (LAYER_NORM_FUNC, LUT_FUNC, LUT_REQUANT_FUNC, SOFTMAX_FUNC,
                                                     SOFTMAX_MASKED_FUNC, row_func)
    from qcompiler.backends.tvm.translate import to_relax
    g = qcompiler.trace(_row_ops(), _ROW_EX, dynamic=None)
    calls = sorted(_externs(to_relax(g, dot="sm90")))
    # the LayerNorm's shift is >= 32: its hi kernel; the LUT's requant has shifts 0..31: the general one
    assert calls == sorted([SOFTMAX_MASKED_FUNC, SOFTMAX_FUNC, LUT_REQUANT_FUNC, LUT_FUNC,
                            row_func(LAYER_NORM_FUNC, True)])
    assert _externs(to_relax(g, dot=None)) == []  # tvm-llvm (and non-Hopper CUDA) keep the generic kernels
    ops = _row_ops()
    ops.c = torch.arange(31, 63, dtype=torch.int64)
    ops.c[0] = 62
    assert row_func(LUT_REQUANT_FUNC, True) in _externs(to_relax(qcompiler.trace(ops, _ROW_EX, dynamic=None),
                                                                 dot="sm90"))
    from qcompiler.backends.tvm import cuda_kernels
    monkeypatch.setattr(cuda_kernels, "LUT_HI", False)
    assert row_func(LUT_REQUANT_FUNC, True) not in _externs(to_relax(qcompiler.trace(ops, _ROW_EX, dynamic=None),
                                                                     dot="sm90"))
    monkeypatch.setattr(cuda_kernels, "LUT_HI", True)
    ops.c = torch.arange(32, 64, dtype=torch.int64)  # every LUT requant shift 32..63: 63 is one too many
    assert row_func(LUT_REQUANT_FUNC, True) not in _externs(to_relax(qcompiler.trace(ops, _ROW_EX, dynamic=None),
                                                                     dot="sm90"))
    ops.c = torch.arange(31, 63, dtype=torch.int64)
    ops.c[0] = 62
    assert row_func(LUT_REQUANT_FUNC, True) in _externs(to_relax(qcompiler.trace(ops, _ROW_EX, dynamic=None),
                                                                 dot="sm90"))


def test_row_kernels_decline_what_they_do_not_compute():
    from qcompiler.backends.tvm.translate import to_relax
    # softmax over a dim that is not the last: the generic path (the LUT and LayerNorm calls stay)
    g = qcompiler.trace(_row_ops(softmax_dim=2), (_ROW_EX[0].transpose(2, 3).contiguous(),
                                                 torch.ones(2, 1, 16, 1, dtype=torch.bool), _ROW_EX[2]), dynamic=None)
    assert not any("softmax" in c for c in _externs(to_relax(g, dot="sm90")))
    # symbolic shapes: the kernels' row counts and mask strides are static arguments
    g = qcompiler.trace(_row_ops(), _ROW_EX, dynamic="batch")
    assert _externs(to_relax(g, dot="sm90")) == []


def test_softmax_table_is_cut_after_its_first_zero():
    from qcompiler.backends.tvm.translate import softmax_table
    t = I.exp_table(0.05, 65536).numpy()
    cut = softmax_table(t)
    z = int(np.flatnonzero(t == 0)[0])
    assert cut.dtype == np.int32 and len(cut) == z + 1 and cut[-1] == 0 and np.array_equal(cut[:z], t[:z])
    assert softmax_table(np.array([5, 0, 3])).tolist() == [5, 0, 3]  # a later non-zero entry: kept whole
    assert softmax_table(np.array([2**31])) is None and softmax_table(np.array([-1])) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_row_kernels_compile_for_sm90a(tmp_path):
    import subprocess

    from qcompiler.backends.tvm.cuda_kernels import _ffi_dirs, _src_dir
    inc, _lib = _ffi_dirs()
    import os
    r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90a", "-c", "-I", inc, os.path.join(_src_dir(), "int_rows.cu"),
                        "-o", str(tmp_path / "int_rows.o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.gpu
def test_row_kernels_bit_exact_on_gpu():
    """Softmax (masked rows, fully masked rows, ties, long rows), LUT + per-channel requant and
    LayerNorm (zero and largest variance) through the registered kernels, against int_ops in torch."""
    import ctypes

    import tvm_ffi

    from qcompiler.backends.tvm.cuda_kernels import (LAYER_NORM_FUNC, LUT_REQUANT_FUNC, SOFTMAX_MASKED_FUNC,
                                                     build_library)
    from qcompiler.backends.tvm.translate import layer_norm_params, softmax_table
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ctypes.CDLL(build_library("sm_90"), mode=ctypes.RTLD_GLOBAL)
    f = lambda name: tvm_ffi.get_global_func(name)  # noqa: E731
    d = lambda t: tvm_ffi.from_dlpack(t)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    for n in (16, 197, 1000):
        x = torch.randint(-3000, 3000, (64, n), dtype=torch.int16, generator=g)
        x[0] = 7
        mask = torch.rand(4, n, generator=g) > 0.3
        mask[1] = False
        tab = I.exp_table(0.01, 65536)
        for mult, shift in ((2130706440, 24), (1 << 30, 23), (12345, 0)):
            ref = I.int_softmax(x.view(4, 16, n), mask.view(4, 1, n), tab, -1, mult, shift, -128, -128, 127).view(64, n)
            y = torch.empty(64, n, dtype=torch.int8, device="cuda")
            f(SOFTMAX_MASKED_FUNC)(d(x.cuda()), d(mask.to(torch.int8).cuda()), d(torch.from_numpy(softmax_table(tab.numpy())).cuda()),
                                   16, 4, mult, shift, -128, -128, 127, d(y))
            torch.cuda.synchronize()
            assert torch.equal(y.cpu(), ref), (n, mult, int((y.cpu() != ref).sum()))
    x = torch.randint(-32768, 32768, (300, 96), dtype=torch.int16, generator=g)
    table = torch.randint(-32768, 32768, (65536,), dtype=torch.int16, generator=g)
    m = torch.randint(2**30, 2**31 - 1, (96,), dtype=torch.int64, generator=g)
    c = torch.randint(0, 40, (96,), dtype=torch.int64, generator=g)
    ref = I.requant(I.int_lut(x, table, -32768), 3, m, c, -2, -128, 127, -1)
    y = torch.empty(300, 96, dtype=torch.int8, device="cuda")
    f(LUT_REQUANT_FUNC)(d(x.cuda()), d(table.cuda()), -32768, 3, d(m.cuda()), d(c.cuda()), -2, -128, 127,
                        d(y))
    torch.cuda.synchronize()
    assert torch.equal(y.cpu(), ref)
    eps, k, gamma, beta, shift = I.layer_norm_consts(torch.rand(384, generator=g) + 0.5, torch.randn(384, generator=g),
                                                     384, 1e-5, 0.01, 0.05, in_levels=65536)
    x = torch.randint(-32768, 32768, (100, 384), dtype=torch.int16, generator=g)
    x[0], x[1] = 5, torch.where(torch.arange(384) % 2 == 1, 32767, -32768)
    ref = I.int_layer_norm(x, 5, eps, k, gamma, beta, shift, 0, -32768, 32767)
    y = torch.empty(100, 384, dtype=torch.int16, device="cuda")
    none = torch.zeros(384, dtype=torch.int64, device="cuda")
    prm = torch.from_numpy(layer_norm_params(None, [5, eps, k, shift, 0, -32768, 32767], [0] * 4)).cuda()
    xg = x.cuda()
    f(LAYER_NORM_FUNC)(d(xg), d(xg), d(prm), d(gamma.cuda()), d(beta.cuda()), d(none), d(none), d(y))
    torch.cuda.synchronize()
    assert torch.equal(y.cpu(), ref)


# -- the translation around the kernels, run on the CPU: each qc.cuda.* function emulated in torch
# by its contract (the reference kernels on the rows, padding, mask rows it is given), the Relax
# graph that calls them built for llvm. What this checks: the reshapes, the zero padding of K and
# N to multiples of 16 around attention, the mask rows, the fused requants. (The CUDA kernels
# themselves are checked against the same contracts on the GPU, above.)

def _emulate_kernels():
    import tvm_ffi

    from qcompiler.backends.tvm import cuda_kernels as K
    T = lambda a: torch.from_dlpack(a)  # noqa: E731

    def gemm(out, hi):
        def f(x, w, bias, mult, shift, out_zp, qmin, qmax, y):
            if hi:  # the Hi epilogue's contract: every shift in HI_SHIFTS
                assert K.HI_SHIFTS[0] <= int(T(shift).min()) and int(T(shift).max()) <= K.HI_SHIFTS[1]
            x, w = T(x).long(), T(w).long()
            acc = (x @ w.transpose(-1, -2) + T(bias).long()).to(torch.int32)
            r = I.requant(acc, 0, T(mult).long(), T(shift).long(), out_zp, qmin, qmax, -1)
            T(y).copy_(r.view(torch.int16) if out == "int16" else r)
        return f

    def softmax(x, tab, n, mult, shift, out_zp, qmin, qmax, y, mask=None, mdiv=1, mmod=1):
        x, y = T(x), T(y)
        rows = x.shape[0]
        keep = None
        if mask is not None:
            keep = T(mask).bool()[(torch.arange(rows) // mdiv) % mmod]
        r = I.int_softmax(x[:, :n], keep, T(tab).long(), -1, mult, shift, out_zp, qmin, qmax)
        y.zero_()
        y[:, :n] = r

    def softmax_masked(x, mask, tab, n, mdiv, mmod, mult, shift, out_zp, qmin, qmax, y):
        softmax(x, tab, n, mult, shift, out_zp, qmin, qmax, y, mask, mdiv, mmod)

    def lut(x, tab, offset, y):
        T(y).copy_(I.int_lut(T(x), T(tab).long(), offset).to(T(y).dtype))

    def lut_requant(x, tab, offset, in_zp, mult, shift, out_zp, qmin, qmax, y):
        v = I.int_lut(T(x), T(tab).long(), offset)
        T(y).copy_(I.requant(v, in_zp, T(mult), T(shift), out_zp, qmin, qmax, -1))

    def layer_norm(a, b, prm, gamma, beta, rq_mult, rq_shift, y, y2=None):
        p = T(prm).tolist()
        x = I.int_add(T(a), p[0], p[1], T(b), *p[2:8]) if p[19] else T(a)
        r = I.int_layer_norm(x, *p[8:11], T(gamma), T(beta), *p[11:15])
        T(y).copy_(r)
        if y2 is not None:
            T(y2).copy_(I.requant(r, p[15], T(rq_mult), T(rq_shift), *p[16:19], -1))

    def attention(q, k, v, tab, prm, mult3, shift3, b, h, sq, sk, d, y, mask=None):
        p = T(prm).tolist()
        view = lambda t, o, rows: torch.as_strided(T(t).reshape(-1), (b, h, rows, d), (*o[1:4], 1), o[0])  # noqa
        q4, k4, v4 = view(q, p[0:4], sq), view(k, p[4:8], sk), view(v, p[8:12], sk)
        keep = None if mask is None else torch.as_strided(T(mask).reshape(-1).bool(), (b, h, sq, sk), p[16:20], 0)
        c1, sm, c2, c3 = p[20:26], p[26:31], p[31:37], p[37:43]
        t = lambda v: torch.tensor(v)  # noqa: E731
        s = I.requant(I.int_matmul(q4, 0, k4.transpose(-1, -2), 0), c1[0], t(c1[1]), t(c1[2]), *c1[3:], -1)
        o = I.requant(I.int_matmul(I.int_softmax(s, keep, T(tab).long(), -1, *sm), 0, v4, 0), c2[0], t(c2[1]),
                      t(c2[2]), *c2[3:], -1).long()
        if c3[0]:
            ch = (torch.arange(h).view(h, 1) * d + torch.arange(d)).view(1, h, 1, d) if c3[1] else torch.zeros(1).long()
            o = (I.rshift_round((o - c3[2]) * T(mult3)[ch], T(shift3)[ch]) + c3[3]).clamp(c3[4], c3[5])
        yv = T(y)
        torch.as_strided(yv.reshape(-1), (b, h, sq, d), (*p[13:16], 1), p[12]).copy_(o.to(yv.dtype))

    def attention_masked(q, k, v, mask, tab, prm, mult3, shift3, b, h, sq, sk, d, y):
        attention(q, k, v, tab, prm, mult3, shift3, b, h, sq, sk, d, y, mask)

    def attention_hi(f):
        def g(q, k, v, *rest):
            tab, fac, prm, mult3, shift3 = rest[-11:-6]
            assert hi_ok(T(prm).numpy(), T(mult3).numpy(), T(shift3).numpy())  # attention_hi's contract
            # its table: computed from the factors (k = 0: all of it; else where they are 2^-k clear
            # of a rounding tie), every entry past d = 0 below 0xFFFF (e(0)'s 16-bit code)
            fk, e0 = (int(v) for v in T(prm)[-2:])
            t, fv = T(tab).long(), T(fac).double()
            dd = torch.arange(t.numel())
            p = fv[dd >> 8] * fv[256 + (dd & 255)]
            r = (p + 2.0**52) - 2.0**52
            near = (p - r).abs() <= 0.5 - 2.0**-fk if fk else torch.ones(t.numel(), dtype=torch.bool)
            assert e0 == int(t[0]) and near.any() and torch.equal(r[near].long(), t[near])
            assert int(t[1:].max()) < 0xFFFF
            f(q, k, v, *[a for i, a in enumerate(rest) if i != len(rest) - 10])
        return g

    from qcompiler.backends.tvm.fuse_attention import hi_ok
    for masked, f in ((False, attention), (True, attention_masked)):
        tvm_ffi.register_global_func(K.attention_func(masked), f, override=True)
        tvm_ffi.register_global_func(K.attention_func(masked, True), attention_hi(f), override=True)
    for tile in K.GEMM_TILES:
        for out in K.GEMM_OUTS:
            for hi in (False, True):
                tvm_ffi.register_global_func(K.gemm_func(tile, out, hi), gemm(out, hi), override=True)
    def add_layer_norm(a, b, prm, gamma, beta, rq_mult, rq_shift, xs, y):
        p = T(prm).tolist()
        T(xs).copy_(I.int_add(T(a), p[0], p[1], T(b), *p[2:8]))
        layer_norm(a, b, prm, gamma, beta, rq_mult, rq_shift, y)

    # the hi variants' contracts (cuda_kernels.lut_hi_ok / ln_hi_ok), then the same integers
    def lut_requant_hi(x, tab, offset, in_zp, mult, shift, out_zp, qmin, qmax, y):
        assert K.lut_hi_ok(in_zp, T(mult).numpy(), T(shift).numpy(), out_zp)
        lut_requant(x, tab, offset, in_zp, mult, shift, out_zp, qmin, qmax, y)

    def ln_hi(f, with_rq):
        def g(a, b, prm, gamma, beta, rq_mult, rq_shift, *ys):
            rq = (T(rq_mult).numpy(), T(rq_shift).numpy()) if with_rq else ()
            assert K.ln_hi_ok(T(prm).numpy(), T(gamma).numpy(), T(a).shape[-1], *rq)
            f(a, b, prm, gamma, beta, rq_mult, rq_shift, *ys)
        return g

    for name, f in ((K.SOFTMAX_FUNC, softmax), (K.SOFTMAX_MASKED_FUNC, softmax_masked), (K.LUT_FUNC, lut),
                    (K.LUT_REQUANT_FUNC, lut_requant), (K.LAYER_NORM_FUNC, layer_norm),
                    (K.LAYER_NORM_REQUANT_FUNC, layer_norm), (K.ADD_LAYER_NORM_FUNC, add_layer_norm),
                    (K.row_func(K.LUT_REQUANT_FUNC, True), lut_requant_hi),
                    (K.row_func(K.LAYER_NORM_FUNC, True), ln_hi(layer_norm, False)),
                    (K.row_func(K.LAYER_NORM_REQUANT_FUNC, True), ln_hi(layer_norm, True)),
                    (K.row_func(K.ADD_LAYER_NORM_FUNC, True), ln_hi(add_layer_norm, False))):
        tvm_ffi.register_global_func(name, f, override=True)


class Attention(nn.Module):
    """q k^T -> requant (int16) -> softmax (masked) -> @ v -> requant: the models' attention core."""

    def __init__(self, masked=True):
        super().__init__()
        self.masked = masked
        for k, (m, s) in {"qk": (1 << 30, 36), "pv": (1 << 30, 33)}.items():
            self.register_buffer(k + "_m", torch.tensor([m], dtype=torch.int64))
            self.register_buffer(k + "_s", torch.tensor([s], dtype=torch.int64))
        self.register_buffer("exp", I.exp_table(0.02, 65536))

    def forward(self, q, k, v, mask):
        s = qc.requant(qc.int_matmul(q, 0, k.transpose(-1, -2), 0), 0, self.qk_m, self.qk_s, 0, -32768, 32767, 0)
        p = qc.int_softmax(s, (mask != 0).unsqueeze(1).unsqueeze(2) if self.masked else None, self.exp, -1, 2130706440, 24,
                           -128, -128, 127)
        return (qc.requant(qc.int_matmul(p, 0, v, 0), 0, self.pv_m, self.pv_s, 0, -128, 127, 0),)


@pytest.mark.parametrize("tokens,masked", [(20, True), (32, False), (21, False)])
def test_translation_around_the_kernels_is_exact_on_cpu(tokens, masked):
    """Token counts that are not multiples of 16 pad K and N of both attention GEMMs. (Head size
    48: the fused attention kernel takes 32 and 64 only, so the block is translated op by op.)"""
    from tvm import relax

    from qcompiler.backends.tvm.build import target_for
    from qcompiler.backends.tvm.pipeline import pipeline
    from qcompiler.backends.tvm.translate import to_relax
    _emulate_kernels()
    rng = np.random.default_rng(tokens)
    q, k, v = (torch.from_numpy(rng.integers(-128, 128, (2, 3, tokens, 48)).astype(np.int8)) for _ in range(3))
    mask = torch.from_numpy((rng.random((2, tokens)) > 0.3).astype(np.int64))  # an attention_mask, as the models'
    mask[1] = 0  # fully masked rows: out_zp
    g = qcompiler.trace(Attention(masked), (q, k, v, mask), dynamic=None)
    mod = to_relax(g, dot="sm90")
    ext = _externs(mod)
    assert sum("softmax" in e for e in ext) == 1 and sum("gemm" in e for e in ext) == 2, ext
    assert not any("attention" in e for e in ext)
    target = target_for("llvm", None)
    with target:
        ex = tvm.compile(mod, target=target, relax_pipeline=pipeline(target))
    main = relax.VirtualMachine(ex, tvm.cpu())["main"]
    ref = g(q, k, v, mask)[0]
    out = main(*[tvm.runtime.tensor(t.numpy(), tvm.cpu()) for t in (q, k, v, mask)])
    got = (out[0] if isinstance(out, (list, tuple)) or hasattr(out, "__getitem__") else out).numpy()
    assert np.array_equal(got, ref.numpy()), int((got != ref.numpy()).sum())


def test_lut_requant_and_layer_norm_translation_is_exact_on_cpu():
    from tvm import relax

    from qcompiler.backends.tvm.build import target_for
    from qcompiler.backends.tvm.pipeline import pipeline
    from qcompiler.backends.tvm.translate import to_relax
    _emulate_kernels()
    rng = np.random.default_rng(1)
    m = _row_ops()
    g = qcompiler.trace(m, _ROW_EX, dynamic=None)
    target = target_for("llvm", None)
    with target:
        ex = tvm.compile(to_relax(g, dot="sm90"), target=target, relax_pipeline=pipeline(target))
    main = relax.VirtualMachine(ex, tvm.cpu())["main"]
    x = torch.from_numpy(rng.integers(-32768, 32768, (2, 3, 8, 16)).astype(np.int16))
    mask = torch.from_numpy(rng.random((2, 1, 1, 16)) > 0.3)
    y = torch.from_numpy(rng.integers(-32768, 32768, (2, 6, 32)).astype(np.int16))
    ref = g(x, mask, y)
    out = main(*[tvm.runtime.tensor(t.numpy(), tvm.cpu()) for t in (x, mask, y)])
    for r, o in zip(ref, out):
        assert np.array_equal(o.numpy(), r.numpy())


# -- the fused attention kernel (kernels/int_attention.cu, fuse_attention.py) ----------------------

class HeadsAttention(nn.Module):
    """The models' attention block on int8 linear outputs: heads split by views (separate q / k / v
    as MiniLM / BERT, or one qkv tensor as DeiT), q k^T -> requant -> softmax -> @ v -> requant,
    heads merged, then the per-channel requant before the output projection."""

    def __init__(self, heads=2, d=32, fused_qkv=False, masked=True, per_channel=True):
        super().__init__()
        self.h, self.d, self.fused, self.masked = heads, d, fused_qkv, masked
        g = torch.Generator().manual_seed(3)
        c = heads * d
        self.register_buffer("m1", torch.tensor([1 << 30], dtype=torch.int64))
        self.register_buffer("s1", torch.tensor([36], dtype=torch.int64))
        self.register_buffer("m2", torch.tensor([1 << 30], dtype=torch.int64))
        self.register_buffer("s2", torch.tensor([33], dtype=torch.int64))
        n3 = c if per_channel else 1
        self.register_buffer("m3", torch.randint(1 << 29, 1 << 31, (n3,), dtype=torch.int64, generator=g))
        self.register_buffer("s3", torch.randint(29, 33, (n3,), dtype=torch.int64, generator=g))
        self.register_buffer("exp", I.exp_table(0.02, 65536))

    def forward(self, x, mask):
        b, s, _ = x.shape
        if self.fused:
            q, k, v = x.reshape(b, s, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)
            return self.attend(q, k, v, mask)
        c = self.h * self.d
        return self.attend(*(x[..., i * c:(i + 1) * c] for i in range(3)), mask)

    def heads(self, t):
        return t.reshape(t.shape[0], t.shape[1], self.h, self.d).transpose(1, 2)

    def attend(self, q, k, v, mask):
        """q, k, v: [b, s, heads, d] views, or [b, s, c] tensors (split into heads here)."""
        b, s = q.shape[0], (q.shape[2] if q.dim() == 4 else q.shape[1])
        if q.dim() == 3:
            q, k, v = self.heads(q), self.heads(k), self.heads(v)
        sc = qc.requant(qc.int_matmul(q, 0, k.transpose(-2, -1), 0), 0, self.m1, self.s1, 0, -32768, 32767, 0)
        p = qc.int_softmax(sc, (mask != 0).unsqueeze(1).unsqueeze(2) if self.masked else None, self.exp, -1,
                           2130706440, 24, 0, -128, 127)
        o = qc.requant(qc.int_matmul(p, 0, v, 0), 0, self.m2, self.s2, 0, -32768, 32767, 0)
        o = o.transpose(1, 2).reshape(b, s, self.h * self.d)
        return (qc.requant(o, 1, self.m3, self.s3, -2, -128, 127, -1),)


def _tir_calls(g):
    """What the sm90 translation of g computes besides extern calls, after dead-code elimination:
    its TIR kernels and Relax ops, by name."""
    from tvm import relax

    from qcompiler.backends.tvm.translate import to_relax
    mod = relax.transform.DeadCodeElimination(["main"])(to_relax(g, dot="sm90"))
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            name = e.op.name
            found.append(e.args[0].name_hint.rstrip("0123456789_") if name == "relax.call_tir" else
                         name.removeprefix("relax."))
    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _run_sm90_on_cpu(g, *inputs):
    from tvm import relax

    from qcompiler.backends.tvm.build import target_for
    from qcompiler.backends.tvm.pipeline import pipeline
    from qcompiler.backends.tvm.translate import to_relax
    _emulate_kernels()
    mod = to_relax(g, dot="sm90")
    target = target_for("llvm", None)
    with target:
        ex = tvm.compile(mod, target=target, relax_pipeline=pipeline(target))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(t.numpy(), tvm.cpu()) for t in inputs])
    return _externs(mod), [o.numpy() for o in out]


class PatchConvRequant(nn.Module):
    """A ViT's patch embedding in the integer graph: int_conv with stride = kernel, then a
    per-channel requant along axis 1."""
    def __init__(self, c=3, o=32, k=4, stride=None, padding=0, x_zp=5):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.register_buffer("w", torch.randint(-128, 128, (o, c, k, k), dtype=torch.int8, generator=g))
        self.register_buffer("b", torch.randint(-5000, 5000, (o,), dtype=torch.int32, generator=g))
        self.register_buffer("m", torch.randint(2**29, 2**31 - 1, (o,), dtype=torch.int64, generator=g))
        self.register_buffer("s", torch.randint(34, 40, (o,), dtype=torch.int64, generator=g))
        self.stride, self.padding, self.x_zp = stride or k, padding, x_zp

    def forward(self, x):
        acc = qc.int_conv(x, self.x_zp, self.w, self.b, [self.stride] * 2, [self.padding] * 2, [1, 1], 1)
        return qc.requant(acc, 0, self.m, self.s, -3, -128, 127, 1)


@pytest.mark.parametrize("stride,padding,gemm", [(4, 0, True), (2, 0, False), (4, 1, False)])
def test_patch_convolution_is_one_gemm_call_exact_on_cpu(stride, padding, gemm):
    """A convolution whose windows tile the input (stride = kernel, no padding) and its
    per-channel requant become one GEMM kernel call over the windows (the input's zero point in
    the bias), bit for bit the reference; overlapping or padded windows stay a convolution."""
    m = PatchConvRequant(stride=stride, padding=padding)
    x = torch.randint(-128, 128, (2, 3, 16, 12), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    g = qcompiler.trace(m, (x,), dynamic=None)
    ext, out = _run_sm90_on_cpu(g, x)
    assert any("gemm" in e for e in ext) == gemm, ext
    assert np.array_equal(out[0], g(x)[0].numpy())


@pytest.mark.parametrize("tokens,d,fused_qkv,masked,per_channel,hi", [
    (20, 32, False, True, True, False), (37, 64, True, False, True, True), (16, 32, True, True, False, False),
    (70, 64, False, True, True, True), (16, 32, True, True, False, True)])
def test_attention_block_is_one_kernel_call_exact_on_cpu(tokens, d, fused_qkv, masked, per_channel, hi, monkeypatch):
    """The block becomes one qc.cuda.int_attention call that reads q / k / v through the views'
    strides and writes the merged heads after the per-channel requant; its contract, emulated in
    torch, reproduces the op-by-op reference bit for bit (the kernel itself is checked against
    the same contract on the GPU by bench/gpu.py). hi: every shift 32..62, the kernel's hi variant;
    otherwise one of requant3's shifts is 31 and the block takes the general one."""
    from qcompiler.backends.tvm import cuda_kernels
    rng = np.random.default_rng(tokens)
    m = HeadsAttention(heads=3, d=d, fused_qkv=fused_qkv, masked=masked, per_channel=per_channel)
    m.s3 = torch.randint(32, 40, m.s3.shape, dtype=torch.int64) if hi else m.s3.clamp(max=31)
    if hi and tokens == 70:
        m.s2 = torch.tensor([30])  # requant2's shift scaled up to 32 for the hi kernel (hi_params)
    x = torch.from_numpy(rng.integers(-128, 128, (2, tokens, 3 * 3 * d)).astype(np.int8))
    mask = torch.from_numpy((rng.random((2, tokens)) > 0.3).astype(np.int64))
    mask[1] = 0
    g = qcompiler.trace(m, (x, mask), dynamic=None)
    ext, out = _run_sm90_on_cpu(g, x, mask)
    assert [e for e in ext if "attention" in e] == ["qc.cuda.int_attention" + ("_masked" if masked else "") +
                                                    ("_hi" if hi else "")]
    assert not any("softmax" in e or "gemm" in e for e in ext), ext
    assert np.array_equal(out[0], g(x, mask)[0].numpy())
    if hi:  # with the hi variant switched off the same block takes the general kernel
        monkeypatch.setattr(cuda_kernels, "ATTENTION_HI", False)
        from qcompiler.backends.tvm.translate import to_relax
        assert not any(e.endswith("_hi") for e in _externs(to_relax(g, dot="sm90")))


def test_attention_hi_table_from_factors_is_the_table():
    """fuse_attention.exp_factors: the kernel's entries, rint(H[d >> 8] L[d & 255]) (k = 0), or that
    where it is 2^-k clear of a tie and else a gather, are the table's for every d, in the same
    float64 arithmetic; tables it cannot reproduce, or whose entries past d = 0 need 17 bits or
    reach 0xFFFF (the kernel's 16-bit code of e(0)), are refused."""
    from qcompiler.backends.tvm.fuse_attention import FACTORS, exp_factors
    from qcompiler.backends.tvm.translate import softmax_table
    ks = []
    for scale, levels in ((0.02, 65536), (2e-4, 65536), (3e-5, 65536), (0.3, 256), (1.7e-3, 256)):
        t = softmax_table(I.exp_table(scale, levels).numpy()).astype(np.int64)
        fac, k, e0 = exp_factors(t)
        assert fac.shape == (2 * FACTORS,) and fac.dtype == np.float64 and e0 == t[0] == 2**16
        assert k == 0 or 8 <= k <= 40
        d = np.arange(t.size)
        p = fac[d >> 8] * fac[FACTORS + (d & (FACTORS - 1))]
        r = (p + 2.0**52) - 2.0**52
        near = np.abs(p - r) <= 0.5 - 2.0**-k if k else np.ones(t.size, bool)
        assert near.mean() > 0.99 and np.array_equal(r[near].astype(np.int64), t[near])
        ks.append(k)
    assert 0 in ks  # the models' scale (2e-4) needs no check on the device
    t = softmax_table(I.exp_table(1e-5, 65536).numpy()).astype(np.int64)
    assert t[1] == 0xFFFF and exp_factors(t) is None  # e(1) would read as e(0)'s code
    t = softmax_table(I.exp_table(2e-4, 65536).numpy()).astype(np.int64)
    t2 = t.copy()
    t2[1000] += 1  # not an exp_table: no scale reproduces it, every k fails at d = 1000 (or it takes the gather)
    got = exp_factors(t2)
    if got is not None:
        fac, k, _ = got
        p = fac[1000 >> 8] * fac[FACTORS + (1000 & 255)]
        assert abs(p - round(p)) > 0.5 - 2.0**-k
    assert exp_factors(np.array([2**16, 30000, 100, 5])) is None  # no single scale
    assert exp_factors(np.array([70000, 65535, 0])) is None  # e at d = 0 is 2^16 in an exp_table
    assert exp_factors(np.full(2**16 + 1, 1) * (np.arange(2**16 + 1) == 0) * 2**16) is None  # longer than 2^16


def test_attention_hi_takes_only_constants_it_computes():
    """fuse_attention.hi_ok: each constant attention_hi narrows or bounds, out of range, sends the
    block to the general kernel."""
    from qcompiler.backends.tvm.fuse_attention import hi_ok, hi_params, params
    view, mstr = [0, 4096, 64, 768], [0, 0, 0, 0]
    r1, sm, r2 = [0, 2**30, 36, -1, -32768, 32767], [2130706440, 24, 0, -128, 127], [0, 2**30, 33, 0, -128, 127]
    m3, s3 = np.full(768, 2**30, np.int64), np.full(768, 35, np.int64)
    r3 = [1, m3, s3, -3, -128, 127]

    def ok(r1=r1, sm=sm, r2=r2, r3=r3, m3=m3, s3=s3):
        rr3 = None if r3 is None else [r3[0], m3, s3, *r3[3:]]
        return hi_ok(params(view, view, view, view, mstr, r1, sm, r2, rr3), m3, s3)
    assert ok() and ok(r3=None)
    assert not ok(r1=[1, *r1[1:]]) and not ok(r2=[1, *r2[1:]])  # in_zp
    assert not ok(r1=[0, 2**39, *r1[2:]]) and not ok(r2=[0, 2**39, *r2[2:]]) and ok(r1=[0, 2**38, *r1[2:]])
    assert not ok(r1=[0, 2**30, 31, *r1[3:]]) and not ok(r2=[0, 2**30, 63, *r2[3:]])  # shifts
    assert not ok(r1=[*r1[:4], -32769, 32767]) and not ok(r1=[*r1[:5], 32768])  # scores beyond int16
    assert not ok(sm=[0, *sm[1:]]) and not ok(sm=[2**45 + 1, 24, *sm[2:]]) and ok(sm=[2**44, 24, *sm[2:]])
    assert not ok(s3=np.where(np.arange(768) == 5, 31, s3)) and not ok(m3=np.where(np.arange(768) == 5, 2**31, m3))
    assert not ok(r3=[2**16 + 1, *r3[1:]]) and ok(r3=None, s3=np.full(1, 0, np.int64))
    # hi_params scales requant1's / requant2's shifts below 32 up to 32, multipliers with them
    prm = params(view, view, view, view, mstr, [0, 2**30, 30, -1, -32768, 32767], sm, [0, 3 * 2**29, 31, 0, -128, 127],
                 None)
    assert not hi_ok(prm, m3, s3) and hi_ok(hi_params(prm), m3, s3)
    assert list(hi_params(prm)[20:23]) == [0, 2**32, 32] and list(hi_params(prm)[31:34]) == [0, 3 * 2**30, 32]
    prm[21], prm[22] = 2**30, 5  # 2^30 2^27 would reach 2^39: left as it is
    assert list(hi_params(prm)[20:23]) == [0, 2**30, 5] and not hi_ok(hi_params(prm), m3, s3)


def test_attention_kernel_declines_blocks_it_does_not_compute():
    """Head size 48 and more than 256 keys take the op-by-op path (and stay exact there)."""
    from qcompiler.backends.tvm.translate import to_relax
    for tokens, d in ((20, 48), (260, 32)):
        x = torch.zeros(1, tokens, 3 * 2 * d, dtype=torch.int8)
        g = qcompiler.trace(HeadsAttention(heads=2, d=d), (x, torch.ones(1, tokens, dtype=torch.int64)), dynamic=None)
        assert not any("attention" in e for e in _externs(to_relax(g, dot="sm90")))


class AddNormRequant(nn.Module):
    """A post-LN residual: int_add -> int_layer_norm (int16), read by the next residual add and,
    through a per-channel int8 requant, by the next linears."""

    def __init__(self, c=64, add_users=1, s_y=0.05, rq_shifts=(20, 34)):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.add_users = add_users
        self.ln = I.layer_norm_consts(torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g), c, 1e-5, 0.01,
                                      s_y, in_levels=65536)
        self.register_buffer("gamma", self.ln[2])
        self.register_buffer("beta", self.ln[3])
        self.register_buffer("m", torch.randint(1 << 29, 1 << 31, (c,), dtype=torch.int64, generator=g))
        self.register_buffer("s", torch.randint(*rq_shifts, (c,), dtype=torch.int64, generator=g))

    def forward(self, a, b):
        eps, k, _g, _b, shift = self.ln
        x = qc.int_add(a, 3, 1439302324, b, -2, -881062436, 31, 1, -32768, 32767)
        y = qc.int_layer_norm(x, 5, eps, k, self.gamma, self.beta, shift, 0, -32768, 32767)
        q = qc.requant(y, 1, self.m, self.s, -3, -128, 127, -1)
        out = (q, qc.int_add(y, 0, 1 << 30, a, 0, 1 << 29, 30, 0, -32768, 32767))
        return out + ((x,) if self.add_users > 1 else ())


@pytest.mark.parametrize("add_users", [1, 2])
def test_add_layer_norm_requant_is_one_kernel_call_exact_on_cpu(add_users):
    """The residual add (when the LayerNorm is its only reader) and the per-channel requant after
    the LayerNorm go into the LayerNorm's kernel call; exact against the reference."""
    rng = np.random.default_rng(add_users)
    a, b = (torch.from_numpy(rng.integers(-32768, 32768, (2, 24, 64)).astype(np.int16)) for _ in range(2))
    g = qcompiler.trace(AddNormRequant(add_users=add_users), (a, b), dynamic=None)
    ext, out = _run_sm90_on_cpu(g, a, b)
    assert ext.count("qc.cuda.int_layer_norm_requant") == 1 and "qc.cuda.int_layer_norm" not in ext, ext
    assert _tir_calls(g).count("int_add") == add_users  # the residual's own add stays; the fused one is gone
    for r, o in zip(g(a, b), out):
        assert np.array_equal(o, r.numpy())


@pytest.mark.parametrize("s_y", [0.05, 0.0001])
def test_add_layer_norm_requant_hi_scales_shifts_below_32_exact_on_cpu(s_y):
    """With the requant's shifts 32..39, the add's shift 31 (and, at s_y 0.0001, the LayerNorm's
    shift 31) are scaled up to 32 with their multipliers (the same integers), and the call takes
    the hi kernel; the emulation checks its contract, the outputs match the reference."""
    rng = np.random.default_rng(7)
    a, b = (torch.from_numpy(rng.integers(-32768, 32768, (2, 24, 64)).astype(np.int16)) for _ in range(2))
    m = AddNormRequant(s_y=s_y, rq_shifts=(32, 40))
    assert (m.ln[4] < 32) == (s_y < 0.01)
    g = qcompiler.trace(m, (a, b), dynamic=None)
    ext, out = _run_sm90_on_cpu(g, a, b)
    assert ext.count("qc.cuda.int_layer_norm_requant_hi") == 1, ext
    for r, o in zip(g(a, b), out):
        assert np.array_equal(o, r.numpy())
    # with one requant shift of 31 it cannot: the general kernel, the constants as they were
    m.s[3] = 31
    ext, out = _run_sm90_on_cpu(qcompiler.trace(m, (a, b), dynamic=None), a, b)
    assert ext.count("qc.cuda.int_layer_norm_requant") == 1 and not any(e.endswith("_hi") and "layer_norm" in e
                                                                         for e in ext), ext


def test_scale_shift_up_keeps_the_rounding_shift():
    from qcompiler.backends.tvm.cuda_kernels import scale_shift_up
    g = torch.Generator().manual_seed(2)
    p = torch.randint(-2**30, 2**30, (10000,), generator=g)  # p 2^32 stays within int64
    p[:100] = (torch.arange(100) * 2 + 1 - 100) << 16  # ties at shift 17
    for c in (0, 1, 17, 30, 31):
        (m,), c2 = scale_shift_up([np.ones(1, np.int64)], c, 40)
        assert c2 == 32 and int(m[0]) == 2 ** (32 - c)
        assert torch.equal(I.rshift_round(p * int(m[0]), c2), I.rshift_round(p, c))
    assert scale_shift_up([np.full(3, 2**30)], 31, 31) is None and scale_shift_up([np.full(3, 2**30)], 31, 32)
    assert scale_shift_up([np.full(3, 5)], 40, 31)[1] == 40


class LinearsAttention(nn.Module):
    """q, k, v as three int8 linears (+ requant) of one input, as MiniLM / BERT: one GEMM computes
    all three (their weights concatenated), the attention kernel reads its columns. expose_v: v's
    requantized output is also a model output (a reader that needs the columns as a tensor)."""

    def __init__(self, c=64, heads=2, expose_v=False):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.heads, self.expose_v = heads, expose_v
        self.att = HeadsAttention(heads=heads, d=c // heads, per_channel=True)
        for i in range(3):
            self.register_buffer(f"w{i}", torch.randint(-128, 128, (c, c), dtype=torch.int8, generator=g))
            self.register_buffer(f"b{i}", torch.randint(-5000, 5000, (c,), dtype=torch.int32, generator=g))
            self.register_buffer(f"m{i}", torch.randint(1 << 29, 1 << 31, (c if i else 1,), dtype=torch.int64,
                                                        generator=g))
            self.register_buffer(f"s{i}", torch.full((c if i else 1,), 20 + i, dtype=torch.int64))

    def forward(self, x, mask):
        qkv = [qc.requant(qc.int_linear(x, 0, getattr(self, f"w{i}"), getattr(self, f"b{i}")), 0,
                          getattr(self, f"m{i}"), getattr(self, f"s{i}"), 0, -128, 127, -1) for i in range(3)]
        out = self.att.attend(*qkv, mask)
        return out + ((qkv[2],) if self.expose_v else ())


@pytest.mark.parametrize("expose_v", [False, True])
def test_sibling_linears_are_one_gemm_read_by_the_attention_kernel_exact_on_cpu(expose_v):
    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.integers(-128, 128, (2, 24, 64)).astype(np.int8))
    mask = torch.from_numpy((rng.random((2, 24)) > 0.3).astype(np.int64))
    g = qcompiler.trace(LinearsAttention(expose_v=expose_v), (x, mask), dynamic=None)
    ext, out = _run_sm90_on_cpu(g, x, mask)
    assert sum("gemm" in e for e in ext) == 1 and ext.count("qc.cuda.int_attention_masked") == 1, ext
    assert _tir_calls(g).count("strided_slice") == int(expose_v)  # the columns copied only for the other reader
    for r, o in zip(g(x, mask), out):
        assert np.array_equal(o, r.numpy())


class PreNorm(nn.Module):
    """A pre-LN residual: x = int_add(a, b) feeds int_layer_norm (int8 out) and the next residual add."""

    def __init__(self, c=64):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.ln = I.layer_norm_consts(torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g), c, 1e-5, 0.01,
                                      0.05, in_levels=65536)
        self.register_buffer("gamma", self.ln[2])
        self.register_buffer("beta", self.ln[3])

    def forward(self, a, b, c):
        eps, k, _g, _b, shift = self.ln
        x = qc.int_add(a, 3, 1439302324, b, -2, -881062436, 31, 1, -32768, 32767)
        y = qc.int_layer_norm(x, 5, eps, k, self.gamma, self.beta, shift, 2, -128, 127)
        return y, qc.int_add(x, 0, 1 << 30, c, 0, 1 << 29, 30, 0, -32768, 32767)


def test_pre_norm_add_is_computed_by_the_layer_norm_kernel_exact_on_cpu():
    """The add's sum, read by the LayerNorm and by the next residual add, comes out of the
    LayerNorm's kernel call (the add's own kernel is gone)."""
    rng = np.random.default_rng(4)
    a, b, c = (torch.from_numpy(rng.integers(-32768, 32768, (2, 24, 64)).astype(np.int16)) for _ in range(3))
    g = qcompiler.trace(PreNorm(), (a, b, c), dynamic=None)
    ext, out = _run_sm90_on_cpu(g, a, b, c)
    assert ext == ["qc.cuda.int_add_layer_norm_hi"], ext  # the add's shift 31 scaled to 32: the hi kernel
    assert _tir_calls(g).count("int_add") == 1
    for r, o in zip(g(a, b, c), out):
        assert np.array_equal(o, r.numpy())


@pytest.mark.gpu
def test_attention_block_bit_exact_on_gpu():
    """The fused attention kernel itself, run through the translation (the same graphs as the CPU
    tests above, but the real qc.cuda.int_attention on the GPU), against the reference."""
    import ctypes

    from tvm import relax

    from qcompiler.backends.tvm.build import target_for
    from qcompiler.backends.tvm.cuda_kernels import build_library
    from qcompiler.backends.tvm.pipeline import pipeline
    from qcompiler.backends.tvm.translate import to_relax
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ctypes.CDLL(build_library("sm_90"), mode=ctypes.RTLD_GLOBAL)
    rng = np.random.default_rng(5)
    for tokens, d, fused_qkv, masked in ((128, 64, False, True), (197, 64, True, False), (77, 32, False, True)):
        m = HeadsAttention(heads=3, d=d, fused_qkv=fused_qkv, masked=masked)
        x = torch.from_numpy(rng.integers(-128, 128, (2, tokens, 9 * d)).astype(np.int8))
        mask = torch.from_numpy((rng.random((2, tokens)) > 0.3).astype(np.int64))
        mask[1] = 0
        g = qcompiler.trace(m, (x, mask), dynamic=None)
        target = target_for("cuda", "sm_90")
        with target:
            ex = tvm.compile(to_relax(g, dot="sm90"), target=target, relax_pipeline=pipeline(target))
        dev = tvm.cuda()
        out = relax.VirtualMachine(ex, dev)["main"](*[tvm.runtime.tensor(t.numpy(), dev) for t in (x, mask)])
        assert np.array_equal(out[0].numpy(), g(x, mask)[0].numpy()), (tokens, d, fused_qkv, masked)
