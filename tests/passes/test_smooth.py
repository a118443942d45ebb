import pytest
import torch
import torch.fx as fx

import qcompiler
from qcompiler.calib import CalibData
from qcompiler.errors import QCError
from qcompiler.ir import is_op, verify
from qcompiler.passes.calibrate import _Recorder
from qcompiler.passes.smooth import FoldSmoothingScales, _fq_act, _fq_w
from qcompiler.pipeline import PassContext

aten = torch.ops.aten
nn = torch.nn
OUTLIERS = (1, 5, 9)


def _data(n, c, seed, lead=()):
    """Seeded activations with a few outlier channels (x100)."""
    x = torch.randn(n, *lead, c, generator=torch.Generator().manual_seed(seed))
    x[..., list(OUTLIERS)] *= 100.0
    return x


class Attn(nn.Module):
    """LayerNorm feeding q/k/v linears (one smoothing group); the LN gamma has outlier channels."""

    def __init__(self, c=16):
        super().__init__()
        self.ln, self.q, self.k, self.v = nn.LayerNorm(c), nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, 8)
        with torch.no_grad():
            self.ln.weight.normal_()
            self.ln.weight[list(OUTLIERS)] *= 100.0
            self.ln.bias.normal_()

    def forward(self, x):
        h = self.ln(x)
        return self.q(h) * self.k(h).sigmoid(), self.v(h)


class Chain(nn.Module):
    """linear -> linear (absorbed) -> relu -> linear (explicit mul); the first input is a placeholder."""

    def __init__(self, c=16):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, 4)
        with torch.no_grad():
            self.a.weight[list(OUTLIERS)] *= 100.0
            self.a.bias[list(OUTLIERS)] *= 100.0

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x))))


def _smooth(m, shape, seed=0):
    torch.manual_seed(seed)
    m = m.eval()
    g = qcompiler.trace(m, (_data(shape[0], shape[-1], 0, shape[1:-1]),))
    calib = CalibData({"x": _data(64, shape[-1], 1, shape[1:-1]).numpy()}, batch_size=16)
    res = FoldSmoothingScales()(g.copy(), PassContext(calib=calib))
    verify(res.graph)
    return g, res, calib


def _assert_equiv(m, res, x):
    """Outputs equal at rtol=atol=1e-5 relative to each output's max-abs (outliers make outputs ~1e3)."""
    for got, ref in zip(res.graph(x), m(x) if isinstance(m(x), tuple) else (m(x),)):
        ref = ref.detach()
        scale = float(ref.abs().max())
        torch.testing.assert_close(got / scale, ref / scale, rtol=1e-5, atol=1e-5)


def _input_amax(g, calib):
    """Per-channel max|X| of every linear's input over the calibration data."""
    watch = {n.args[0].name for n in g.nodes if is_op(n, aten.linear)}
    out = {}
    rec = _Recorder(g.gm, watch, lambda n, v: out.__setitem__(n.name, torch.maximum(
        out.get(n.name, torch.zeros(v.shape[-1])), v.detach().reshape(-1, v.shape[-1]).abs().amax(0))))
    for b in calib.batches(g.inputs):
        rec.run(*b)
    return out


