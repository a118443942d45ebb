"""The integer-only op set (namespace `qc`): what an integer graph is made of.

Each op's torch kernel below IS its definition; a backend is correct when it reproduces
these kernels bit for bit. Conventions shared by every op:

- Integer tensors hold values in [qmin, qmax] in the narrowest dtype that fits
  (`int_dtype`): int8, uint8, int16 or int32. Accumulators are int32.
- A real number m > 0 is applied as a dyadic number b / 2^c (`dyadic`): b a 31-bit integer
  in [2^30, 2^31), c a shift in [0, 62]; products are taken in int64, so |acc| < 2^31 and
  b < 2^31 never overflow.
- `rshift_round(p, c)` divides by 2^c rounding half away from zero:
  sign(p) * ((|p| + 2^(c-1)) >> c). Only multiply, add and shift: no float, no division,
  except one integer division per normalised row in int_softmax and int_layer_norm (the
  row's reciprocal), as in I-BERT.
- Matmul-like kernels compute in float64, which is exact here: every product and partial
  sum is an integer below 2^53 for the shapes `check_accumulator` accepts, so any summation
  order gives the same int32 result.
"""
from __future__ import annotations

import math

import torch

from .errors import QCError

_lib = torch.library.Library("qc", "FRAGMENT")  # noqa: F841 (adds to the qc namespace of qcompiler.ops)

I64 = torch.int64
INT32_MAX = 2**31 - 1


