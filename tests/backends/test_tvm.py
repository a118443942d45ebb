"""The tvm-llvm backend is bit-exact against the reference kernels (qcompiler/int_ops.py):
each integer op on adversarial inputs (saturation, rounding ties, per-channel multipliers and
shifts, masked rows, zero divisors), every bundled model through the saved artifact, and the
artifact runs without importing tvm."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import qcompiler
from qcompiler import int_ops as I
from qcompiler.errors import QCError

tvm = pytest.importorskip("tvm")
qc = torch.ops.qc
pytestmark = pytest.mark.filterwarnings("ignore")


def build(module, example, dynamic="batch", mcpu=None, **trace_kw):
    """(reference graph, tvm VM main) for a module calling qc:: ops on its buffers (on this CPU,
    or for LLVM cpu `mcpu`)."""
    from tvm import relax

    from qcompiler.backends.tvm.build import int8_dot, target_for
    from qcompiler.backends.tvm.pipeline import pipeline
    from qcompiler.backends.tvm.translate import to_relax
    g = qcompiler.trace(module, example, dynamic=dynamic, **trace_kw)
    target = target_for("llvm", mcpu)
    with target:
        mod = to_relax(g, dot=int8_dot(target), kind="llvm")
        ex = tvm.compile(mod, target=target, relax_pipeline=pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    main = vm["main"]
    main.kernels = [gv.name_hint for gv in mod.functions]
    return g, main


def _dot() -> str | None:
    from qcompiler.backends.tvm.build import int8_dot, target_for
    return int8_dot(target_for("llvm", None))


def _calls(main, part: str, where=("vnni", "amx", "avx2")) -> bool:
    """Whether the module has a kernel whose name contains `part`; True where this CPU's int8
    dot product (build.int8_dot) is not one of `where` (the generic schedules run there)."""
    return _dot() not in where or any(part in k for k in main.kernels)


def _uses(main, part: str, mcpu: str | None) -> bool:
    """_calls for this CPU (mcpu None); for a named CPU with an int8 kernel, whether it is used."""
    return _calls(main, part) if mcpu is None else any(part in k for k in main.kernels)


def check(g, main, *inputs):
    ref = g(*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
    out = main(*[tvm.runtime.tensor(np.ascontiguousarray(x), tvm.cpu()) for x in inputs])
    for r, o in zip(ref, out):
        o = o.numpy()
        assert str(o.dtype) == str(r.dtype).replace("torch.", ""), (o.dtype, r.dtype)
        assert o.shape == tuple(r.shape)
        assert np.array_equal(o, r.numpy()), f"{np.sum(o != r.numpy())} of {o.size} differ"
    return ref


class Requant(nn.Module):
    def __init__(self, mult, shift, in_zp=0, out_zp=0, qmin=-128, qmax=127, axis=-1):
        super().__init__()
        b, c = I.dyadic(torch.as_tensor(mult, dtype=torch.float64))
        self.register_buffer("b", b)
        self.register_buffer("c", c if shift is None else torch.as_tensor(shift, dtype=torch.int64))
        self.args = (in_zp, out_zp, qmin, qmax, axis)

    def forward(self, acc):
        in_zp, out_zp, qmin, qmax, axis = self.args
        return qc.requant(acc, in_zp, self.b, self.c, out_zp, qmin, qmax, axis)


@pytest.mark.parametrize("per_channel", [False, True])
def test_requant_saturation_ties_and_shifts(per_channel):
    rng = np.random.default_rng(0)
    c = 16
    mult = rng.uniform(1e-4, 0.9, c) if per_channel else 0.0371
    g, main = build(Requant(mult, None, in_zp=3, out_zp=-5), (torch.zeros(2, c, dtype=torch.int32),))
    acc = rng.integers(-2**31 + 8, 2**31 - 8, size=(64, c)).astype(np.int32)  # saturates both ends
    acc[:4] = rng.integers(-300, 300, size=(4, c))
    check(g, main, acc)


class Ops(nn.Module):
    """forward(*xs) = fn(self, *xs): qc:: ops on the buffers given as keyword tensors."""

    def __init__(self, fn, **buffers):
        super().__init__()
        self.fn = fn
        for k, v in buffers.items():
            self.register_buffer(k, v)

    def forward(self, x0, x1=None, x2=None, x3=None):
        return self.fn(self, *[x for x in (x0, x1, x2, x3) if x is not None])


@pytest.mark.parametrize("shift", [0, 1, 2, 13, 31, 62])
def test_requant_exact_ties_round_half_away(shift):
    """b = 1, shift c: acc / 2^c at every kind of tie (odd multiples of 2^(c-1)), both signs."""
    m = Ops(lambda s, a: qc.requant(a, 0, s.b, s.c, 0, -(2**31), 2**31 - 1, -1),
            b=torch.tensor([1]), c=torch.tensor([shift]))
    g, main = build(m, (torch.zeros(2, 4, dtype=torch.int32),))
    half = 1 << max(shift - 1, 0)
    acc = np.clip([half, 3 * half, -half, -3 * half, 0, 1, -1, 2**31 - 1], -2**31, 2**31 - 1)
    check(g, main, acc.astype(np.int32).reshape(2, 4))


def test_quantize_ties_to_even_and_dequantize_per_channel():
    scale = torch.tensor([0.5, 0.25, 1.0, 0.1])
    zp = torch.tensor([0, 3, -2, 1], dtype=torch.int32)
    m = Ops(lambda s, x: (qc.quantize(x, s.scale, s.zp, -128, 127, 1),
                          qc.dequantize(qc.quantize(x, s.scale, s.zp, -128, 127, 1), s.scale, s.zp, 1)),
            scale=scale, zp=zp)
    g, main = build(m, (torch.zeros(2, 4),))
    x = (np.arange(-12, 12, dtype=np.float32) / 4.0).reshape(6, 4) * scale.numpy() * 2  # exact .5 ties
    x = np.concatenate([x, np.array([[1e6, -1e6, 300.0, -300.0]], np.float32)])  # saturation
    check(g, main, x)


def test_int_linear_matmul_conv_with_zero_points():
    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.integers(-128, 128, (8, 16)).astype(np.int8))
    bias = torch.from_numpy(rng.integers(-5000, 5000, 8).astype(np.int32))
    wc = torch.from_numpy(rng.integers(-128, 128, (6, 4, 3, 3)).astype(np.int8))
    wg = torch.from_numpy(rng.integers(-128, 128, (6, 2, 3, 3)).astype(np.int8))
    m = Ops(lambda s, x, a, b, img: (qc.int_linear(x, 0, s.w, s.bias), qc.int_linear(x, -7, s.w, None),
                                     qc.int_matmul(a, 0, b, 0), qc.int_matmul(a, 5, b, -3),
                                     qc.int_conv(img, 0, s.wc, s.bias[:6], [1, 1], [1, 1], [1, 1], 1),
                                     qc.int_conv(img, 9, s.wg, None, [2, 2], [1, 1], [1, 1], 2)),
            w=w, bias=bias, wc=wc, wg=wg)
    ex = (torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, 3, 5, 16, dtype=torch.int8),
          torch.zeros(2, 3, 16, 7, dtype=torch.int8), torch.zeros(2, 4, 9, 9, dtype=torch.uint8))
    g, main = build(m, ex)
    check(g, main, rng.integers(-128, 128, (5, 16)).astype(np.int8),
          np.full((5, 3, 5, 16), -128, np.int8), rng.integers(-128, 128, (5, 3, 16, 7)).astype(np.int8),
          rng.integers(0, 256, (5, 4, 9, 9)).astype(np.uint8))


@pytest.mark.parametrize("dtype,zp", [(np.int8, 0), (np.int8, -3), (np.uint8, 128), (np.uint8, 0)])
def test_int_linear_dot_product_kernel_shapes(dtype, zp):
    """Shapes the CPU's VNNI kernel takes (out % 16 == 0, in % 4 == 0), where the machine has it:
    u8 x s8 with the zero-point / +128 correction, saturating codes at both ends."""
    rng = np.random.default_rng(5)
    w = torch.from_numpy(rng.integers(-128, 128, (48, 24)).astype(np.int8))
    w[0] = -128
    m = Ops(lambda s, x: qc.int_linear(x, zp, s.w, None), w=w)
    info = np.iinfo(dtype)
    g, main = build(m, (torch.zeros(2, 3, 24, dtype=getattr(torch, np.dtype(dtype).name)),))
    x = rng.integers(info.min, info.max + 1, (5, 3, 24)).astype(dtype)
    x[0, 0], x[0, 1] = info.min, info.max
    check(g, main, x)


def _has_avx2() -> bool:
    from tvm.target import codegen

    from qcompiler.backends.tvm.build import target_for
    return bool(codegen.target_has_features("avx2", target_for("llvm", None)))


# the CPU's own int8 kernels (VNNI / AMX / AVX2, whichever it has), and the AVX2 kernel on any
# CPU that has AVX2 (a CPU with VNNI runs both)
ISAS = [None, pytest.param("haswell", marks=pytest.mark.skipif("not _has_avx2()", reason="no AVX2 here"))]


@pytest.mark.parametrize("mcpu", ISAS)
@pytest.mark.parametrize("qrange,per_channel,n_out", [((-128, 127), True, 48), ((0, 255), False, 48),
                                                      ((-32768, 32767), True, 48), ((-128, 127), True, 40)])
def test_vnni_linear_with_requant_epilogue(qrange, per_channel, n_out, mcpu):
    """A linear whose requant the int8 kernel computes in its epilogue: bias, input and output
    zero points, per-column multipliers and shifts (0, ties at 1, large), saturation at both
    ends, int8 / uint8 / int16 out; weights at -128 and 127 (u = 255 times them: where
    vpmaddubsw's int16 pair sums would saturate). 40 outputs: 5 blocks of 8 on AVX2 (an odd
    count), the generic linear where blocks are 16 wide."""
    rng = np.random.default_rng(6)
    w = torch.from_numpy(rng.integers(-128, 128, (n_out, 24)).astype(np.int8))
    w[1], w[2] = -128, 127
    bias = torch.from_numpy(rng.integers(-40000, 40000, n_out).astype(np.int32))
    mult = rng.uniform(1e-4, 0.05, n_out) if per_channel else 0.0123
    shift = torch.from_numpy(np.resize([0, 1, 2, 9, 17, 40], n_out).astype(np.int64)) if per_channel else None
    req = Requant(mult, shift, in_zp=-11, out_zp=7, qmin=qrange[0], qmax=qrange[1])
    if per_channel:  # multipliers small enough that shift 0 and 1 do not saturate everything
        req.b = torch.from_numpy(rng.integers(1, 4, n_out).astype(np.int64))
    m = Ops(lambda s, x: s.req(qc.int_linear(x, -3, s.w, s.bias)), w=w, bias=bias)
    m.req = req
    g, main = build(m, (torch.zeros(2, 3, 24, dtype=torch.int8),), mcpu=mcpu)
    if n_out % (8 if "avx2" in (_dot(), mcpu and "avx2") else 16) == 0:
        assert _uses(main, f"qc_dot_u8s8_24x{n_out}_rq", mcpu), "the requant is not in the kernel's epilogue"
    x = rng.integers(-128, 128, (5, 3, 24)).astype(np.int8)
    x[0, 0], x[0, 1] = -128, 127
    check(g, main, x)


@pytest.mark.parametrize("mcpu", ISAS)
@pytest.mark.parametrize("shared_out", [True, False])
def test_sibling_linears_one_kernel_call(shared_out, mcpu):
    """Linears reading one input (attention's q, k, v) with requants of one output zero point and
    range run as one kernel call over their concatenated weights: per-column multipliers of
    each, per-tensor ones broadcast, different input zero points and biases, saturation; each
    requant's value is its columns. With one output zero point different, each runs alone."""
    rng = np.random.default_rng(13)
    ws = [torch.from_numpy(rng.integers(-128, 128, (n, 32)).astype(np.int8)) for n in (48, 16, 32)]
    bs = [torch.from_numpy(rng.integers(-30000, 30000, w.shape[0]).astype(np.int32)) for w in ws]
    reqs = [Requant(rng.uniform(1e-4, 0.02, 48), None, in_zp=-4, out_zp=2),
            Requant(0.0071, None, in_zp=9, out_zp=2 if shared_out else 5),
            Requant(rng.uniform(1e-4, 0.02, 32), torch.from_numpy(np.resize([0, 1, 7, 20], 32).astype(np.int64)),
                    in_zp=0, out_zp=2)]
    reqs[2].b = torch.from_numpy(rng.integers(1, 3, 32).astype(np.int64))  # shift 0 and 1 without saturating all

    def fn(s, x):
        return tuple(r(qc.int_linear(x, 6, w, b)) for r, w, b in zip((s.r0, s.r1, s.r2), (s.w0, s.w1, s.w2),
                                                                         (s.b0, s.b1, s.b2)))
    m = Ops(fn, w0=ws[0], w1=ws[1], w2=ws[2], b0=bs[0], b1=bs[1], b2=bs[2])
    m.r0, m.r1, m.r2 = reqs
    g, main = build(m, (torch.zeros(2, 5, 32, dtype=torch.int8),), mcpu=mcpu)
    dots = [k for k in main.kernels if "qc_dot_u8s8" in k or "qc_amx_dot" in k]
    if mcpu or _dot() in ("vnni", "amx", "avx2"):
        assert len(dots) == (1 if shared_out else 3) and (not shared_out or any("x96" in k for k in dots)), dots
    x = rng.integers(-128, 128, (7, 5, 32)).astype(np.int8)
    x[0, 0], x[0, 1] = -128, 127
    check(g, main, x)


@pytest.mark.parametrize("w_max", [64, 65])
def test_avx2_seven_bit_weights_vpmaddubsw(w_max):
    """On AVX2, a linear whose weights all lie in [-64, 64] runs on vpmaddubsw (u8 x s8 pairs into
    int16, exact there: 255 x 64 x 2 = 32640), one with a weight of 65 on the int16 kernel: both
    bit-exact with u = 255 against w = +-64 (the largest pair sums), zero points, per-column
    requant; and as a group of sibling linears."""
    if not _has_avx2():
        pytest.skip("no AVX2 here")
    rng = np.random.default_rng(14)
    w = torch.from_numpy(rng.integers(-64, 65, (48, 40)).astype(np.int8))
    w[0], w[1, :20], w[1, 20:] = 64, -64, 64
    w[2, 2], w[2, 3] = 64, w_max  # the pair (k 2, k 3): 255 x 129 > 32767 where a 65 took vpmaddubsw
    w2 = torch.from_numpy(rng.integers(-30, 31, (16, 40)).astype(np.int8))
    bias = torch.from_numpy(rng.integers(-9000, 9000, 48).astype(np.int32))
    m = Ops(lambda s, x: (s.req(qc.int_linear(x, 3, s.w, s.bias)), s.req2(qc.int_linear(x, 3, s.w2, None))),
            w=w, w2=w2, bias=bias)
    m.req = Requant(rng.uniform(1e-4, 0.01, 48), None, in_zp=2, out_zp=-1)
    m.req2 = Requant(0.003, None, out_zp=-1)
    g, main = build(m, (torch.zeros(2, 40, dtype=torch.int8),), mcpu="haswell")
    s7 = [k for k in main.kernels if k.startswith("qc_dot_u8s8") and "_s7" in k]
    assert bool(s7) == (w_max == 64), main.kernels
    x = rng.integers(-128, 128, (9, 40)).astype(np.int8)
    x[0], x[1] = 127, -128  # u = 255 and 0
    check(g, main, x)


@pytest.mark.parametrize("rows", [3, 150, 257])
def test_avx2_row_chunks(rows):
    """The AVX2 kernels split the rows into chunks of about 128 KB of u (64 rows at K = 1024 for
    int16 u, 128 for uint8), of equal size: every row computed once, at row counts that leave a
    short last block; int16 (8-bit weights) and vpmaddubsw (7-bit) kernels."""
    if not _has_avx2():
        pytest.skip("no AVX2 here")
    rng = np.random.default_rng(15)
    w8 = torch.from_numpy(rng.integers(-128, 128, (16, 1024)).astype(np.int8))
    w7 = torch.from_numpy(rng.integers(-64, 65, (24, 1024)).astype(np.int8))
    m = Ops(lambda s, x, y: (s.req(qc.int_linear(x, 1, s.w8, None)), s.req(qc.int_linear(y, -2, s.w7, None))),
            w8=w8, w7=w7)
    m.req = Requant(2e-4, None, out_zp=3)
    g, main = build(m, (torch.zeros(2, 1024, dtype=torch.int8), torch.zeros(2, 1024, dtype=torch.int8)), mcpu="haswell")
    assert any("_s7" in k for k in main.kernels) and any("qc_dot_u8s8_1024x16" in k and "_s7" not in k
                                                          for k in main.kernels), main.kernels
    check(g, main, *(rng.integers(-128, 128, (rows, 1024)).astype(np.int8) for _ in range(2)))


def test_packed_block_layouts():
    """vnni.pack's byte order and the in-kernel packing's inverse (Isa.col_row) agree for both
    instruction sets, and a block's dot products, computed the way each instruction reads it
    (VNNI: 4 bytes per lane; AVX2: two int16 pairs per lane from the block's two halves), are
    the matrix product."""
    from qcompiler.backends.tvm import vnni
    rng = np.random.default_rng(12)
    for isa in (vnni.VNNI, vnni.AVX2):
        L = isa.lanes
        for q in range(4 * L):
            c, r = (eval(e, {"q": q}) for e in isa.col_row("q"))
            assert isa.pos(c, r) == q and eval(isa.pos("c", "r"), {"c": c, "r": r}) == q
        w = rng.integers(-128, 128, (3 * L, 12)).astype(np.int8)
        u = rng.integers(0, 256, 12).astype(np.int64)
        p = vnni.pack(w, isa)[0].astype(np.int64)  # [n / L, k / 4, 4L]
        out = np.zeros(3 * L, np.int64)
        for jb in range(3):
            for kb in range(3):
                blk, a = p[jb, kb], u[kb * 4:kb * 4 + 4]
                if isa is vnni.VNNI:
                    out[jb * L:(jb + 1) * L] += (blk.reshape(L, 4) * a).sum(1)
                else:
                    for h in range(2):
                        out[jb * L:(jb + 1) * L] += (blk[2 * L * h:2 * L * (h + 1)].reshape(L, 2) * a[2 * h:2 * h + 2]).sum(1)
        assert (out == w.astype(np.int64) @ u).all()


@pytest.mark.parametrize("rows", [5, 64, 77])
def test_amx_linear_tiles_and_row_tails(rows):
    """Linears on AMX tiles where the CPU has them (k % 64 == 0, n % 32 == 0): blocks of 32 rows
    and a zero-padded last block, per-column requant in the epilogue, and the int32 product
    where the linear's output is used twice (no epilogue)."""
    rng = np.random.default_rng(9)
    w = torch.from_numpy(rng.integers(-128, 128, (64, 128)).astype(np.int8))
    bias = torch.from_numpy(rng.integers(-9000, 9000, 64).astype(np.int32))
    req = Requant(rng.uniform(1e-4, 0.01, 64), None, in_zp=5, out_zp=-3)

    def fn(s, x, y):
        ly = qc.int_linear(y, -9, s.w, None)
        return s.req(qc.int_linear(x, 4, s.w, s.bias)), ly, s.req(ly)
    m = Ops(fn, w=w, bias=bias)
    m.req = req
    g, main = build(m, (torch.zeros(2, 128, dtype=torch.int8), torch.zeros(2, 128, dtype=torch.uint8)))
    assert _calls(main, "qc_amx_dot_128x64_rq", where=("amx",)), "the linear did not take the AMX kernel"
    x = rng.integers(-128, 128, (rows, 128)).astype(np.int8)
    x[0] = 127
    check(g, main, x, rng.integers(0, 256, (rows, 128)).astype(np.uint8))


@pytest.mark.parametrize("mcpu", ISAS)
@pytest.mark.parametrize("seq", [5, 16, 37])
def test_vnni_attention_matmuls_symbolic_shapes(seq, mcpu):
    """Attention's activation x activation matmuls on the VNNI kernel with the sequence length
    symbolic (k and n not multiples of 4 / 16 at run time: byte tails, partial column blocks):
    int8 q (the +128 and column-sum correction), a softmax's output (never negative: no
    correction), uint8 with a zero point, requant fused or not (the int32 product used twice)."""
    rng = np.random.default_rng(7)
    table = I.exp_table(0.05, 65536)
    rq = lambda v, m, c, zp=0: qc.requant(v, 2, m, c, zp, -128, 127, -1)

    def fn(s, q, kt, v, u):
        sc = qc.int_matmul(q, 0, kt, 0)                        # [b, h, s, s], n symbolic
        p = qc.int_softmax(rq(sc, s.m3, s.c), None, s.table, -1, 1 << 30, 23, 0, -128, 127)
        o = rq(qc.int_matmul(p, 0, v, 0), s.m5, s.c, -4)       # k symbolic, p >= 0
        o2 = qc.int_matmul(u, 9, v, 0)                          # uint8, zero point, int32 out
        return o, sc, o2, rq(o2, s.m3, s.c0)
    dyn = {n: {0: "batch", 2: "seq"} for n in ("q", "v", "u")}
    dyn["kt"] = {0: "batch", 3: "seq"}
    dyn["u"] = {0: "batch", 2: "seq", 3: "seq"}
    ex = (torch.zeros(2, 3, 6, 32, dtype=torch.int8), torch.zeros(2, 3, 32, 6, dtype=torch.int8),
          torch.zeros(2, 3, 6, 32, dtype=torch.int8), torch.zeros(2, 3, 6, 6, dtype=torch.uint8))
    consts = {k: torch.tensor([v]) for k, v in (("m3", 3), ("m5", 5), ("c", 13), ("c0", 0))}
    g, main = build(Ops(fn, table=table, **consts), ex, dynamic=dyn, input_names=["q", "kt", "v", "u"], mcpu=mcpu)
    assert _uses(main, "_act_rq", mcpu) and _uses(main, "_act", mcpu), "the matmuls did not take the int8 kernel"
    q = rng.integers(-128, 128, (3, 3, seq, 32)).astype(np.int8)
    q[0, 0, 0] = -128
    check(g, main, q, rng.integers(-128, 128, (3, 3, 32, seq)).astype(np.int8),
          rng.integers(-128, 128, (3, 3, seq, 32)).astype(np.int8), rng.integers(0, 256, (3, 3, seq, seq)).astype(np.uint8))


def test_portable_target_generic_kernels():
    """tvm-llvm:x86-64 (no VNNI, no AMX: the generic schedules of schedule_cpu.py) on the
    attention block's integer ops, at a symbolic sequence length with tails."""
    rng = np.random.default_rng(10)
    w = torch.from_numpy(rng.integers(-128, 128, (48, 32)).astype(np.int8))
    table = I.exp_table(0.05, 65536)
    consts = {k: torch.tensor([v]) for k, v in (("m", 3), ("c", 13))}

    def fn(s, q, kt, mask):
        sc = qc.requant(qc.int_matmul(q, 0, kt, 0), 2, s.m, s.c, 0, -32768, 32767, -1)
        p = qc.int_softmax(sc, mask, s.table, -1, 1 << 30, 23, 0, -128, 127)
        return p, s.req(qc.int_linear(q, 3, s.w, None))
    m = Ops(fn, w=w, table=table, **consts)
    m.req = Requant(0.004, None, out_zp=1)
    dyn = {"q": {0: "batch", 2: "seq"}, "kt": {0: "batch", 3: "seq"}, "mask": {0: "batch", 3: "seq"}}
    ex = (torch.zeros(2, 3, 6, 32, dtype=torch.int8), torch.zeros(2, 3, 32, 6, dtype=torch.int8),
          torch.ones(2, 1, 1, 6, dtype=torch.bool))
    g, main = build(m, ex, dynamic=dyn, mcpu="x86-64", input_names=["q", "kt", "mask"])
    assert not any("vnni" in k or "amx" in k for k in main.kernels)
    mask = rng.random((3, 1, 1, 19)) > 0.2
    mask[0] = False  # a fully masked row gives out_zp
    check(g, main, rng.integers(-128, 128, (3, 3, 19, 32)).astype(np.int8),
          rng.integers(-128, 128, (3, 3, 32, 19)).astype(np.int8), mask)


def test_int_add_lut_sum_mul_div():
    rng = np.random.default_rng(2)
    table = torch.from_numpy(rng.integers(-128, 128, 256).astype(np.int8))
    m = Ops(lambda s, a, b, cnt: (qc.int_add(a, 3, 1 << 20, b, -2, -(3 << 19), 21, 4, -128, 127),
                                  qc.int_add(a, 0, 12345, b, 0, 54321, 0, 0, -32768, 32767),
                                  qc.int_lut(a, s.table, -128),
                                  qc.int_sum(a, 3, [1], True), qc.int_sum(b, 0, [0, 1], False),
                                  qc.int_mul(a, 1, b, -1),
                                  qc.int_div(a, 2, cnt, 77777, 9, -3, -128, 127)),
            table=table)
    ex = (torch.zeros(2, 8, dtype=torch.int16), torch.zeros(2, 8, dtype=torch.int16),
          torch.zeros(2, 1, dtype=torch.int64))
    g, main = build(m, ex)
    a = rng.integers(-128, 128, (7, 8)).astype(np.int16)
    b = rng.integers(-32768, 32768, (7, 8)).astype(np.int16)
    cnt = rng.integers(0, 4, (7, 1)).astype(np.int64)
    cnt[0] = 0  # division by an empty count gives out_zp
    check(g, main, a, b, cnt)


def test_int_softmax_masked_rows_and_layer_norm():
    rng = np.random.default_rng(3)
    table = I.exp_table(0.05, 65536)
    eps, k, gamma, beta, shift = I.layer_norm_consts(torch.rand(24) + 0.5, torch.randn(24), 24, 1e-5, 0.01, 0.05,
                                                     in_levels=65536)
    m = Ops(lambda s, x, mask, y: (qc.int_softmax(x, mask, s.table, -1, 1 << 30, 23, -128, -128, 127),
                                   qc.int_softmax(x, None, s.table, -1, 1 << 30, 23, 0, 0, 255),
                                   qc.int_layer_norm(y, 5, eps, k, s.gamma, s.beta, shift, 0, -128, 127)),
            table=table, gamma=gamma, beta=beta)
    ex = (torch.zeros(2, 3, 10, dtype=torch.int16), torch.ones(2, 1, 10, dtype=torch.bool),
          torch.zeros(2, 6, 24, dtype=torch.int16))
    g, main = build(m, ex)
    x = rng.integers(-32768, 32768, (4, 3, 10)).astype(np.int16)
    x[0, 0] = 7  # a constant row: every entry ties
    mask = rng.random((4, 1, 10)) > 0.3
    mask[1] = False  # a fully masked row gives out_zp
    y = rng.integers(-32768, 32768, (4, 6, 24)).astype(np.int16)
    y[0, 0] = 5  # zero variance: r = sqrt(eps) path
    y[0, 1] = np.where(np.arange(24) % 2, 32767, -32768)  # the largest variance
    check(g, main, x, mask, y)


def test_softmax_rows_float64_stage_exact():
    """The CPU softmax row kernel's output stage in float64 lanes: a row whose sum divides
    e * mult exactly (2 entries of e = 1362286842 at the max, the others e = 0), where the
    quotient's float64 estimate lands one below it and the fix-up must step up, and a row whose
    sum is above 2^52, where fl(sum) is inexact and every quotient is 0 (2^21 + 37 entries:
    also a partial last vector)."""
    from qcompiler.backends.tvm.translate import _softmax_float_div
    n = (1 << 21) + 37
    e0 = 1362286842  # fl(2^15 e0 * fl(1 / (2 e0))) < 2^14 = the quotient
    table = torch.tensor([e0] + [(1 << 31) - 1 - (i << 20) for i in range(14)] + [0], dtype=torch.int64)
    assert _softmax_float_div(1 << 15, table)
    m = Ops(lambda s, x: qc.int_softmax(x, None, s.table, -1, 1 << 15, 0, 3, -32768, 32767), table=table)
    g, main = build(m, (torch.zeros(2, 40, dtype=torch.int16),), dynamic={"x": {1: "n"}}, input_names=["x"])
    assert any("softmax_rows" in k for k in main.kernels)
    x = np.full((2, n), -30000, np.int16)
    x[0], x[0, 9] = 11, 12                     # e = 2^31 - 1 but one: the sum is above 2^52
    x[1, [77, n - 1]] = 100                    # e * mult = 2^14 * the sum, exactly, at 2 entries
    check(g, main, x)
    assert main(tvm.runtime.tensor(x, tvm.cpu()))[0].numpy()[1, 77] == (1 << 14) + 3


def test_int_l2_norm_exact_isqrt():
    m = Ops(lambda s, x: qc.int_l2_norm(x, 0, [-1], True, 16))
    g, main = build(m, (torch.zeros(2, 16, dtype=torch.int8),))
    x = np.random.default_rng(4).integers(-128, 128, (9, 16)).astype(np.int8)
    x[0], x[1] = 0, -128
    check(g, main, x)


def test_isqrt_kernel_exact_at_perfect_squares_up_to_2_62():
    """The kernel's float64 estimate is fixed up by one step each way: exact where fl(x) rounds
    across a perfect square (k^2 - 1 for k near 2^31 converts to k^2 in float64)."""
    from tvm import relax

    from qcompiler.backends.tvm.pipeline import pipeline
    from qcompiler.backends.tvm.build import target_for
    from qcompiler.backends.tvm.translate import Translator
    rng = np.random.default_rng(5)
    k = np.concatenate([np.arange(0, 70), rng.integers(1 << 20, (1 << 31) - 1, 300), [(1 << 31) - 1]]).astype(np.int64)
    v = np.concatenate([k * k - 1, k * k, k * k + 1, rng.integers(0, 1 << 62, 300)])
    v = np.clip(v, 0, (1 << 62) - 1).astype(np.int64)
    tr = Translator(qcompiler.trace(Ops(lambda s, x: x + 1), (torch.zeros(2, dtype=torch.int64),)))
    x = relax.Var("x", relax.TensorType([v.size], "int64"))
    with tr.bb.function("main", [x]):
        with tr.bb.dataflow():
            out = tr.bb.emit_output(tr.isqrt(x))
        tr.bb.emit_func_output(out)
    target = target_for("llvm", None)
    with target:
        ex = tvm.compile(tr.bb.get(), target=target, relax_pipeline=pipeline(target))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(v, tvm.cpu())).numpy()
    want = I.isqrt(torch.from_numpy(v)).numpy()
    assert np.array_equal(got, want), f"{np.sum(got != want)} of {v.size} differ"
    r = want.astype(object)
    assert all(a * a <= b < (a + 1) * (a + 1) for a, b in zip(r, v.astype(object)))  # the reference is exact too


