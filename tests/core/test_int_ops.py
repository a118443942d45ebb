"""The integer op set: each op against exact integer or float64 arithmetic, with its bound."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompiler  # noqa: F401  (registers the ops)
from qcompiler import int_ops as I
from qcompiler.errors import QCError
from qcompiler.ops import fake_quant

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)


def _round_half_away(num: int, c: int) -> int:
    """Exact python reference: num / 2^c rounded half away from zero."""
    if c == 0:
        return num
    q, r = divmod(abs(num), 1 << c)
    q += 1 if 2 * r >= (1 << c) else 0
    return -q if num < 0 else q


@SETTINGS
@given(st.floats(min_value=1e-12, max_value=2.0**30, allow_nan=False))
def test_dyadic_is_31_bit_accurate(m):
    """b / 2^c equals m to within 2^-30 relative, with 2^30 <= b < 2^31 and 0 <= c <= 62."""
    b, c = (int(v) for v in I.dyadic(m))
    assert 0 <= c <= 62
    if m >= 2.0**-32:
        assert 2**30 <= b < 2**31
    assert abs(b / 2.0**c - m) <= m * 2.0**-30 + 2.0**-63


def test_dyadic_sign_zero_and_range():
    """Negative multipliers keep their sign, 0 maps to b = 0, and m >= 2^31 is refused."""
    b, c = I.dyadic(torch.tensor([-0.75, 0.0, 0.75], dtype=torch.float64))
    assert b.tolist()[1] == 0 and b[0] == -b[2] and c[0] == c[2]
    with pytest.raises(QCError, match="too large"):
        I.dyadic(2.0**31)


@SETTINGS
@given(st.integers(-(2**61), 2**61), st.integers(0, 62))
def test_rshift_round_matches_exact_arithmetic(p, c):
    """rshift_round(p, c) is p / 2^c rounded half away from zero, for every shift 0..62."""
    assert int(I.rshift_round(torch.tensor([p]), c)) == _round_half_away(p, c)


def test_rshift_round_ties_go_away_from_zero():
    """Exact halves round away from zero: 2.5 -> 3, -2.5 -> -3, 0.5 -> 1, -0.5 -> -1."""
    p = torch.tensor([5, -5, 1, -1, 3, -3])
    assert I.rshift_round(p, 1).tolist() == [3, -3, 1, -1, 2, -2]


@SETTINGS
@given(st.integers(-(2**31) + 1, 2**31 - 1), st.floats(min_value=1e-9, max_value=64.0))
def test_requant_error_bound(acc, m):
    """|requant(acc) - acc*m| <= 1/2 + |acc*m| 2^-30 before clamping (the dyadic rounding bound)."""
    b, c = I.dyadic(m)
    y = I.requant(torch.tensor([acc], dtype=torch.int32), 0, b, c, 0, -(2**31), 2**31 - 1, 0)
    exact = acc * m
    if abs(exact) < 2**31 - 2:
        assert abs(int(y) - exact) <= 0.5 + abs(exact) * 2.0**-30 + 1e-9


def test_requant_saturates_and_uses_zero_points():
    """Results clamp to [qmin, qmax] at both ends; the input zero point is subtracted and the output one added."""
    acc = torch.tensor([-(2**31) + 1, -1000, 0, 1000, 2**31 - 1], dtype=torch.int32)
    b, c = I.dyadic(0.5)
    y = I.requant(acc, 0, b, c, 0, -128, 127, 0)
    assert y.dtype == torch.int8 and y.tolist() == [-128, -128, 0, 127, 127]
    y = I.requant(torch.tensor([10, 20]), 4, b, c, 100, 0, 255, 0)
    assert y.dtype == torch.uint8 and y.tolist() == [103, 108]


def test_requant_per_channel_multipliers_and_shifts():
    """Per-channel multipliers and shifts (0..62) along an axis match exact integer arithmetic."""
    torch.manual_seed(0)
    acc = torch.randint(-(2**20), 2**20, (3, 5, 4), dtype=torch.int32)
    b = torch.tensor([2**30, 3 * 2**29, 2**31 - 1, 1 << 30, 5], dtype=torch.int64)
    c = torch.tensor([0, 31, 40, 62, 3], dtype=torch.int64)
    y = I.requant(acc, 0, b, c, 0, -(2**31), 2**31 - 1, 1)
    for i in range(3):
        for j in range(5):
            for k in range(4):
                v = _round_half_away(int(acc[i, j, k]) * int(b[j]), int(c[j]))
                assert int(y[i, j, k]) == max(-(2**31), min(2**31 - 1, v))


@pytest.mark.parametrize("zp,lo,hi", [(0, -127, 127), (-128, -128, 127), (127, -128, 127), (0, 0, 255), (255, 0, 255)])
def test_int_linear_matmul_conv_exact(zp, lo, hi):
    """int_linear / int_matmul / int_conv equal int64 arithmetic, zero points at the range ends included."""
    g = torch.Generator().manual_seed(1)
    dt = I.int_dtype(lo, hi)
    x = torch.randint(lo, hi + 1, (2, 7, 33), generator=g).to(dt)
    w = torch.randint(-127, 128, (9, 33), generator=g).to(torch.int8)
    bias = torch.randint(-1000, 1000, (9,), generator=g).to(torch.int32)
    ref = (x.long() - zp) @ w.long().T + bias.long()
    assert torch.equal(I.int_linear(x, zp, w, bias).long(), ref)
    b2 = torch.randint(-128, 128, (2, 33, 5), generator=g).to(torch.int8)
    assert torch.equal(I.int_matmul(x, zp, b2, -3).long(), (x.long() - zp) @ (b2.long() + 3))
    xi = torch.randint(lo, hi + 1, (2, 4, 9, 9), generator=g).to(dt)
    wc = torch.randint(-127, 128, (6, 2, 3, 3), generator=g).to(torch.int8)
    got = I.int_conv(xi, zp, wc, None, [2, 1], [1, 1], [1, 1], 2).long()
    ref = torch.nn.functional.conv2d((xi.long() - zp).double(), wc.double(), None, [2, 1], [1, 1], [1, 1], 2)
    assert torch.equal(got, ref.long())


def test_accumulator_bound_is_checked():
    """Shapes whose int32 accumulation could overflow are refused with the numbers."""
    I.check_accumulator(4096, 255, 127)
    with pytest.raises(QCError, match="overflow"):
        I.check_accumulator(70000, 255, 127, where="fc")


def test_int_add_matches_float_rescale():
    """int_add is round((a-za) s_a/s_y + (b-zb) s_b/s_y) + zy within the 1-LSB rounding of the dyadic rescale."""
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-128, 128, (1000,), generator=g).to(torch.int8)
    b = torch.randint(0, 256, (1000,), generator=g).to(torch.uint8)
    sa, sb, sy = 0.031, 0.0123, 0.05
    c = 30
    ma, mb = round(sa / sy * 2**c), round(sb / sy * 2**c)
    y = I.int_add(a, 3, ma, b, 128, -mb, c, -5, -128, 127)
    ref = ((a.double() - 3) * sa - (b.double() - 128) * sb) / sy - 5
    assert (y.double() - ref.clamp(-128, 127)).abs().max() <= 0.5 + 1e-6


def test_int_lut_is_a_table_lookup():
    """int_lut(x, T, qmin) = T[x - qmin] for every input code."""
    x = torch.arange(-128, 128).to(torch.int8)
    table = torch.arange(256).flip(0).to(torch.int16)
    assert torch.equal(I.int_lut(x, table, -128), table)


def test_isqrt_exact():
    """isqrt is floor(sqrt(v)) exactly, up to 2^62."""
    g = torch.Generator().manual_seed(3)
    v = torch.cat([torch.randint(0, 2**62, (2000,), generator=g), torch.tensor([0, 1, 2, 3, 4, 2**62 - 1]),
                   torch.tensor([k * k for k in (10**9, 2**31 - 1)]) - 1])
    assert I.isqrt(v).tolist() == [math.isqrt(int(t)) for t in v]


def _softmax_case(seed: int, s_x: float, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (8, n), generator=g).to(torch.int8)
    s_y = 1.0 / 127
    b, c = I.dyadic(1.0 / s_y)
    y = I.int_softmax(x, None, I.exp_table(s_x, 256), -1, int(b), int(c), 0, -128, 127)
    ref = torch.softmax(x.double() * s_x, -1) / s_y
    return y, ref


@pytest.mark.parametrize("s_x", [0.01, 0.05, 0.2])
def test_int_softmax_within_one_lsb(s_x):
    """int_softmax is within 1 LSB of the float64 softmax quantized to the output grid."""
    y, ref = _softmax_case(4, s_x)
    assert y.dtype == torch.int8
    assert (y.double() - ref).abs().max() <= 1.0


def _ln_case(x, zp, s_x, s_y, w, b, eps=1e-5):
    levels = 1 << (8 * x.element_size())
    eps_i, k, gamma, beta, shift = I.layer_norm_consts(w, b, x.shape[-1], eps, s_x, s_y, levels)
    y = I.int_layer_norm(x, zp, eps_i, k, gamma, beta, shift, 0, -128, 127)
    xf = (x.double() - zp) * s_x
    ref = torch.nn.functional.layer_norm(xf, (x.shape[-1],), w.double(), b.double(), eps) / s_y
    return y, ref.clamp(-128, 127)


def test_int_layer_norm_within_one_lsb_with_outliers():
    """int_layer_norm is within 1 LSB of float64 LayerNorm, with outlier channels and a zero point."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-40, 40, (16, 96), generator=g)
    x[:, 3] = 127
    x[:, 50] = -128
    w = torch.rand(96, generator=g) + 0.5
    b = torch.randn(96, generator=g) * 0.1
    y, ref = _ln_case(x.to(torch.int8), -2, 0.04, 0.03, w, b)
    assert (y.double() - ref).abs().max() <= 1.0