def int_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The narrowest integer dtype holding [qmin, qmax]."""
    for dt in (torch.int8, torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dt)
        if info.min <= qmin and qmax <= info.max:
            return dt
    raise QCError(f"integer range [{qmin}, {qmax}] does not fit in int32")


def dyadic(m: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, c) int64 with b / 2^c = m to 31 significant bits: |b| in [2^30, 2^31), 0 <= c <= 62
    (for |m| < 2^-32 the multiplier has fewer bits; m = 0 gives b = 0; b has m's sign).
    Raises for |m| >= 2^31."""
    m = torch.as_tensor(m, dtype=torch.float64)
    if not torch.isfinite(m).all():
        raise QCError("a requantization multiplier must be finite")
    if (m < 0).any():
        b, c = dyadic(m.abs())
        return torch.where(m < 0, -b, b), c
    if (m >= 2.0**31).any():
        raise QCError(f"requantization multiplier {float(m.max()):.4g} is too large (>= 2^31)")
    mant, exp = torch.frexp(m)  # m = mant * 2^exp, mant in [0.5, 1)
    b = torch.round(mant * 2.0**31).to(I64)
    c = (31 - exp).to(I64)
    top = b == 2**31
    b, c = torch.where(top, b // 2, b), torch.where(top, c - 1, c)
    over = (c - 62).clamp(min=0)
    b = torch.where(over > 0, rshift_round(b, over), b)
    c = torch.minimum(c, torch.full_like(c, 62))
    zero = m == 0
    return torch.where(zero, torch.zeros_like(b), b), torch.where(zero, torch.zeros_like(c), c)


def rshift_round(p: torch.Tensor, c) -> torch.Tensor:
    """p / 2^c rounded half away from zero, for int64 p and shift(s) c >= 0."""
    c = torch.as_tensor(c, dtype=I64, device=p.device)
    half = torch.where(c > 0, torch.bitwise_left_shift(torch.ones_like(c), (c - 1).clamp(min=0)), torch.zeros_like(c))
    mag = torch.bitwise_right_shift(p.abs() + half, c)
    return torch.where(p < 0, -mag, mag)


def _axis_shape(t: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * like.dim()
    shape[axis % like.dim()] = t.numel()
    return t.reshape(shape)


def _exact_float64_to_int32(y: torch.Tensor) -> torch.Tensor:
    return y.round().to(torch.int32)


def check_accumulator(k: int, x_range: int, w_absmax: int, bias_absmax: int = 0, where: str = "") -> None:
    """Reject shapes whose int32 accumulation could overflow: k * x_range * w_absmax + |bias| < 2^31."""
    worst = k * x_range * w_absmax + bias_absmax
    if worst > INT32_MAX:
        raise QCError(f"int32 accumulator could overflow{' at ' + where if where else ''}: reduction length {k} x "
                      f"|x - zp| <= {x_range} x |w| <= {w_absmax} (+ bias {bias_absmax}) = {worst} > 2^31 - 1")


# -- quantize / dequantize / requantize ------------------------------------------------------

_lib.define("quantize(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis) -> Tensor")
_lib.define("dequantize(Tensor q, Tensor scale, Tensor zero_point, int axis) -> Tensor")
_lib.define("requant(Tensor acc, int in_zp, Tensor multiplier, Tensor shift, int out_zp, int qmin, int qmax, int axis)"
            " -> Tensor")


@torch.library.impl(_lib, "quantize", "CompositeExplicitAutograd")
def _quantize(x, scale, zero_point, qmin, qmax, axis):
    """q = clamp(round_half_even(x / s) + z, qmin, qmax): the same integers as qc::fake_quant."""
    from .ops import quantize_ref
    return quantize_ref(x, scale, zero_point, qmin, qmax, axis, 0).to(int_dtype(qmin, qmax))


@torch.library.register_fake("qc::quantize")
def _quantize_fake(x, scale, zero_point, qmin, qmax, axis):
    return torch.empty_like(x, dtype=int_dtype(qmin, qmax))


@torch.library.impl(_lib, "dequantize", "CompositeExplicitAutograd")
def _dequantize(q, scale, zero_point, axis):
    """x = (q - z) * s in float32."""
    z = _axis_shape(zero_point.to(torch.float32), q, axis)
    s = _axis_shape(scale.to(torch.float32), q, axis)
    return (q.to(torch.float32) - z) * s


@torch.library.register_fake("qc::dequantize")
def _dequantize_fake(q, scale, zero_point, axis):
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.impl(_lib, "requant", "CompositeExplicitAutograd")
def _requant(acc, in_zp, multiplier, shift, out_zp, qmin, qmax, axis):
    """y = clamp(rshift_round((acc - in_zp) * b, c) + out_zp, qmin, qmax), b/c per tensor or
    per channel along `axis`; the product is int64."""
    b = _axis_shape(multiplier.to(I64), acc, axis)
    c = _axis_shape(shift.to(I64), acc, axis)
    y = rshift_round((acc.to(I64) - in_zp) * b, c) + out_zp
    return y.clamp(qmin, qmax).to(int_dtype(qmin, qmax))


@torch.library.register_fake("qc::requant")
def _requant_fake(acc, in_zp, multiplier, shift, out_zp, qmin, qmax, axis):
    return torch.empty_like(acc, dtype=int_dtype(qmin, qmax))


# -- integer matmul / linear / conv (int32 accumulation) -------------------------------------

_lib.define("int_linear(Tensor x, int x_zp, Tensor w, Tensor? bias) -> Tensor")
_lib.define("int_matmul(Tensor a, int a_zp, Tensor b, int b_zp) -> Tensor")
_lib.define("int_conv(Tensor x, int x_zp, Tensor w, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
            "int groups) -> Tensor")


@torch.library.impl(_lib, "int_linear", "CompositeExplicitAutograd")
def _int_linear(x, x_zp, w, bias):
    """acc = (x - x_zp) @ w^T + bias, int32 (w: [out, in] integers, bias: int32 [out])."""
    y = torch.nn.functional.linear(x.to(torch.float64) - x_zp, w.to(torch.float64),
                                   None if bias is None else bias.to(torch.float64))
    return _exact_float64_to_int32(y)


@torch.library.register_fake("qc::int_linear")
def _int_linear_fake(x, x_zp, w, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.int32)


@torch.library.impl(_lib, "int_matmul", "CompositeExplicitAutograd")
def _int_matmul(a, a_zp, b, b_zp):
    """acc = (a - a_zp) @ (b - b_zp), int32, with torch.matmul's broadcasting."""
    return _exact_float64_to_int32(torch.matmul(a.to(torch.float64) - a_zp, b.to(torch.float64) - b_zp))


@torch.library.register_fake("qc::int_matmul")
def _int_matmul_fake(a, a_zp, b, b_zp):
    return torch.matmul(a.new_empty(a.shape, dtype=torch.float32), b.new_empty(b.shape, dtype=torch.float32)).to(
        torch.int32)


_CONV = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}


@torch.library.impl(_lib, "int_conv", "CompositeExplicitAutograd")
def _int_conv(x, x_zp, w, bias, stride, padding, dilation, groups):
    """acc = conv(x - x_zp, w) + bias, int32; zero padding of x - x_zp (i.e. padding by the real 0)."""
    y = _CONV[w.dim()](x.to(torch.float64) - x_zp, w.to(torch.float64),
                       None if bias is None else bias.to(torch.float64), stride, padding, dilation, groups)
    return _exact_float64_to_int32(y)


@torch.library.register_fake("qc::int_conv")
def _int_conv_fake(x, x_zp, w, bias, stride, padding, dilation, groups):
    y = _CONV[w.dim()](x.new_empty(x.shape, dtype=torch.float32), w.new_empty(w.shape, dtype=torch.float32),
                       None, stride, padding, dilation, groups)
    return y.to(torch.int32)


# -- elementwise ----------------------------------------------------------------------------

_lib.define("int_add(Tensor a, int a_zp, int a_mult, Tensor b, int b_zp, int b_mult, int shift, int out_zp, "
            "int qmin, int qmax) -> Tensor")
_lib.define("int_lut(Tensor x, Tensor table, int offset) -> Tensor")
_lib.define("int_sum(Tensor x, int x_zp, int[] dims, bool keepdim) -> Tensor")


@torch.library.impl(_lib, "int_add", "CompositeExplicitAutograd")
def _int_add(a, a_zp, a_mult, b, b_zp, b_mult, shift, out_zp, qmin, qmax):
    """y = clamp(rshift_round((a - a_zp) * a_mult + (b - b_zp) * b_mult, shift) + out_zp, qmin, qmax),
    int64 arithmetic, broadcasting; a_mult / b_mult / shift are the two dyadic rescales s_a/s_y,
    s_b/s_y brought to one shift (b_mult < 0 subtracts)."""
    p = (a.to(I64) - a_zp) * a_mult + (b.to(I64) - b_zp) * b_mult
    return (rshift_round(p, shift) + out_zp).clamp(qmin, qmax).to(int_dtype(qmin, qmax))


@torch.library.register_fake("qc::int_add")
def _int_add_fake(a, a_zp, a_mult, b, b_zp, b_mult, shift, out_zp, qmin, qmax):
    shape = torch.broadcast_shapes(a.shape, b.shape)
    return a.new_empty(shape, dtype=int_dtype(qmin, qmax))


@torch.library.impl(_lib, "int_lut", "CompositeExplicitAutograd")
def _int_lut(x, table, offset):
    """y = table[x - offset]: any elementwise function of an integer input (GELU, sigmoid,
    hardswish, ...) as a table built at compile time; the table's dtype is the output dtype."""
    return table[(x.to(I64) - offset).clamp(0, table.numel() - 1)]


@torch.library.register_fake("qc::int_lut")
def _int_lut_fake(x, table, offset):
    return torch.empty_like(x, dtype=table.dtype)


@torch.library.impl(_lib, "int_sum", "CompositeExplicitAutograd")
def _int_sum(x, x_zp, dims, keepdim):
    """s = sum over dims of (x - x_zp), int32."""
    return (x.to(I64) - x_zp).sum(dim=list(dims), keepdim=keepdim).to(torch.int32)


@torch.library.register_fake("qc::int_sum")
def _int_sum_fake(x, x_zp, dims, keepdim):
    return x.new_empty(x.shape, dtype=torch.float32).sum(dim=list(dims), keepdim=keepdim).to(torch.int32)


_lib.define("int_mul(Tensor a, int a_zp, Tensor b, int b_zp) -> Tensor")
_lib.define("int_div(Tensor a, int a_zp, Tensor b, int mult, int shift, int out_zp, int qmin, int qmax) -> Tensor")
_lib.define("int_l2_norm(Tensor x, int x_zp, int[] dims, bool keepdim, int frac_bits) -> Tensor")


@torch.library.impl(_lib, "int_mul", "CompositeExplicitAutograd")
def _int_mul(a, a_zp, b, b_zp):
    """p = (a - a_zp) * (b - b_zp), int64 (an accumulator at scale s_a s_b), broadcasting."""
    return (a.to(I64) - a_zp) * (b.to(I64) - b_zp)


@torch.library.register_fake("qc::int_mul")
def _int_mul_fake(a, a_zp, b, b_zp):
    return a.new_empty(torch.broadcast_shapes(a.shape, b.shape), dtype=I64)


def round_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den rounded half away from zero, int64, den > 0 (0 where den == 0)."""
    d = den.clamp(min=1)
    q = torch.div(2 * num.abs() + d, 2 * d, rounding_mode="floor")
    return torch.where(den > 0, torch.where(num < 0, -q, q), torch.zeros_like(q))


@torch.library.impl(_lib, "int_div", "CompositeExplicitAutograd")
def _int_div(a, a_zp, b, mult, shift, out_zp, qmin, qmax):
    """y = clamp(rshift_round(round_div((a - a_zp) * mult, b), shift) + out_zp, qmin, qmax) for an
    integer divisor b >= 0 (a count, a norm), broadcasting; mult / 2^shift = s_a / (s_b s_y);
    b = 0 gives out_zp (a zero sum over nothing)."""
    t = round_div((a.to(I64) - a_zp) * mult, b.to(I64))
    y = torch.where(b.to(I64) > 0, rshift_round(t, shift), torch.zeros_like(t)) + out_zp
    return y.clamp(qmin, qmax).to(int_dtype(qmin, qmax))


@torch.library.register_fake("qc::int_div")
def _int_div_fake(a, a_zp, b, mult, shift, out_zp, qmin, qmax):
    return a.new_empty(torch.broadcast_shapes(a.shape, b.shape), dtype=int_dtype(qmin, qmax))


@torch.library.impl(_lib, "int_l2_norm", "CompositeExplicitAutograd")
def _int_l2_norm(x, x_zp, dims, keepdim, frac_bits):
    """r = isqrt(sum over dims of (x - x_zp)^2 * 2^(2 frac_bits)): the L2 norm at scale s_x / 2^frac_bits, int64."""
    xi = x.to(I64) - x_zp
    return isqrt((xi * xi).sum(dim=list(dims), keepdim=keepdim) * (1 << (2 * frac_bits)))


@torch.library.register_fake("qc::int_l2_norm")
def _int_l2_norm_fake(x, x_zp, dims, keepdim, frac_bits):
    return x.new_empty(x.shape, dtype=torch.float32).sum(dim=list(dims), keepdim=keepdim).to(I64)


def l2_frac_bits(n: int, levels: int) -> int:
    """The most fractional bits (<= 16) for which n * (levels - 1)^2 * 4^k < 2^62."""
    k = 16
    while k and n * (levels - 1) ** 2 * 4**k >= 2**62:
        k -= 1
    return k


# -- normalisations -------------------------------------------------------------------------

_lib.define("int_softmax(Tensor x, Tensor? mask, Tensor exp_table, int dim, int mult, int shift, int out_zp, int qmin, "
            "int qmax) -> Tensor")
_lib.define("int_layer_norm(Tensor x, int x_zp, int eps, int sqrt_bits, Tensor gamma, Tensor beta, int shift, "
            "int out_zp, int qmin, int qmax) -> Tensor")

EXP_BITS = 16  # exp table entries are round(exp(s * d) * 2^16)


def exp_table(scale: float, levels: int) -> torch.Tensor:
    """int64 [levels]: entry j = round(exp(-j * scale) * 2^EXP_BITS), the softmax numerator for
    an input j steps below its row maximum."""
    j = torch.arange(levels, dtype=torch.float64)
    return torch.round(torch.exp(-j * float(scale)) * 2.0**EXP_BITS).to(I64)


@torch.library.impl(_lib, "int_softmax", "CompositeExplicitAutograd")
def _int_softmax(x, mask, exp_table, dim, mult, shift, out_zp, qmin, qmax):
    """Integer softmax along `dim`, over the entries where `mask` (bool, broadcast to x) is
    true, or all entries:
        d = max(x) - x (>= 0);  e = exp_table[d] (0 where masked);  S = sum(e);
        y = clamp(rshift_round(floor(e * mult / S), shift) + out_zp, qmin, qmax)
    with mult / 2^shift = 1 / s_y: one integer division per element by the row sum (as
    I-BERT's normalisation; a backend may use one reciprocal per row only where it gives the
    same floor). A fully masked row gives out_zp."""
    xi = x.to(I64)
    if mask is not None:
        keep = mask.expand(xi.shape)
        xi = torch.where(keep, xi, torch.full_like(xi, torch.iinfo(I64).min // 2))
    d = (xi.amax(dim=dim, keepdim=True) - xi).clamp(max=exp_table.numel() - 1)
    e = exp_table[d]
    if mask is not None:
        e = torch.where(keep, e, torch.zeros_like(e))
    s = e.sum(dim=dim, keepdim=True).clamp(min=1)
    t = torch.div(e * mult, s, rounding_mode="floor")
    return (rshift_round(t, shift) + out_zp).clamp(qmin, qmax).to(int_dtype(qmin, qmax))


@torch.library.register_fake("qc::int_softmax")
def _int_softmax_fake(x, mask, exp_table, dim, mult, shift, out_zp, qmin, qmax):
    return torch.empty_like(x, dtype=int_dtype(qmin, qmax))


LN_NORM_BITS = 16  # the normalised value is carried as norm * 2^16
LN_RECIP_BITS = 56


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(v)) for int64 v in [0, 2^62), exact (a float64 estimate, then integer fix-up)."""
    r = torch.sqrt(v.to(torch.float64)).floor().to(I64)
    for _ in range(2):
        r = torch.where((r + 1) * (r + 1) <= v, r + 1, r)
        r = torch.where(r * r > v, r - 1, r)
    return r


@torch.library.impl(_lib, "int_layer_norm", "CompositeExplicitAutograd")
def _int_layer_norm(x, x_zp, eps, sqrt_bits, gamma, beta, shift, out_zp, qmin, qmax):
    """Integer LayerNorm over the last dim (C entries), int64 arithmetic (I-BERT / I-ViT):
        x' = x - x_zp;  d = C x' - sum(x')                 (C times the centred value, exact)
        V  = (sum(d^2) // C + eps) * 2^k                   (eps = round(eps_f C^2 / s_x^2), k = sqrt_bits, even)
        r  = isqrt(V)                                      (2^(k/2) C std, in input units)
        n  = rshift_round(d * (2^56 // r), 40 - k/2)       (normalised value * 2^16; 0 when r = 0)
        y  = clamp(rshift_round(n * gamma + beta, shift) + out_zp, qmin, qmax)
    gamma, beta: int64 per channel, gamma_c / 2^(shift-16) = g_c / s_y and beta_c / 2^shift = b_c / s_y;
    layer_norm_consts picks k so that V < 2^62 for every input the range allows."""
    xi = x.to(I64) - x_zp
    c = xi.shape[-1]
    d = c * xi - xi.sum(-1, keepdim=True)
    v = (torch.div((d * d).sum(-1, keepdim=True), c, rounding_mode="floor") + eps) * (1 << sqrt_bits)
    r = isqrt(v)
    inv = torch.where(r > 0, torch.div(torch.full_like(r, 1 << LN_RECIP_BITS), r.clamp(min=1), rounding_mode="floor"),
                      torch.zeros_like(r))
    n = rshift_round(d * inv, LN_RECIP_BITS - sqrt_bits // 2 - LN_NORM_BITS)
    y = rshift_round(n * gamma.to(I64) + beta.to(I64), shift) + out_zp
    return y.clamp(qmin, qmax).to(int_dtype(qmin, qmax))


@torch.library.register_fake("qc::int_layer_norm")
def _int_layer_norm_fake(x, x_zp, eps, sqrt_bits, gamma, beta, shift, out_zp, qmin, qmax):
    return torch.empty_like(x, dtype=int_dtype(qmin, qmax))


def layer_norm_consts(weight: torch.Tensor | None, bias: torch.Tensor | None, channels: int, eps: float,
                      s_x: float, s_y: float, in_levels: int = 256) -> tuple[int, int, torch.Tensor, torch.Tensor, int]:
    """(eps, sqrt_bits, gamma, beta, shift) integer parameters of int_layer_norm for a float
    LayerNorm with affine (weight, bias), input scale s_x (in_levels codes) and output scale s_y."""
    g = torch.ones(channels, dtype=torch.float64) if weight is None else weight.double()
    b = torch.zeros(channels, dtype=torch.float64) if bias is None else bias.double()
    gmax = float((g / s_y).abs().max())
    extra = max(0, min(40, 29 - math.frexp(gmax)[1])) if gmax > 0 else 0  # n * gamma stays below 2^51
    shift = LN_NORM_BITS + extra
    gamma = torch.round(g / s_y * 2.0**extra).to(I64)
    beta = torch.round(b / s_y * 2.0**shift).to(I64)
    eps_int = int(round(eps * channels * channels / (s_x * s_x)))
    v_max = channels * channels * (in_levels - 1) ** 2 // 4 + eps_int  # C^2 x the largest possible variance
    if v_max >= 2**62:
        raise QCError(f"LayerNorm over {channels} channels of {in_levels}-level inputs overflows int64")
    sqrt_bits = 16
    while sqrt_bits and v_max * 2**sqrt_bits >= 2**62:
        sqrt_bits -= 2
    return eps_int, sqrt_bits, gamma, beta, shift


# the op handles, as passes and backends refer to them
quantize = torch.ops.qc.quantize.default
dequantize = torch.ops.qc.dequantize.default
requant = torch.ops.qc.requant.default
int_linear = torch.ops.qc.int_linear.default
int_matmul = torch.ops.qc.int_matmul.default
int_conv = torch.ops.qc.int_conv.default
int_add = torch.ops.qc.int_add.default
int_lut = torch.ops.qc.int_lut.default
int_sum = torch.ops.qc.int_sum.default
int_softmax = torch.ops.qc.int_softmax.default
int_layer_norm = torch.ops.qc.int_layer_norm.default
int_mul = torch.ops.qc.int_mul.default
int_div = torch.ops.qc.int_div.default
int_l2_norm = torch.ops.qc.int_l2_norm.default

INTEGER_OPS = (quantize, dequantize, requant, int_linear, int_matmul, int_conv, int_add, int_lut, int_sum,
               int_softmax, int_layer_norm, int_mul, int_div, int_l2_norm)
