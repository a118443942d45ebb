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
