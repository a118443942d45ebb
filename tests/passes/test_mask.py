"""fold_additive_mask: softmax(x + c (1 - float(M))) -> softmax(where(M != 0, x, -inf))."""
from __future__ import annotations

import torch
import torch.nn as nn

import qcompiler
from qcompiler.ir import is_op
from qcompiler.pipeline import PassManager

aten = torch.ops.aten


class MaskedAttention(nn.Module):
    def __init__(self, bias=-10000.0, dim=16):
        super().__init__()
        self.bias, self.q, self.k = bias, nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, mask):
        m = (1.0 - mask.to(x.dtype))[:, None, :] * self.bias
        return torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1) + m, dim=-1)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 16, generator=g)
    x[..., 2] *= 50  # an outlier channel
    mask = (torch.rand(3, 7, generator=g) > 0.3).long()
    mask[:, 0] = 1
    return x, mask


def _trace(m):
    return qcompiler.trace(m.eval(), _inputs(), input_names=["x", "mask"])


def test_additive_mask_becomes_where_and_outputs_match():
    """The add of the mask bias is replaced by where(mask != 0, x, -inf); outputs are equal (fp32 tolerance)."""
    torch.manual_seed(0)
    m = MaskedAttention()
    g = _trace(m)
    before = g.copy()
    pm = PassManager(["fold_additive_mask"], verify_each=True)
    g = pm.run(g)
    assert pm.record[0]["changed"] and pm.record[0]["stats"]["AdditiveMaskIntoMaskedSoftmax"] == 1
    ops = [n for n in g.op_nodes()]
    assert any(is_op(n, aten.where) for n in ops) and not any(is_op(n, aten.rsub) for n in ops)
    for seed in range(3):
        x, mask = _inputs(seed)
        torch.testing.assert_close(g(x, mask)[0], before(x, mask)[0], rtol=1e-5, atol=1e-5)


def test_small_bias_is_not_a_mask():
    """A bias of -10 does not push exp() to 0: the rewrite must not fire."""
    torch.manual_seed(0)
    pm = PassManager(["fold_additive_mask"])
    pm.run(_trace(MaskedAttention(bias=-10.0)))
    assert not pm.record[0]["changed"]


class SharedLogits(MaskedAttention):
    def forward(self, x, mask):
        m = (1.0 - mask.to(x.dtype))[:, None, :] * self.bias
        s = self.q(x) @ self.k(x).transpose(-2, -1) + m
        return torch.softmax(s, dim=-1) + s.mean()


def test_logits_with_other_users_are_declined():
    """When the masked logits feed something besides the softmax, the rule declines and says why."""
    torch.manual_seed(0)
    pm = PassManager(["fold_additive_mask"])
    pm.run(_trace(SharedLogits()))
    rec = pm.record[0]
    assert not rec["changed"] and any("other users" in d for d in rec["declined"])
