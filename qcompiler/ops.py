"""qcompiler's custom op library (namespace `qc`).

Each op's torch kernel below IS its definition: every backend must reproduce it bit for
bit (or within the tolerance its test states and justifies).
"""
from __future__ import annotations

import torch

_lib = torch.library.Library("qc", "DEF")  # noqa: F841 (owns the namespace)

_lib.define(
    "fake_quant(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis, int group_size) -> Tensor"
)


def expand_qparam(p: torch.Tensor, x: torch.Tensor, axis: int, group_size: int) -> torch.Tensor:
    """Broadcast a scale/zero-point tensor against x.

    per-tensor: p.numel() == 1.  per-channel: p is 1-D of size x.shape[axis].
    per-group (group_size > 0): p has x's rank with x.shape[axis] / group_size along `axis`
    (ONNX blocked-quantization layout); each group of `group_size` consecutive elements
    along `axis` shares one entry.
    """
    if group_size > 0:
        return p.repeat_interleave(group_size, dim=axis).narrow(axis, 0, x.shape[axis])
    if p.numel() == 1 and p.dim() <= 1:
        return p.reshape(())
    ax = axis % x.dim()
    shape = [1] * x.dim()
    shape[ax] = p.numel()
    return p.reshape(shape)


def quantize_ref(x, scale, zero_point, qmin: int, qmax: int, axis: int, group_size: int) -> torch.Tensor:
    """q = clamp(round_half_even(x / s) + z, qmin, qmax), integer values held in float32.

    Division (not multiplication by 1/s) and round-half-to-even match ONNX QuantizeLinear.
    The integer half of qc::fake_quant: importers and exporters that need the integers call this.
    """
    xf = x.float()
    s = expand_qparam(scale.float(), xf, axis, group_size)
    z = expand_qparam(zero_point.float(), xf, axis, group_size)
    return torch.clamp(torch.round(xf / s) + z, qmin, qmax)


@torch.library.impl(_lib, "fake_quant", "CompositeExplicitAutograd")
def _fake_quant(x, scale, zero_point, qmin, qmax, axis, group_size):
    """y = (quantize_ref(x) - z) * s, computed in float32."""
    q = quantize_ref(x, scale, zero_point, qmin, qmax, axis, group_size)
    z = expand_qparam(zero_point.float(), q, axis, group_size)
    return ((q - z) * expand_qparam(scale.float(), q, axis, group_size)).to(x.dtype)


@torch.library.register_fake("qc::fake_quant")
def _fake_quant_fake(x, scale, zero_point, qmin, qmax, axis, group_size):
    return torch.empty_like(x)