def _w8a8_error(g, m, x):
    """Relative output error with every linear run as fq_a(X) @ fq_w(W)^T + b (int8 sym, per-tensor / per-channel)."""

    class Q(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is aten.linear.default:
                return (_fq_act(args[0]) @ _fq_w(args[1].double()).t()).float() + (args[2] if len(args) > 2 else 0)
            return super().call_function(target, args, kwargs)

    got, ref = Q(g.gm).run(x), m(x)
    ref = ref if isinstance(ref, tuple) else (ref,)
    return sum(float((a - b.detach()).pow(2).sum() / b.detach().pow(2).sum()) for a, b in zip(got, ref))


def test_layernorm_qkv_share_one_scale():
    """LayerNorm -> q/k/v: one group folded into gamma/beta, one alpha, outputs equal."""
    m = Attn()
    g, res, _ = _smooth(m, (4, 6, 16))
    assert res.changed
    assert res.stats["layernorm"] == 1 and sum(v for k, v in res.stats.items() if k.startswith("alpha_")) == 1
    assert "explicit_mul" not in res.stats and "linear" not in res.stats
    _assert_equiv(m, res, _data(3, 16, 7, (6,)))


def test_linear_absorbs_and_relu_blocks():
    """linear->linear folds into the producer rows; relu in between forces an explicit mul; placeholder input too."""
    m = Chain()
    g, res, _ = _smooth(m, (8, 16))
    assert res.stats["linear"] == 1 and res.stats["explicit_mul"] == 2 and "layernorm" not in res.stats
    assert sum(is_op(n, aten.mul) for n in res.graph.nodes) == 2
    _assert_equiv(m, res, _data(32, 16, 9))


def test_activation_channels_flatter():
    """After smoothing, max/median of per-channel max|X| of every smoothed linear input drops."""
    for m, shape in ((Attn(), (4, 6, 16)), (Chain(), (8, 16))):
        g, res, calib = _smooth(m, shape)
        ratio = lambda a: float(a.max() / a.median())  # noqa: E731
        before = sorted(ratio(a) for a in _input_amax(g, calib).values())
        after = sorted(ratio(a) for a in _input_amax(res.graph, calib).values())
        assert max(after) < max(before) / 4


def test_w8a8_error_drops_on_outliers():
    """The W8A8 fake-quant output error of the smoothed graph is lower than of the original."""
    for m, shape in ((Attn(), (4, 6, 16)), (Chain(), (8, 16))):
        g, res, _ = _smooth(m, shape)
        x = _data(32, shape[-1], 11, shape[1:-1])
        assert _w8a8_error(res.graph, m, x) < 0.5 * _w8a8_error(g, m, x)


def test_declines_shared_and_non_constant_weights():
    """A weight shared by two linears, and a linear whose weight is an input, are declined with reasons."""

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)

        def forward(self, x):
            return self.a(x) + self.a(torch.relu(x)) + nn.functional.linear(x, x.t() @ x)

    m = Bad().eval()
    g, res, _ = _smooth(m, (8, 16))
    assert not res.changed
    assert sum("shared" in d for d in res.declined) == 2 and any("not a constant" in d for d in res.declined)


def test_no_linears_unchanged_and_needs_calib():
    """A graph without linears is unchanged with no counts; a missing calibration set is a QCError."""
    m = nn.Sequential(nn.ReLU()).eval()
    g = qcompiler.trace(m, (torch.randn(2, 4),))
    res = FoldSmoothingScales()(g, PassContext(calib=CalibData({"x": torch.randn(4, 4).numpy()})))
    assert not res.changed and res.stats == {}
    with pytest.raises(QCError, match="calibration"):
        FoldSmoothingScales()(g)


def test_dead_channel_keeps_unit_scale():
    """A channel that is 0 on all calibration rows gets s = 1, not the 1e-5 clamp (no noise amplification)."""
    from qcompiler.passes.smooth import FoldSmoothingScales

    g = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 6, generator=g, dtype=torch.float64).abs()
    xs[:, 2] = 0.0
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    _, s = FoldSmoothingScales()._search(xs, xs.abs().amax(0), w.abs().amax(0), [w])
    assert float(s[2]) == 1.0 and bool((s[[0, 1, 3, 4, 5]] != 1.0).any())


def test_alpha_search_uses_the_configured_widths():
    """The alpha search prices the error at the widths the model is quantized with: with 4-bit weights
    (8-bit activations) it migrates less into the weights than at W8A8."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(256, 32, generator=g, dtype=torch.float64)
    xs[:, [1, 5]] *= 10.0
    w = torch.randn(16, 32, generator=g, dtype=torch.float64)
    search = FoldSmoothingScales()._search
    a8, _ = search(xs, xs.abs().amax(0), w.abs().amax(0), [w], 8, 8)
    a4, _ = search(xs, xs.abs().amax(0), w.abs().amax(0), [w], 4, 8)
    assert a8 is not None and a4 is not None and a4 < a8


def test_group_without_gain_is_left_unsmoothed():
    """Where no alpha lowers the quantized error below leaving X and W alone (here every channel's
    max|X| and max|W| are 1, so every s is 1), the group is declined with a reason and the graph is
    unchanged; the pass reads the widths from the config."""
    from qcompiler.config import Config
    m = nn.Linear(16, 8, bias=False).eval()
    with torch.no_grad():
        m.weight.copy_(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).sign())
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)).sign()
    g = qcompiler.trace(m, (x[:2],))
    ctx = PassContext(config=Config(w_bits=4, a_bits=8), calib=CalibData({g.inputs[0].name: x.numpy()}, batch_size=16))
    res = FoldSmoothingScales()(g, ctx)
    assert not res.changed and res.stats == {"unsmoothed": 1}
    assert any("W4A8" in d and "left unsmoothed" in d for d in res.declined)
