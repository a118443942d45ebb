import numpy as np
import pytest
import torch

from qcompiler import QCError, QuantSpec
from qcompiler.ops import fake_quant
from qcompiler.qspec import Observer, qparams_from_range, weight_qparams


def test_ranges_for_every_width():
    """qmin/qmax for signed, unsigned and narrow ranges from 2 to 16 bits."""
    for b in range(2, 17):
        assert (QuantSpec(bits=b).qmin, QuantSpec(bits=b).qmax) == (-(2 ** (b - 1)), 2 ** (b - 1) - 1)
        assert (QuantSpec(bits=b, signed=False).qmin, QuantSpec(bits=b, signed=False).qmax) == (0, 2 ** b - 1)
        assert QuantSpec(bits=b, narrow_range=True).qmin == -(2 ** (b - 1)) + 1
    for bad in (1, 17):
        with pytest.raises(QCError, match="between 2 and 16"):
            QuantSpec(bits=bad)
    with pytest.raises(QCError, match="group_size"):
        QuantSpec(granularity="group")
    with pytest.raises(QCError, match="unknown observer"):
        QuantSpec(observer="magic")


def test_fake_quant_rounds_half_to_even_and_saturates():
    """Ties round to even (as ONNX QuantizeLinear), values beyond the range saturate at both ends."""
    s, z = torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 200.0, -200.0, 126.6])
    y = fake_quant(x, s, z, -128, 127, 0, 0)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 127.0, -128.0, 127.0]
    # asymmetric uint8 with a zero point: zero is exact, the range ends are reachable
    s, z = torch.tensor(0.1), torch.tensor(30, dtype=torch.int32)
    y = fake_quant(torch.tensor([0.0, -3.0, -100.0, 22.5, 100.0]), s, z, 0, 255, 0, 0)
    torch.testing.assert_close(y, torch.tensor([0.0, -3.0, -3.0, 22.5, 22.5]), rtol=0, atol=1e-6)


def test_fake_quant_per_channel_and_per_group():
    """Per-channel scales apply along the given axis; per-group scales to consecutive blocks."""
    w = torch.randn(4, 6, 3)
    spec = QuantSpec(granularity="channel", axis=1, narrow_range=True)
    qp = weight_qparams(w, spec)
    assert qp.scale.shape == (6,)
    y = fake_quant(w, qp.scale, qp.zero_point, spec.qmin, spec.qmax, 1, 0)
    for c in range(6):
        ref = torch.clamp(torch.round(w[:, c] / qp.scale[c]), -127, 127) * qp.scale[c]
        torch.testing.assert_close(y[:, c], ref, rtol=0, atol=0)
    g = QuantSpec(bits=4, granularity="group", axis=1, group_size=4, narrow_range=True)
    w2 = torch.randn(5, 10)
    qp2 = weight_qparams(w2, g)
    assert qp2.scale.shape == (5, 3)  # ceil(10 / 4) groups along axis 1
    y2 = fake_quant(w2, qp2.scale, qp2.zero_point, g.qmin, g.qmax, 1, 4)
    blocks = (y2 / qp2.scale.repeat_interleave(4, 1)[:, :10])
    torch.testing.assert_close(blocks, torch.round(blocks), rtol=0, atol=1e-5)
    assert float(torch.round(blocks).abs().max()) <= 7


def test_weight_error_is_within_half_a_step():
    """Per-channel min-max quantization error is at most half a quantization step everywhere."""
    w = torch.randn(16, 32) * torch.logspace(-3, 2, 16)[:, None]
    spec = QuantSpec(granularity="channel", axis=0, narrow_range=True)
    qp = weight_qparams(w, spec)
    y = fake_quant(w, qp.scale, qp.zero_point, spec.qmin, spec.qmax, 0, 0)
    assert bool(((y - w).abs() <= qp.scale[:, None] / 2 * (1 + 1e-6)).all())


def test_straight_through_gradient():
    """The fake-quant gradient passes through inside the range and is zero where it clamps."""
    x = torch.tensor([0.3, 5.0, -5.0], requires_grad=True)
    y = fake_quant(x, torch.tensor(0.01), torch.tensor(0, dtype=torch.int32), -128, 127, 0, 0)
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0]


def _heavy_tail(n=200_000, seed=0):
    g = np.random.default_rng(seed)
    return torch.from_numpy(g.laplace(size=n).astype(np.float32))  # long tails, as activations often have


def _mse(spec, x):
    o = Observer(spec)
    for chunk in x.split(50_000):
        o.observe(chunk)
    qp = o.qparams()
    y = fake_quant(x, qp.scale, qp.zero_point, spec.qmin, spec.qmax, 0, 0)
    return float(((y - x) ** 2).mean()), qp


def test_observers_clip_long_tails():
    """On long-tailed data MSE and KL clip and beat min-max in squared error; percentile clips at its quantile."""
    x = _heavy_tail()
    base = QuantSpec(symmetric=True)
    e_minmax, qp = _mse(base, x)
    assert float(qp.scale) == pytest.approx(float(x.abs().max()) / 127, rel=1e-6)
    for obs in ("mse", "kl"):
        e, qp_o = _mse(base.with_(observer=obs), x)
        assert e < e_minmax and float(qp_o.scale) < float(qp.scale), obs
    _, qp_p = _mse(base.with_(observer="percentile", percentile=99.9), x)
    q = np.quantile(x.numpy(), [0.001, 0.999])
    assert float(qp_p.scale) == pytest.approx(max(-q[0], q[1]) / 127, rel=0.05)


def test_observer_rejects_nan_and_empty():
    """Observers refuse NaN/inf values and report when no data reached them."""
    o = Observer(QuantSpec())
    with pytest.raises(QCError, match="NaN"):
        o.observe(torch.tensor([1.0, float("nan")]))
    with pytest.raises(QCError, match="no calibration data"):
        Observer(QuantSpec()).qparams()


def test_asymmetric_range_maps_zero_exactly():
    """Asymmetric qparams keep zero exactly representable and cover [lo, hi]."""
    spec = QuantSpec(symmetric=False, signed=False)
    s, z = qparams_from_range(torch.tensor([-1.0]), torch.tensor([3.0]), spec)
    assert 0 <= int(z) <= 255
    y = fake_quant(torch.tensor([0.0, -1.0, 3.0]), s, z, 0, 255, 0, 0)
    assert float(y[0]) == 0.0
    torch.testing.assert_close(y[1:], torch.tensor([-1.0, 3.0]), rtol=0, atol=float(s) / 2 + 1e-7)
