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
    # the linear declines; the matmul's N = 40 is zero-padded to 48 (its requant is per tensor)
    assert _externs(_translate(narrow, ex)) == ["qc.cuda.gemm_s8_requant_128x128"]


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


def test_softmax_lut_layer_norm_become_kernel_calls():
    from qcompiler.backends.tvm.cuda_kernels import (LAYER_NORM_FUNC, LUT_FUNC, LUT_REQUANT_FUNC, SOFTMAX_FUNC,
                                                     SOFTMAX_MASKED_FUNC)
    from qcompiler.backends.tvm.translate import to_relax
    g = qcompiler.trace(_row_ops(), _ROW_EX, dynamic=None)
    calls = sorted(_externs(to_relax(g, dot="sm90")))
    assert calls == sorted([SOFTMAX_MASKED_FUNC, SOFTMAX_FUNC, LUT_REQUANT_FUNC, LUT_FUNC, LAYER_NORM_FUNC])
    assert _externs(to_relax(g, dot=None)) == []  # tvm-llvm (and non-Hopper CUDA) keep the generic kernels


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
    from qcompiler.backends.tvm.translate import softmax_table
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
    f(LUT_REQUANT_FUNC)(d(x.cuda()), d(table.to(torch.int32).cuda()), -32768, 3, d(m.cuda()), d(c.cuda()), -2, -128, 127,
                        d(y))
    torch.cuda.synchronize()
    assert torch.equal(y.cpu(), ref)
    eps, k, gamma, beta, shift = I.layer_norm_consts(torch.rand(384, generator=g) + 0.5, torch.randn(384, generator=g),
                                                     384, 1e-5, 0.01, 0.05, in_levels=65536)
    x = torch.randint(-32768, 32768, (100, 384), dtype=torch.int16, generator=g)
    x[0], x[1] = 5, torch.where(torch.arange(384) % 2 == 1, 32767, -32768)
    ref = I.int_layer_norm(x, 5, eps, k, gamma, beta, shift, 0, -32768, 32767)
    y = torch.empty(100, 384, dtype=torch.int16, device="cuda")
    f(LAYER_NORM_FUNC)(d(x.cuda()), 5, eps, k, d(gamma.cuda()), d(beta.cuda()), shift, 0, -32768, 32767, d(y))
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

    def gemm(out):
        def f(x, w, bias, mult, shift, out_zp, qmin, qmax, y):
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

    def layer_norm(x, x_zp, eps, k, gamma, beta, shift, out_zp, qmin, qmax, y):
        T(y).copy_(I.int_layer_norm(T(x), x_zp, eps, k, T(gamma), T(beta), shift, out_zp, qmin, qmax))

    for tile in K.GEMM_TILES:
        for out in K.GEMM_OUTS:
            tvm_ffi.register_global_func(K.gemm_func(tile, out), gemm(out), override=True)
    for name, f in ((K.SOFTMAX_FUNC, softmax), (K.SOFTMAX_MASKED_FUNC, softmax_masked), (K.LUT_FUNC, lut),
                    (K.LUT_REQUANT_FUNC, lut_requant), (K.LAYER_NORM_FUNC, layer_norm)):
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
    """Token counts that are not multiples of 16 pad K and N of both attention GEMMs."""
    from tvm import relax

    from qcompiler.backends.tvm.build import target_for
    from qcompiler.backends.tvm.pipeline import pipeline
    from qcompiler.backends.tvm.translate import to_relax
    _emulate_kernels()
    rng = np.random.default_rng(tokens)
    q, k, v = (torch.from_numpy(rng.integers(-128, 128, (2, 3, tokens, 32)).astype(np.int8)) for _ in range(3))
    mask = torch.from_numpy((rng.random((2, tokens)) > 0.3).astype(np.int64))  # an attention_mask, as the models'
    mask[1] = 0  # fully masked rows: out_zp
    g = qcompiler.trace(Attention(masked), (q, k, v, mask), dynamic=None)
    mod = to_relax(g, dot="sm90")
    ext = _externs(mod)
    assert sum("softmax" in e for e in ext) == 1 and sum("gemm" in e for e in ext) == 2, ext
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
