"""EqualizeCrossLayer: data-free cross-layer equalization (Nagel et al. 2019, "DFQ").

For a pair y = L2(f(L1(x))) with f positively homogeneous (relu, or nothing), scaling
output channel i of L1 by 1/s_i and input channel i of L2 by s_i (s_i > 0) leaves y
unchanged, because f(z / s) = f(z) / s for s > 0. With r1_i = max|W1[i, ...]| (range of
L1's output channel i) and r2_i = max|W2[:, i, ...]| (range of L2's input channel i),

    s_i = (1 / r2_i) * sqrt(r1_i * r2_i) = sqrt(r1_i / r2_i)
    W1[i] /= s_i,   b1[i] /= s_i,   W2[:, i] *= s_i

makes both ranges sqrt(r1_i * r2_i), so per-tensor and per-channel weight grids waste
less range on outlier channels. Clipping ops (relu6, hardtanh, clamp) are not homogeneous
and block a pair. A layer inside a chain L1 -> L2 -> L3 belongs to two pairs; equalizing
one pair disturbs the other, so all pairs are equalized together for up to `max_rounds`
rounds, stopping early once no scale moves by more than `tol` (relative).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qcompiler.ir import Graph, eliminate_dead_code, is_op, is_private_const, op_name
from qcompiler.pipeline import EXACT, Pass, PassContext, PassResult, register

aten = torch.ops.aten
_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d)
_LAYERS = (aten.linear, *_CONVS)


def _groups(op: fx.Node) -> int:
    return int(op.args[6]) if is_op(op, *_CONVS) and len(op.args) > 6 else 1


def _in_view(w: torch.Tensor, groups: int) -> torch.Tensor:
    """W2 rearranged to [in_channels, -1]: row i holds every weight that reads input channel i.

    A grouped conv weight [O, C/g, k...] is split into g blocks of O/g output rows; input
    channel i is column i % (C/g) of block i // (C/g)."""
    o, cpg = w.shape[0], w.shape[1]
    v = w.reshape(groups, o // groups, cpg, -1).transpose(1, 2)
    return v.reshape(groups * cpg, -1)


def _from_in_view(v: torch.Tensor, like: torch.Tensor, groups: int) -> torch.Tensor:
    o, cpg = like.shape[0], like.shape[1]
    return v.reshape(groups, cpg, o // groups, -1).transpose(1, 2).reshape(like.shape)


class _Pair:
    def __init__(self, l1: fx.Node, l2: fx.Node):
        self.l1, self.l2 = l1, l2


@register
class EqualizeCrossLayer(Pass):
    """Equalize weight ranges across conv->(relu)->conv and linear->(relu)->linear pairs."""

    name = "cle"
    numerics = EXACT
    provides = ("cross_layer_equalized",)
    max_rounds = 20
    tol = 1e-6

    def _pair(self, graph: Graph, l2: fx.Node) -> tuple[_Pair | None, str | None]:
        """The pair rooted at layer-2 `l2`, or a reason it is declined (None, None: no pair)."""
        mid = l2.args[0]
        if not isinstance(mid, fx.Node):
            return None, None
        l1 = mid.args[0] if is_op(mid, aten.relu) else mid
        if not (isinstance(l1, fx.Node) and is_op(l1, *_LAYERS)):
            src = mid.args[0] if mid.op == "call_function" and mid.args else None
            if isinstance(src, fx.Node) and is_op(src, *_LAYERS):
                return None, f"{op_name(mid)} between {src.name} and {l2.name} is not positively homogeneous"
            return None, None
        if is_op(l1, aten.linear) != is_op(l2, aten.linear):
            return None, "a linear and a conv do not form a pair"
        for n in ({l1, mid} - {l2}):
            if len(n.users) > 1:
                return None, f"{n.name} output has other users"
        for op in (l1, l2):
            if not is_private_const(op.args[1]):
                return None, f"{op.name} weight is not a constant used only there"
        b1 = l1.args[2] if len(l1.args) > 2 else None
        if b1 is not None and not is_private_const(b1):
            return None, f"{l1.name} bias is not a constant used only there"
        out1, w2 = graph.attr(l1.args[1]), graph.attr(l2.args[1])
        in2 = w2.shape[-1] if is_op(l2, aten.linear) else w2.shape[1] * _groups(l2)
        if out1.shape[0] != in2:
            return None, f"{l1.name} has {out1.shape[0]} output channels, {l2.name} reads {in2}"
        return _Pair(l1, l2), None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        pairs, declined = [], []
        for node in graph.nodes:
            if is_op(node, *_LAYERS):
                p, why = self._pair(graph, node)
                if p is not None:
                    pairs.append(p)
                elif why:
                    declined.append(f"{node.name}: {why}")
        if not pairs:
            return PassResult(graph, False, {"declined": len(declined)} if declined else {}, declined)
        w = {}  # weight/bias node -> working float64 tensor
        for p in pairs:
            for op in (p.l1, p.l2):
                for a in op.args[1:3]:
                    if isinstance(a, fx.Node) and a not in w:
                        w[a] = graph.attr(a).double().clone()
        for _ in range(self.max_rounds):
            moved = 0.0
            for p in pairs:
                w1, w2, g2 = w[p.l1.args[1]], w[p.l2.args[1]], _groups(p.l2)
                b1 = p.l1.args[2] if len(p.l1.args) > 2 else None
                v2 = w2 if is_op(p.l2, aten.linear) else _in_view(w2, g2)
                r1 = w1.reshape(w1.shape[0], -1).abs().amax(1)
                r2 = v2.abs().amax(0) if is_op(p.l2, aten.linear) else v2.abs().amax(1)
                ok = (r1 > 0) & (r2 > 0)
                s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, 1.0)), torch.ones_like(r1))
                shape1 = (-1,) + (1,) * (w1.dim() - 1)
                w1 /= s.reshape(shape1)
                if b1 is not None:
                    w[b1] /= s
                if is_op(p.l2, aten.linear):
                    w2 *= s
                else:
                    w2.copy_(_from_in_view(v2 * s[:, None], w2, g2))
                moved = max(moved, float((s - 1).abs().max()))
            if moved <= self.tol:
                break
        for a, t in w.items():
            user = next(iter(a.users))
            new = graph.add_constant(t.to(graph.attr(a).dtype), f"{user.name}_{a.name}_cle", before=user)
            user.replace_input_with(a, new)
        eliminate_dead_code(graph)
        graph.recompile()
        stats = {"pairs_equalized": len(pairs)}
        if declined:
            stats["declined"] = len(declined)
        return PassResult(graph, True, stats, declined)
