"""FoldAdditiveMask: an additive attention mask becomes a masked softmax.

BERT-style encoders add  m = c * (1 - float(M))  to the attention logits before the softmax,
with M the integer attention mask and c <= -1e3. For a binary M (what an attention mask is)
    softmax(x + c (1 - M)) = softmax(where(M != 0, x, -inf))
exactly in float32 whenever |x| < |c| - 104 (exp then underflows to 0 for every masked
entry). The rewrite matters for quantization: the logits keep their own range instead of
sharing one grid with -10000, and the integer softmax takes the mask as a separate input.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qcompiler.ir import Graph, is_op
from qcompiler.pipeline import EXACT, Rule, RuleSet, register

aten = torch.ops.aten
_CARRY = (aten.slice, aten.unsqueeze, aten.view, aten.reshape, aten.expand)  # re-applied to the boolean mask
MIN_BIAS = -1e3


def _mask_chain(m: fx.Node):
    """(integer mask M, [carry ops from M's float form to m], c) when m = carry(rsub(to(M), 1)) * c."""
    if not (is_op(m, aten.mul) and isinstance(m.args[1], (int, float)) and m.args[1] <= MIN_BIAS):
        return None
    chain, v = [], m.args[0]
    while isinstance(v, fx.Node) and is_op(v, *_CARRY):
        chain.append(v)
        v = v.args[0]
    if not (isinstance(v, fx.Node) and is_op(v, aten.rsub) and v.args[1] == 1 and len(v.args) == 2):
        return None
    src = v.args[0]
    if not (isinstance(src, fx.Node) and is_op(src, aten.to, aten._to_copy)):
        return None
    mask = src.args[0]
    val = mask.meta.get("val") if isinstance(mask, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dtype.is_floating_point:
        return None
    return mask, list(reversed(chain)), m.args[1]


class AdditiveMaskIntoMaskedSoftmax(Rule):
    """softmax(x + c (1 - float(M))) -> softmax(where(M != 0, x, -inf)),  M binary, c <= -1e3."""

    def match(self, node):
        if not (is_op(node, aten.softmax, aten._softmax) and is_op(node.args[0], aten.add)):
            return None
        add = node.args[0]
        for i in (0, 1):
            if isinstance(add.args[1 - i], fx.Node) and _mask_chain(add.args[1 - i]):
                return {"softmax": node, "add": add, "x": add.args[i], "bias": add.args[1 - i]}
        return None

    def check(self, graph, m):
        if len(m["add"].users) > 1:
            return "the masked logits have other users"
        xv, bv = m["x"].meta.get("val"), m["bias"].meta.get("val")
        if isinstance(xv, torch.Tensor) and isinstance(bv, torch.Tensor) and \
                torch.broadcast_shapes(xv.shape, bv.shape) != xv.shape:
            return "the mask broadcasts the logits to a larger shape"
        return None

    def rewrite(self, graph: Graph, m):
        mask, chain, _ = _mask_chain(m["bias"])
        g = graph.graph
        with g.inserting_before(m["add"]):
            cond = g.call_function(aten.ne.Scalar, (mask, 0))
            cond.meta["val"] = mask.meta["val"] != 0
            for op in chain:
                cond = g.call_function(op.target, (cond, *op.args[1:]), dict(op.kwargs))
            w = g.call_function(aten.where.ScalarOther, (cond, m["x"], float("-inf")))
        w.meta["val"] = m["add"].meta.get("val")
        m["add"].replace_all_uses_with(w)
        g.erase_node(m["add"])


@register
class FoldAdditiveMask(RuleSet):
    """Turn additive attention masks into masked softmaxes (see the module docstring)."""

    name = "fold_additive_mask"
    numerics = EXACT
    rules = (AdditiveMaskIntoMaskedSoftmax,)
