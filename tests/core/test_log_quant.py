import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from qcompiler import QCError, QuantSpec
from qcompiler.ops import SQRT2_F32, fake_quant_log2, log_code_ref, log_sqrt2_split
from qcompiler.qspec import Observer, fake_quantize


def _power_law(n=20_000, s=0.8, seed=0):
    """Values s * 2^-u with u uniform in [0, 24]: many decades, as attention probabilities have."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 24
    return (s * torch.exp2(-u)).float()


def _ref64(x, s, bits, root):
    """The float64 formula: q = clip(round(-root log2(x/s)), 0, 2^b-1), x_hat = s 2^(-q/root), 0 at 2^b-1."""
    t = -root * torch.log2(x.double() / s)
    q = torch.clamp(torch.round(t), 0, 2**bits - 1)
    return q, torch.where(q < 2**bits - 1, s * torch.exp2(-q / root), torch.zeros_like(t)), t


@pytest.mark.parametrize("bits,root", [(4, 1), (8, 1), (4, 2), (8, 2)])
def test_log_quant_matches_float64_formula(bits, root):
    """Codes equal the float64 formula's away from .5 ties; log2 levels are exact, log-sqrt2 within 2 ulp."""
    s = 0.8
    x = _power_law()
    q64, y64, t = _ref64(x, s, bits, root)
    away = (t - torch.floor(t) - 0.5).abs() > 1e-4
    q = log_code_ref(x, torch.tensor(s), bits, root)
    assert torch.equal(q.double()[away], q64[away])
    y = fake_quant_log2(x, torch.tensor(s), bits, root)
    assert y.dtype == torch.float32
    if root == 1:
        assert torch.equal(y.double()[away], y64.float().double()[away])
    else:
        torch.testing.assert_close(y.double()[away], y64[away], rtol=2.5e-7, atol=0)
    assert set(torch.unique(q).tolist()) <= set(range(2**bits))


def test_zero_code_and_saturation():
    """0 and negatives give the zero code (x_hat 0); x > s saturates at s; the lowest level is s 2^-(2^b-2)/k."""
    s = torch.tensor(0.5)
    for root in (1, 2):
        lowest = 0.5 * 2.0 ** (-(2**3 - 2) / root)
        x = torch.tensor([0.0, -0.3, 2.0, 0.5, lowest, lowest * 2.0 ** (-0.49 / root), lowest * 2.0 ** (-0.51 / root)])
        q = log_code_ref(x, s, 3, root)
        assert q.tolist() == [7, 7, 0, 0, 6, 6, 7]
        y = fake_quant_log2(x, s, 3, root)
        assert y[:4].tolist() == [0.0, 0.0, 0.5, 0.5]
        assert y[4] == y[5] == pytest.approx(lowest, rel=1e-6) and y[6] == 0.0


def test_straight_through_gradient():
    """The gradient passes on [0, s] (flush-to-zero included) and is zero where x > s saturates or x < 0."""
    s = torch.tensor(1.0)
    for root in (1, 2):
        x = torch.tensor([0.3, 1e-12, 0.0, 1.0, 5.0, -0.2], requires_grad=True)
        fake_quant_log2(x, s, 4, root).sum().backward()
        assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    x = torch.tensor([0.3, 0.21, 5.0, 0.0], requires_grad=True)
    even, odd = log_sqrt2_split(x, s, 4)
    (even + SQRT2_F32 * odd).sum().backward()  # even + sqrt2 * odd is the log-sqrt2 quantizer
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 1.0, 0.0, 1.0]))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_split_recombines_bit_for_bit(bits):
    """log_sqrt2_split gives two shift-only terms (s 2^-n) on disjoint codes; even + sqrt2 odd == log-sqrt2 exactly."""
    s = torch.tensor(0.9)
    x = torch.cat([_power_law(s=0.9), torch.tensor([0.0, 1.5])])
    y = fake_quant_log2(x, s, bits, 2)
    even, odd = log_sqrt2_split(x, s, bits)
    assert torch.equal(even + SQRT2_F32 * odd, y)
    assert not ((even != 0) & (odd != 0)).any()
    for part in (even, odd):
        n = -torch.log2(part[part != 0].double() / s.double())
        assert torch.equal(n, torch.round(n))


def test_log_spec_observer_and_dispatch():
    """A log spec is per-tensor with codes [0, 2^b-1]; its observer's scale is the maximum; fake_quantize dispatches."""
    spec = QuantSpec(bits=4, signed=False, log_base="sqrt2")
    assert (spec.qmin, spec.qmax, spec.log_root) == (0, 15, 2)
    assert QuantSpec(log_base="2").log_root == 1 and QuantSpec().log_root == 0
    assert "log√2" in spec.describe()
    o = Observer(spec)
    x = torch.softmax(torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3, -1)
    o.observe(x[:2]), o.observe(x[2:])
    qp = o.qparams()
    assert float(qp.scale) == float(x.max()) and int(qp.zero_point) == 0 and qp.scale.dim() == 0
    assert torch.equal(fake_quantize(x, qp), fake_quant_log2(x, qp.scale, 4, 2))
    with pytest.raises(QCError, match="log_base"):
        QuantSpec(log_base="e")
    with pytest.raises(QCError, match="per-tensor"):
        QuantSpec(log_base="2", granularity="channel")


def test_fake_kernels_give_shapes():
    """Both ops propagate shapes and dtypes under fake tensors (what the verifier and export use)."""
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.rand(2, 3, 5))
        s = mode.from_tensor(torch.tensor(1.0))
        assert fake_quant_log2(x, s, 8, 1).shape == (2, 3, 5)
        e, o = log_sqrt2_split(x, s, 8)
        assert e.shape == o.shape == (2, 3, 5) and e.dtype == torch.float32
    assert math.isclose(SQRT2_F32, 2 ** 0.5, rel_tol=1e-7)