def _fake_quant_setup(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax, axis, group_size = inputs
    xf = x.float()
    s = expand_qparam(scale.float(), xf, axis, group_size)
    z = expand_qparam(zero_point.float(), xf, axis, group_size)
    q = torch.round(xf / s) + z
    ctx.save_for_backward((q >= qmin) & (q <= qmax))


def _fake_quant_backward(ctx, grad):
    """Straight-through estimator inside the clamp range, zero outside."""
    (inside,) = ctx.saved_tensors
    return grad * inside.to(grad.dtype), None, None, None, None, None, None


torch.library.register_autograd("qc::fake_quant", _fake_quant_backward, setup_context=_fake_quant_setup)

fake_quant = torch.ops.qc.fake_quant.default


# -- log2 / log-sqrt2 quantizers (RepQ-ViT) -----------------------------------------------------
#
# For non-negative, power-law-distributed activations (post-Softmax, post-GELU) in [0, s]:
#     t = -root * log2(x / s),   q = clamp(round_half_even(t), 0, 2^bits - 1)
#     x_hat = s * 2^(-q / root)   for q < 2^bits - 1,    x_hat = 0   for q = 2^bits - 1
# root = 1 is the log2 quantizer, root = 2 the log-sqrt2 one (base 2^(1/2)). The top code
# 2^bits - 1 is the zero code, so a b-bit code holds 2^bits - 1 levels s, s/base, ... plus 0:
# x <= 0, and x too small for the lowest level (t rounds to 2^bits - 1 or more), give 0; x > s
# saturates at s. In float32 the odd log-sqrt2 levels are round32(s * round32(sqrt 2)) * 2^(-ceil(q/2))
# (a power-of-two scaling is exact), so  fake_quant_log2(x, s, b, 2) == even + round32(sqrt 2) * odd
# bit for bit, with (even, odd) = log_sqrt2_split(x, s, b) (outside the subnormal range).

_lib.define("fake_quant_log2(Tensor x, Tensor scale, int bits, int root) -> Tensor")
_lib.define("log_sqrt2_split(Tensor x, Tensor scale, int bits) -> (Tensor, Tensor)")

SQRT2_F32 = float(torch.tensor(2.0 ** 0.5, dtype=torch.float32))  # the float32 constant both ops use


def log_code_ref(x: torch.Tensor, scale: torch.Tensor, bits: int, root: int) -> torch.Tensor:
    """q = clamp(round_half_even(-root * log2(x / s)), 0, 2^bits - 1), with 2^bits - 1 (the
    zero code) for x <= 0; integer values held in float32. The integer half of qc::fake_quant_log2."""
    if root not in (1, 2):
        raise ValueError(f"root must be 1 (log2) or 2 (log-sqrt2), got {root}")
    xf = x.float()
    s = scale.float().reshape(())
    zero = float(2**bits - 1)
    pos = xf > 0
    t = -float(root) * torch.log2(torch.where(pos, xf, s) / s)
    return torch.where(pos, torch.clamp(torch.round(t), 0.0, zero), torch.full_like(xf, zero))


def _log_levels(q: torch.Tensor, s: torch.Tensor, bits: int, root: int) -> torch.Tensor:
    """s * 2^(-q/root) for codes q below the zero code, 0 at the zero code (float32)."""
    s = s.float().reshape(())
    mant = torch.where(torch.remainder(q, 2) == 1, s * SQRT2_F32, s) if root == 2 else s
    return torch.where(q < 2**bits - 1, mant * torch.exp2(-torch.ceil(q / root)), torch.zeros_like(q))


@torch.library.impl(_lib, "fake_quant_log2", "CompositeExplicitAutograd")
def _fake_quant_log2(x, scale, bits, root):
    """x_hat = s * 2^(-q/root) (0 at the zero code), q = log_code_ref(x), in float32."""
    return _log_levels(log_code_ref(x, scale, bits, root), scale, bits, root).to(x.dtype)


@torch.library.register_fake("qc::fake_quant_log2")
def _fake_quant_log2_fake(x, scale, bits, root):
    return torch.empty_like(x)


def _log_inside(x: torch.Tensor, scale: torch.Tensor, root: int) -> torch.Tensor:
    """Where the straight-through gradient passes: 0 <= x and x not saturated at the top level."""
    xf = x.float()
    s = scale.float().reshape(())
    t = -float(root) * torch.log2(torch.where(xf > 0, xf, s) / s)
    return (xf == 0) | ((xf > 0) & (torch.round(t) >= 0))


def _fake_quant_log2_setup(ctx, inputs, output):
    x, scale, bits, root = inputs
    ctx.save_for_backward(_log_inside(x, scale, root))


def _fake_quant_log2_backward(ctx, grad):
    """Straight-through estimator on [0, s]; zero where x > s saturates and where x < 0."""
    (inside,) = ctx.saved_tensors
    return grad * inside.to(grad.dtype), None, None, None


torch.library.register_autograd("qc::fake_quant_log2", _fake_quant_log2_backward,
                                setup_context=_fake_quant_log2_setup)


@torch.library.impl(_lib, "log_sqrt2_split", "CompositeExplicitAutograd")
def _log_sqrt2_split(x, scale, bits):
    """The log-sqrt2 quantizer as two log2 (shift-only) terms:
        even = s * 2^(-q/2)       where q is even (else 0),
        odd  = s * 2^(-(q+1)/2)   where q is odd  (else 0),       q = log_code_ref(x, s, bits, 2),
    both 0 at the zero code; fake_quant_log2(x, s, bits, 2) == even + round32(sqrt 2) * odd."""
    q = log_code_ref(x, scale, bits, 2)
    s = scale.float().reshape(())
    live = q < 2**bits - 1
    odd_code = torch.remainder(q, 2) == 1
    level = s * torch.exp2(-torch.ceil(q / 2))
    zero = torch.zeros_like(level)
    even = torch.where(live & ~odd_code, level, zero)
    odd = torch.where(live & odd_code, level, zero)
    return even.to(x.dtype), odd.to(x.dtype)


@torch.library.register_fake("qc::log_sqrt2_split")
def _log_sqrt2_split_fake(x, scale, bits):
    return torch.empty_like(x), torch.empty_like(x)


def _log_sqrt2_split_setup(ctx, inputs, output):
    x, scale, bits = inputs
    q = log_code_ref(x, scale, bits, 2)
    odd = (torch.remainder(q, 2) == 1) & (q < 2**bits - 1)
    inside = _log_inside(x, scale, 2)
    ctx.save_for_backward(inside & ~odd, inside & odd)


def _log_sqrt2_split_backward(ctx, grad_even, grad_odd):
    """Straight-through for even + sqrt2 * odd: d even/dx = 1 on even codes, d odd/dx = 1/sqrt2 on odd ones."""
    m_even, m_odd = ctx.saved_tensors
    like = grad_even if grad_even is not None else grad_odd
    g = torch.zeros_like(like)
    if grad_even is not None:
        g = g + grad_even * m_even.to(g.dtype)
    if grad_odd is not None:
        g = g + grad_odd * m_odd.to(g.dtype) / SQRT2_F32
    return g, None, None


torch.library.register_autograd("qc::log_sqrt2_split", _log_sqrt2_split_backward,
                                setup_context=_log_sqrt2_split_setup)

fake_quant_log2 = torch.ops.qc.fake_quant_log2.default
log_sqrt2_split = torch.ops.qc.log_sqrt2_split.default
