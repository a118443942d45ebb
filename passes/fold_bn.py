"""FoldBatchNorm: fold inference-mode BatchNorm into the conv / linear that feeds it."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from qcompiler.ir import Graph, is_const, is_op, is_private_const
from qcompiler.pipeline import EXACT, Rule, RuleSet, register

aten = torch.ops.aten
_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d)


def _bn_parts(node: fx.Node):
    """(input, gamma, beta, mean, var, eps, training) of an inference batch norm, else None.

    Matches aten.batch_norm and getitem(_native_batch_norm_legit_no_training(...), 0)."""
    if is_op(node, aten.batch_norm):
        x, g, b, mean, var, training, _mom, eps = node.args[:8]
        return x, g, b, mean, var, eps, training
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        if isinstance(src, fx.Node) and is_op(src, aten._native_batch_norm_legit_no_training):
            x, g, b, mean, var, _mom, eps = src.args[:7]
            return x, g, b, mean, var, eps, False
    return None


class _BatchNormInto(Rule):
    producers: tuple = ()

    def match(self, node):
        parts = _bn_parts(node)
        if parts is None or not isinstance(parts[0], fx.Node) or not is_op(parts[0], *self.producers):
            return None
        return {"bn": node, "op": parts[0]}

    def check(self, graph: Graph, m):
        x, g, b, mean, var, eps, training = _bn_parts(m["bn"])
        op = m["op"]
        if training:
            return "batch norm runs in training mode"
        if len(op.users) > 1:
            return f"{op.name} output has other users"
        w = op.args[1]
        if not is_const(w):
            return "weight is not a constant"
        if len(w.users) > 1:
            return "weight is shared with other ops"
        bias = op.args[2] if len(op.args) > 2 else None
        if bias is not None and not is_private_const(bias):
            return "bias is not a private constant"
        for t in (mean, var):
            if not is_const(t):
                return "running statistics are not constants"
        for t in (g, b):
            if t is not None and not is_const(t):
                return "affine parameters are not constants"
        return self.extra_check(graph, m)

    def extra_check(self, graph, m):
        return None

    def rewrite(self, graph: Graph, m):
        bn, op = m["bn"], m["op"]
        x, g, b, mean, var, eps, _ = _bn_parts(bn)
        W = graph.attr(op.args[1]).double()
        mean_t, var_t = graph.attr(mean).double(), graph.attr(var).double()
        gamma = graph.attr(g).double() if g is not None else torch.ones_like(mean_t)
        beta = graph.attr(b).double() if b is not None else torch.zeros_like(mean_t)
        bias_node = op.args[2] if len(op.args) > 2 else None
        bias = graph.attr(bias_node).double() if bias_node is not None else torch.zeros_like(mean_t)
        s = gamma / torch.sqrt(var_t + eps)
        new_w = (W * s.reshape(-1, *([1] * (W.dim() - 1)))).to(graph.attr(op.args[1]).dtype)
        new_b = ((bias - mean_t) * s + beta).to(new_w.dtype)
        w_node = graph.add_constant(new_w, f"{op.name}_weight_bnfold", before=op)
        b_node = graph.add_constant(new_b, f"{op.name}_bias_bnfold", before=op)
        args = list(op.args)
        while len(args) < 3:
            args.append(None)
        args[1], args[2] = w_node, b_node
        op.args = tuple(args)
        bn.replace_all_uses_with(op)
        graph.graph.erase_node(bn)


class BatchNormIntoConv(_BatchNormInto):
    """bn(conv(x, W, b)) -> conv(x, W * s[:, None, ...], (b - mean) * s + beta),  s = gamma / sqrt(var + eps)."""

    producers = _CONVS


class BatchNormIntoLinear(_BatchNormInto):
    """bn(linear(x, W, b)) -> linear(x, W * s[:, None], (b - mean) * s + beta) for 2-D [N, C] outputs."""

    producers = (aten.linear,)

    def extra_check(self, graph, m):
        v = m["op"].meta.get("val")
        if v is None or v.dim() != 2:
            return "batch norm over a linear output that is not [N, C]"
        return None


@register
class FoldBatchNorm(RuleSet):
    """Fold inference-mode BatchNorm into the conv or linear layer that produces its input."""

    name = "fold_bn"
    numerics = EXACT
    provides = ("bn_folded",)
    rules = (BatchNormIntoConv, BatchNormIntoLinear)