def test_floordiv_without_integer_division_exact_at_multiples():
    """The softmax's division by the row sum, computed through a float64 estimate and one fix-up
    step each way: exact at a = q d - 1, q d, q d + d - 1 (where fl(a) / fl(d) rounds across an
    integer) for quotients up to 2^49 - 1 and divisors up to 2^13."""
    from tvm import relax

    from qcompiler.backends.tvm.build import target_for
    from qcompiler.backends.tvm.pipeline import pipeline
    from qcompiler.backends.tvm.translate import Translator, _floordiv_small_quotient
    rng = np.random.default_rng(8)
    q = np.concatenate([np.arange(0, 50), rng.integers(1 << 40, 1 << 49, 400), [(1 << 49) - 1]]).astype(np.int64)
    d = rng.integers(1, 1 << 13, q.size).astype(np.int64)
    d[:10] = 1
    a = np.concatenate([q * d, np.maximum(q * d - 1, 0), q * d + d - 1])
    d = np.concatenate([d, d, d])
    tr = Translator(qcompiler.trace(Ops(lambda s, x: x + 1), (torch.zeros(2, dtype=torch.int64),)))
    xa, xd = (relax.Var(n, relax.TensorType([a.size], "int64")) for n in ("a", "d"))
    with tr.bb.function("main", [xa, xd]):
        with tr.bb.dataflow():
            out = tr.bb.emit_output(tr.elementwise("div", [xa, xd], lambda el, u, v: _floordiv_small_quotient(u, v), "int64"))
        tr.bb.emit_func_output(out)
    target = target_for("llvm", None)
    with target:
        ex = tvm.compile(tr.bb.get(), target=target, relax_pipeline=pipeline(target))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(d)).numpy()
    assert np.array_equal(got, a // d), f"{np.sum(got != a // d)} of {a.size} differ"


def test_unsupported_op_is_refused_with_node_and_op():
    from qcompiler.backends.tvm.translate import to_relax
    g = qcompiler.trace(Ops(lambda s, x: torch.sort(x)[0]), (torch.zeros(2, 4),))
    with pytest.raises(QCError, match=r"node '.*', op '.*sort"):
        to_relax(g)


# -- whole models, through the saved artifact -------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["fashion_cnn", "fashion_vit", "minilm"])
def test_bundled_model_artifact_bit_exact(name, tmp_path):
    from qcompiler.models import zoo
    z = zoo.get(name)
    g = qcompiler.trace(z.module, z.example_inputs, input_names=z.input_names, dynamic=z.dynamic)
    calib = z.calib(16)
    tvm_art = qcompiler.compile(g.copy(), calib, config=qcompiler.Config(target="tvm-llvm"))
    ref_art = qcompiler.compile(g.copy(), calib, config=qcompiler.Config(target="reference", integer=True))
    assert tvm_art.manifest["integer"] is not None and "model.so" in tvm_art.files
    a = qcompiler.load(tvm_art.save(tmp_path / "tvm"))
    b = qcompiler.load(ref_art.save(tmp_path / "ref"))
    feeds = {k: v[:6] for k, v in z.calib(6).items()}
    out_a, out_b = a(feeds), b(feeds)
    for k in out_b:
        assert np.array_equal(out_a[k], out_b[k]), k


def test_artifact_runs_without_tvm(small_cnn, tmp_path):
    module, example = small_cnn, torch.randn(4, 3, 16, 16)
    calib = {"x": torch.randn(16, *example.shape[1:]).numpy()}
    g = qcompiler.trace(module, (example,), input_names=["x"])
    art = qcompiler.compile(g.copy(), calib, config=qcompiler.Config(target="tvm-llvm"))
    path = art.save(tmp_path / "art")
    assert {"model.so", "libtvm_runtime.so"} <= set(os.listdir(path))
    ref = qcompiler.compile(g.copy(), calib, config=qcompiler.Config(target="reference", integer=True))
    x = calib["x"][:3]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ref.npy", qcompiler.load(ref.save(tmp_path / "ref"))(x)[g.outputs[0].name])
    code = (f"import sys, numpy as np, qcompiler\n"
            f"m = qcompiler.load({str(path)!r})\n"
            f"y = m(np.load({str(tmp_path / 'x.npy')!r}))[{g.outputs[0].name!r}]\n"
            f"assert np.array_equal(y, np.load({str(tmp_path / 'ref.npy')!r}))\n"
            f"assert 'tvm' not in sys.modules, 'the runtime imported the compiler'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]


def test_amx_artifact_refused_where_tiles_are_not_allowed(tmp_path, monkeypatch):
    """An artifact built with AMX linears says so (build.json); where the process may not use
    AMX tiles, loading it is a clear error, not the illegal-instruction signal of a tile load."""
    import json

    from qcompiler.backends.tvm import runtime
    module = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    calib = {"x": torch.randn(16, 128).numpy()}
    art = qcompiler.compile(qcompiler.trace(module, (torch.randn(4, 128),), input_names=["x"]), calib,
                            config=qcompiler.Config(target="tvm-llvm"))
    facts = json.loads(art.files["build.json"])
    assert facts["int8_dot"] == _dot()
    path = art.save(tmp_path / "art")
    qcompiler.load(path)(calib["x"][:2])
    if facts["int8_dot"] != "amx":
        pytest.skip("this CPU has no AMX: the artifact uses no tiles")
    monkeypatch.setattr(runtime, "_amx", False)
    with pytest.raises(QCError, match="AMX tiles"):
        qcompiler.load(path)


def test_thread_pool_one_thread_per_physical_core(monkeypatch):
    """The runtime gives TVM's pool one thread per physical core it may use (TVM 0.27 alone
    takes half the logical CPUs on x86-64), and keeps a TVM_NUM_THREADS the user set."""
    from qcompiler.backends.tvm import runtime
    n = runtime.physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    runtime.configure_threads()
    assert os.environ["TVM_NUM_THREADS"] == str(n)
    monkeypatch.setenv("TVM_NUM_THREADS", "7")
    runtime.configure_threads()
    assert os.environ["TVM_NUM_THREADS"] == "7"


def test_unknown_tvm_target_is_refused():
    for bad in ("tvm-vulkan", "onnx:sm_90"):
        with pytest.raises(QCError, match="unknown target"):
            qcompiler.Config(target=bad)
