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


def test_int8_linear_and_matmul_with_requant_become_one_kernel_call():
    ex = (torch.zeros(2, 16, 32, dtype=torch.int8), torch.zeros(2, 32, 48, dtype=torch.int8))
    calls = _translate(LinearRequant(), ex)
    assert calls and sorted(_externs(calls)) == ["qc.cuda.gemm_s8_requant_128x128"] * 2


def test_int16_out_requant_uses_the_int16_kernel():
    ex = (torch.zeros(2, 16, 32, dtype=torch.int8), torch.zeros(2, 32, 48, dtype=torch.int8))
    assert sorted(_externs(_translate(LinearRequant(out_int16=True), ex))) == \
        ["qc.cuda.gemm_s8_requant_128x128", "qc.cuda.gemm_s8_requant_i16_128x128"]


def test_kernel_call_declines_what_the_kernel_does_not_compute():
    ex = (torch.zeros(2, 16, 32, dtype=torch.int8), torch.zeros(2, 32, 40, dtype=torch.int8))  # N = 40: not % 16
    narrow = LinearRequant()
    narrow.q = (-100, 100)  # a clamp narrower than the output dtype: not the kernel's saturation
    assert _externs(_translate(narrow, ex)) == []  # and the matmul: N % 16 != 0


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
            assert tvm_ffi.get_global_func(gemm_func(t, out)) is not None


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