def test_int_layer_norm_constant_rows():
    """A constant row (zero variance) normalizes to 0, i.e. the output is round(beta / s_y)."""
    x = torch.full((2, 8), 7, dtype=torch.int8)
    w, b = torch.ones(8), torch.linspace(-0.2, 0.2, 8)
    y, ref = _ln_case(x, 0, 0.1, 0.01, w, b, eps=0.0)
    assert torch.equal(y.long(), torch.round(b.double() / 0.01).long().expand(2, 8))


def test_quantize_and_dequantize_agree_with_fake_quant():
    """dequantize(quantize(x)) == fake_quant(x), bit for bit, per tensor and per channel."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 6, generator=g) * 3
    s, z = torch.tensor(0.02), torch.tensor(5, dtype=torch.int32)
    q = I.quantize(x, s, z, -128, 127, 0)
    assert q.dtype == torch.int8
    assert torch.equal(I.dequantize(q, s, z, 0), fake_quant(x, s, z, -128, 127, 0, 0))
    sc, zc = torch.rand(6, generator=g) * 0.1 + 0.01, torch.zeros(6, dtype=torch.int32)
    q = I.quantize(x, sc, zc, -127, 127, 1)
    assert torch.equal(I.dequantize(q, sc, zc, 1), fake_quant(x, sc, zc, -127, 127, 1, 0))


def test_int_softmax_mask_excludes_entries():
    """Masked entries get 0 and the rest renormalise, as softmax over the kept entries; a fully masked row is 0."""
    g = torch.Generator().manual_seed(8)
    x = torch.randint(-128, 128, (4, 16), generator=g).to(torch.int8)
    keep = torch.rand(4, 16, generator=g) > 0.3
    keep[3] = False
    b, c = I.dyadic(127.0)
    y = I.int_softmax(x, keep, I.exp_table(0.05, 256), -1, int(b), int(c), 0, -128, 127)
    ref = torch.softmax(torch.where(keep, x.double() * 0.05, -torch.inf), -1) * 127
    assert (y[:3].double() - ref[:3]).abs().max() <= 1.0 and bool((y[~keep] == 0).all())


def test_int_layer_norm_16_bit_inputs():
    """16-bit inputs (a wide residual stream) take fewer sqrt bits and stay within 1 LSB of float64 LayerNorm."""
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(8, 384, generator=g) * 3000).round().clamp(-32768, 32767).to(torch.int16)
    x[:, 7] = 32767
    w, b = torch.rand(384, generator=g) + 0.5, torch.randn(384, generator=g) * 0.1
    y, ref = _ln_case(x, 0, 1e-3, 0.03, w, b)
    assert (y.double() - ref).abs().max() <= 1.0


def test_int_mul_div_and_l2_norm():
    """int_mul is the exact product of centred codes; int_div rounds half away from zero and maps a zero divisor
    to the zero point; int_l2_norm is floor(sqrt(sum x^2) * 2^k) exactly."""
    g = torch.Generator().manual_seed(10)
    a = torch.randint(-128, 128, (5, 7), generator=g).to(torch.int8)
    b = torch.randint(0, 3, (5, 7), generator=g)
    assert torch.equal(I.int_mul(a, -3, b, 1), (a.long() + 3) * (b - 1))
    num = torch.tensor([7, -7, 5, -5, 9, 4])
    den = torch.tensor([2, 2, 2, 2, 0, 3])
    assert I.int_div(num, 0, den, 1, 0, 10, -128, 127).tolist() == [14, 6, 13, 7, 10, 11]
    x = torch.randint(-200, 200, (4, 9), generator=g).to(torch.int16)
    r = I.int_l2_norm(x, 2, [1], True, 3)
    want = [math.isqrt(int(((x[i].long() - 2) ** 2).sum()) * 64) for i in range(4)]
    assert r.flatten().tolist() == want and r.shape == (4, 1)
