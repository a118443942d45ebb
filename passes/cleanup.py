"""Cleanup: remove inference no-ops, fold constant subgraphs, drop dead code."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from qcompiler.ir import Graph, eliminate_dead_code, is_op
from qcompiler.pipeline import EXACT, Pass, PassContext, PassResult, Rule, RuleSet, register

aten = torch.ops.aten
_FOLD_LIMIT = 1 << 26  # elements: never materialise a constant larger than this


def _known_contiguous(graph: Graph, x) -> bool:
    """True when x is certainly a contiguous tensor (its recorded value, or the constant itself)."""
    if not isinstance(x, fx.Node):
        return False
    v = graph.attr(x) if x.op == "get_attr" else x.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return False
    try:
        return bool(statically_known_true(v.is_contiguous()))
    except Exception:  # an undecidable symbolic layout: keep the copy
        return False


class DropoutIntoIdentity(Rule):
    """dropout(x, p, train=False) -> x;  alias/detach(x) -> x;  clone/contiguous(x) -> x when x
    is already contiguous (a copy of a transposed x is what lets a later view succeed)."""

    def match(self, node):
        if is_op(node, aten.dropout) and (len(node.args) < 3 or node.args[2] is False):
            return {"op": node}
        if is_op(node, aten.alias, aten.clone, aten.contiguous, aten.detach, aten.lift_fresh_copy):
            return {"op": node}
        return None

    def check(self, graph, m):
        node = m["op"]
        if not is_op(node, aten.clone, aten.contiguous):
            return None
        if node.kwargs.get("memory_format") not in (None, torch.contiguous_format, torch.preserve_format):
            return "the copy changes the memory format"
        if not _known_contiguous(graph, node.args[0]):
            return "the copy makes a non-contiguous input contiguous (a later view may need it)"
        return None

    def rewrite(self, graph, m):
        node = m["op"]
        node.replace_all_uses_with(node.args[0])
        graph.graph.erase_node(node)


@register
class RemoveIdentities(RuleSet):
    """Remove ops that are the identity at inference (dropout in eval mode, copies, aliases)."""

    name = "remove_identities"
    numerics = EXACT
    rules = (DropoutIntoIdentity,)


def _is_const(a) -> bool:
    return not isinstance(a, fx.Node) or a.op == "get_attr"


@register
class FoldConstants(Pass):
    """Evaluate every ATen op whose inputs are all constants and store the result as a buffer.

    qc:: ops are never folded (a fake-quantized weight must stay visible to backends), nor are
    results above 2^26 elements, nor ops with random or side effects.
    """

    name = "fold_constants"
    numerics = EXACT

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            t = node.target
            if t.namespace != "aten" or t._schema.is_mutable or "rand" in t._opname or "assert" in t._opname:
                continue
            flat = list(node.args) + list(node.kwargs.values())
            flat = [y for a in flat for y in (a if isinstance(a, (list, tuple)) else [a])]
            if not any(isinstance(a, fx.Node) for a in flat) or not all(_is_const(a) for a in flat):
                continue
            v = node.meta.get("val")
            if not isinstance(v, torch.Tensor) or v.numel() > _FOLD_LIMIT:
                continue
            load = lambda a: graph.attr(a) if isinstance(a, fx.Node) else a  # noqa: E731
            with torch.no_grad():
                value = t(*fx.node.map_arg(node.args, load), **fx.node.map_arg(node.kwargs, load))
            new = graph.add_constant(value, f"{node.name}_folded", before=node)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.graph.erase_node(node)
            folded += 1
        dead = eliminate_dead_code(graph)
        if folded or dead:
            graph.recompile()
        return PassResult(graph, bool(folded or dead), {"folded": folded, "dead_removed": dead})


@register
class EliminateDeadCode(Pass):
    """Erase values nothing uses and the buffers they held."""

    name = "dce"
    numerics = EXACT

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        n = eliminate_dead_code(graph)
        if n:
            graph.recompile()
        return PassResult(graph, bool(n), {"dead_removed": n})
