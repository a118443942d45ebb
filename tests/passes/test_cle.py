import torch

import qcompiler
from qcompiler.ir import is_op, verify
from qcompiler.ops import fake_quant
from qcompiler.passes.cle import EqualizeCrossLayer
from qcompiler.pipeline import PassManager
from qcompiler.qspec import default_weight_spec, weight_qparams

aten = torch.ops.aten
nn = torch.nn


def _cle(g):
    res = EqualizeCrossLayer()(g)
    verify(res.graph)
    return res


def _ranges(g):
    """(out-channel ranges of layer 1, in-channel ranges of layer 2) of a two-linear graph."""
    w1, w2 = [g.attr(n.args[1]).double() for n in g.nodes if is_op(n, aten.linear)]
    return w1.abs().amax(1), w2.abs().amax(0)


def _mlp(seed=0, act=nn.ReLU()):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 8), act, nn.Linear(8, 5)).eval()
    with torch.no_grad():
        m[0].weight[2] *= 100.0  # outlier channel
        m[0].bias[2] *= 100.0
        m[0].weight[5] *= 0.01
    return m


def test_equalizes_linear_pair_exactly():
    """linear->relu->linear: one pair equalized, r1_i == r2_i after, outputs equal at fp32 tolerance."""
    m = _mlp()
    g = qcompiler.trace(m, (torch.randn(4, 6),))
    res = _cle(g)
    assert res.changed and res.stats == {"pairs_equalized": 1}
    r1, r2 = _ranges(res.graph)
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=0)
    x = torch.randn(16, 6) * 3
    torch.testing.assert_close(res.graph(x)[0], m(x).detach(), rtol=1e-5, atol=1e-5)


def test_equalizes_conv_chains_identity_and_depthwise():
    """conv->relu->depthwise->conv chain (one identity link): two pairs, exact outputs, ranges converge to equal."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6, padding=1),
                      nn.Conv2d(6, 4, 1)).eval()
    with torch.no_grad():
        m[0].weight[1] *= 50.0
        m[2].weight[4] *= 0.02
    g = qcompiler.trace(m, (torch.randn(2, 3, 8, 8),))
    res = _cle(g)
    assert res.stats == {"pairs_equalized": 2}
    x = torch.randn(3, 3, 8, 8) * 2
    torch.testing.assert_close(res.graph(x)[0], m(x).detach(), rtol=1e-5, atol=1e-5)
    convs = [res.graph.attr(n.args[1]).double() for n in res.graph.nodes if is_op(n, aten.conv2d)]
    r_dw = convs[1].reshape(6, -1).abs().amax(1)  # depthwise: row i both reads and writes channel i
    r_c1 = convs[0].reshape(6, -1).abs().amax(1)
    r_c3 = convs[2].abs().amax((0, 2, 3))
    torch.testing.assert_close(r_c1, r_dw, rtol=1e-3, atol=0)
    torch.testing.assert_close(r_dw, r_c3, rtol=1e-3, atol=0)


def test_reduces_w8_per_channel_error():
    """A tiny layer-1 row feeding a huge layer-2 column: per-channel W8 output error drops after CLE."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    with torch.no_grad():
        for i in (3, 7, 11):
            m[0].weight[i] *= 0.01
            m[0].bias[i] *= 0.01
            m[2].weight[:, i] *= 100.0

    def w8_error(g):
        g = g.copy()
        for n in g.nodes:
            if is_op(n, aten.linear):
                w = g.attr(n.args[1])
                q = weight_qparams(w, default_weight_spec())
                w.copy_(fake_quant(w, q.scale, q.zero_point, q.spec.qmin, q.spec.qmax, 0, 0))
        x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
        ref = m(x).detach()
        return float((g(x)[0] - ref).pow(2).mean() / ref.pow(2).mean())

    g = qcompiler.trace(m, (torch.randn(4, 16),))
    before = w8_error(g)
    after = w8_error(_cle(g).graph)
    assert after < 0.5 * before


def test_declines_residual_branch():
    """A layer-1 output used twice (residual) is not equalized and the reason is reported."""

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) + y

    g = qcompiler.trace(Res().eval(), (torch.randn(1, 4, 5, 5),))
    res = _cle(g)
    assert not res.changed and any("other users" in d for d in res.declined)


def test_declines_clipping_activations():
    """relu6 and clamp between the layers are not homogeneous: declined with a reason."""
    for act in (nn.ReLU6(), nn.Hardtanh(-1.0, 1.0)):
        g = qcompiler.trace(_mlp(act=act), (torch.randn(4, 6),))
        res = _cle(g)
        assert not res.changed and any("not positively homogeneous" in d for d in res.declined)

    class Clamp(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.b(torch.clamp(self.a(x), -1, 1))

    res = _cle(qcompiler.trace(Clamp().eval(), (torch.randn(2, 3),)))
    assert not res.changed and any("aten.clamp" in d for d in res.declined)


def test_declines_shared_weight():
    """A layer whose weight is used by another op too is left alone."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + self.a(x * 2)

    res = _cle(qcompiler.trace(Shared().eval(), (torch.randn(2, 4),)))
    assert not res.changed and any("weight is not a constant used only there" in d for d in res.declined)


def test_no_candidates_reports_unchanged():
    """A graph with a single layer is reported unchanged with no counts."""
    g = qcompiler.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), (torch.randn(2, 4),))
    pm = PassManager(["cle"], verify_each=True)
    pm.run(g)
    assert pm.record[0]["changed"] is False and pm.record[0]["stats"] == {}
