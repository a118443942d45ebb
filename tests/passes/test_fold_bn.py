import torch

import qcompiler
from qcompiler.ir import is_op, verify
from qcompiler.pipeline import PassManager

aten = torch.ops.aten


def _bn_count(g):
    return sum(is_op(n, aten.batch_norm, aten._native_batch_norm_legit_no_training) for n in g.nodes)


def _rand_bn(bn, seed):
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    bn.running_mean.copy_(torch.randn(n, generator=g))
    bn.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.1)
    bn.weight.data.copy_(torch.randn(n, generator=g))
    bn.bias.data.copy_(torch.randn(n, generator=g))


def test_folds_every_conv_bn_pair(small_cnn):
    """Both conv+BN pairs fold: no batch norm remains, the count is exact, the graph verifies."""
    g = qcompiler.trace(small_cnn, (torch.randn(2, 3, 16, 16),))
    assert _bn_count(g) == 2
    res = qcompiler.pipeline.resolve("fold_bn")(g)
    assert res.changed and res.stats == {"BatchNormIntoConv": 2}
    assert _bn_count(res.graph) == 0
    verify(res.graph)


def test_fold_is_exact_with_outlier_channels():
    """Folded conv/linear outputs equal BN(conv) at fp32 tolerance, with outlier channels in data and stats."""
    torch.manual_seed(1)
    for conv, bn, shape in [(torch.nn.Conv2d(4, 6, 3, groups=2), torch.nn.BatchNorm2d(6), (3, 4, 9, 9)),
                            (torch.nn.Conv1d(4, 6, 3), torch.nn.BatchNorm1d(6), (3, 4, 11)),
                            (torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), (7, 5))]:
        _rand_bn(bn, 3)
        bn.running_var[0] = 1e-3  # a near-degenerate channel
        bn.weight.data[1] = 40.0  # an outlier channel
        m = torch.nn.Sequential(conv, bn).eval()
        x = torch.randn(*shape)
        x[:, 0] *= 50.0
        g = qcompiler.trace(m, (x,))
        res = qcompiler.pipeline.resolve("fold_bn")(g)
        assert res.changed and _bn_count(res.graph) == 0
        x2 = torch.randn(*shape) * 3
        torch.testing.assert_close(res.graph(x2)[0], m(x2).detach(), rtol=1e-5, atol=1e-5)


def test_declines_shared_weight():
    """A conv whose weight is used twice is left alone and the reason is reported."""

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(3, 3, 1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.c(x)) + self.c(x * 2)

    m = Shared().eval()
    _rand_bn(m.bn, 0)
    g = qcompiler.trace(m, (torch.randn(1, 3, 4, 4),))
    res = qcompiler.pipeline.resolve("fold_bn")(g)
    assert not res.changed and _bn_count(res.graph) == 1
    assert any("shared" in d for d in res.declined)


def test_declines_conv_with_other_users():
    """A conv output also used elsewhere cannot absorb the BN."""

    class Branch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.c(x)
            return self.bn(y) + y

    m = Branch().eval()
    g = qcompiler.trace(m, (torch.randn(1, 3, 4, 4),))
    res = qcompiler.pipeline.resolve("fold_bn")(g)
    assert not res.changed and any("other users" in d for d in res.declined)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(res.graph(x)[0], m(x), rtol=1e-5, atol=1e-5)


def test_no_candidates_reports_unchanged():
    """A graph without batch norm is reported unchanged with no counts."""
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    g = qcompiler.trace(m, (torch.randn(2, 4),))
    res = PassManager(["fold_bn"], verify_each=True)
    out = res.run(g)
    assert res.record[0]["changed"] is False and res.record[0]["stats"] == {}
    verify(out)
