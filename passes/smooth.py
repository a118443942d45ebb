"""FoldSmoothingScales: SmoothQuant (Xiao et al. 2023) with the scales folded away.

A consumer y = X @ W^T (aten.linear, or aten.matmul(X, W) with W = W_lin^T) is unchanged by
    y = (X diag(1/s)) @ (W diag(s))^T
for any positive per-input-channel s. Outlier activation channels move into the weights:
    s_j = clamp(max|X_j|^alpha / max|W_j|^(1 - alpha), 1e-5, 1e5)   (s_j = 1 where max|X_j| = 0)
with max|X_j| over calibration data and max|W_j| over column j of every consumer of X (the
consumers of one X, e.g. q/k/v after one LayerNorm, form a group and share s). X / s is
folded into X's producer where it can absorb a per-channel scale:
    layer_norm(x, [C], gamma, beta):  gamma /= s,  beta /= s;
    linear(x, Wp, bp) whose output feeds only smoothed linears:  Wp[j, :] /= s_j,  bp[j] /= s_j;
otherwise an explicit aten.mul(X, 1/s) is inserted in front of the group.
alpha is chosen per group from {0.3, ..., 0.8}: the one minimising the relative WbAa error
sum ||fq_a(X/s) fq_w(W s)^T - X W^T||^2 / ||X W^T||^2 over the group's consumers on (at most
`max_rows` rows of) calibration data, with fq_a per-tensor symmetric and fq_w per-output-channel
symmetric at the widths the config quantizes with (ctx.config.a_bits / w_bits, 8 without a
config; qcompiler.ops.fake_quant). A group whose unsmoothed error (s = 1) is no larger than the
best alpha's is left alone and reported as declined: moving outliers into 4-bit weights under
8-bit activations can cost more than it saves (MiniLM W4A8, bench/accuracy.py: smooth alone 0.824
cosine before this check and 0.897 after, the min-max baseline 0.886). Groups are processed
in reverse graph order, so a linear that is both a producer and a consumer is searched with its
final rows.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from qcompiler.errors import QCError
from qcompiler.ir import Graph, eliminate_dead_code, is_const, is_op, is_private_const
from qcompiler.pipeline import EXACT, Pass, PassContext, PassResult, register
from qcompiler.qspec import QParams, QuantSpec, default_weight_spec, fake_quantize, qparams_from_range, weight_qparams

from .calibrate import _Recorder

aten = torch.ops.aten
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_ACT = QuantSpec(bits=8, signed=True, symmetric=True)
_W = default_weight_spec()


def _w_lin(graph: Graph, op: fx.Node) -> torch.Tensor:
    """The consumer weight as [out, in] (linear layout), float64."""
    w = graph.attr(op.args[1]).double()
    return w if is_op(op, aten.linear) else w.t()


def _fq_act(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    spec = _ACT.with_(bits=bits)
    a = x.abs().amax().float().reshape(1)
    return fake_quantize(x.float(), QParams(*qparams_from_range(-a, a, spec), spec)).double()


def _fq_w(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    spec = _W.with_(bits=bits)
    return fake_quantize(w.float(), weight_qparams(w.float(), spec)).double()


@register
class FoldSmoothingScales(Pass):
    """Migrate activation outliers into linear weights (SmoothQuant), folding 1/s into the producer."""

    name = "smooth"
    numerics = EXACT
    provides = ("smoothed",)
    max_batches = 16
    max_rows = 2048

    def _consumer(self, graph: Graph, op: fx.Node) -> tuple[bool, str | None]:
        """(eligible, reason declined) for a linear/matmul node."""
        if is_op(op, aten.matmul):
            if not is_const(op.args[1]) or graph.attr(op.args[1]).dim() != 2:
                return False, None  # activation @ activation (attention), batched W: not a target
        elif not is_op(op, aten.linear):
            return False, None
        x, w = op.args[0], op.args[1]
        if not is_const(w):
            return False, "weight is not a constant"
        if len(w.users) > 1:
            return False, "weight is shared with other ops"
        if not isinstance(x, fx.Node):
            return False, "input is not a graph value"
        return True, None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if ctx.calib is None:
            raise QCError("smoothing needs calibration data (ctx.calib)")
        declined: list[str] = []
        groups: dict[fx.Node, list[fx.Node]] = {}
        for n in graph.nodes:
            ok, why = self._consumer(graph, n)
            if ok:
                groups.setdefault(n.args[0], []).append(n)
            elif why:
                declined.append(f"{n.name}: {why}")
        if not groups:
            return PassResult(graph, False, {}, declined)
        amax = {x: None for x in groups}
        rows: dict[fx.Node, list[torch.Tensor]] = {x: [] for x in groups}
        by_name = {x.name: x for x in groups}

        def record(n, v):
            x = by_name[n.name]
            v = v.detach().reshape(-1, v.shape[-1])
            m = v.abs().amax(0).double()
            amax[x] = m if amax[x] is None else torch.maximum(amax[x], m)
            have = sum(len(r) for r in rows[x])
            if have < self.max_rows:  # a copy of the rows kept, not a view that holds the whole batch
                rows[x].append(v[: self.max_rows - have].to(torch.float64, copy=True))

        rec = _Recorder(graph.gm, set(by_name), record)
        with torch.no_grad():
            for batch in ctx.calib.batches(graph.inputs, self.max_batches):
                rec.run(*batch)
        stats: Counter = Counter()
        order = {n: i for i, n in enumerate(graph.nodes)}
        w_bits, a_bits = int(getattr(ctx.config, "w_bits", 8)), int(getattr(ctx.config, "a_bits", 8))
        for x in sorted(groups, key=order.__getitem__, reverse=True):
            ops = groups[x]
            xs = torch.cat(rows[x])[: self.max_rows]
            ws = [_w_lin(graph, o) for o in ops]
            wmax = torch.stack([w.abs().amax(0) for w in ws]).amax(0)
            alpha, s = self._search(xs, amax[x], wmax, ws, w_bits, a_bits)
            if s is None:
                declined.append(f"{x.name}: no alpha lowers the W{w_bits}A{a_bits} error of "
                                f"{', '.join(o.name for o in ops)}; left unsmoothed")
                stats["unsmoothed"] += 1
                continue
            kind = self._fold(graph, x, ops, s)
            for o, w in zip(ops, ws):
                ws_new = w * s
                self._set(graph, o, 1, ws_new if is_op(o, aten.linear) else ws_new.t())
            stats[kind] += 1
            stats[f"alpha_{alpha:.1f}"] += 1
        changed = sum(v for k, v in stats.items() if k != "unsmoothed") > 0
        if changed:
            eliminate_dead_code(graph)
            graph.recompile()
        return PassResult(graph, changed, dict(stats), declined)

    def _search(self, xs, xmax, wmax, ws, w_bits: int = 8, a_bits: int = 8):
        """(alpha, s) with the lowest relative W{w_bits}A{a_bits} error of the group's consumers on
        `xs`, or (None, None) when no alpha's error is below that of leaving X and W as they are."""
        refs = [xs @ w.t() for w in ws]

        def error(xq, s):
            return sum(float((xq @ _fq_w(w * s, w_bits).t() - r).pow(2).sum() / r.pow(2).sum().clamp_min(1e-30))
                       for w, r in zip(ws, refs))

        unsmoothed = error(_fq_act(xs, a_bits), torch.ones_like(xmax))
        best = None
        for alpha in ALPHAS:
            s = (xmax.clamp_min(1e-12) ** alpha / wmax.clamp_min(1e-12) ** (1 - alpha)).clamp(1e-5, 1e5)
            # a channel that is 0 on all calibration data (a dead ReLU) keeps s = 1: dividing by 1e-5
            # would only amplify whatever rounding noise reaches it in a quantized graph
            s = torch.where(xmax > 0, s, torch.ones_like(s))
            err = error(_fq_act(xs / s, a_bits), s)
            if best is None or err < best[0]:
                best = (err, alpha, s)
        return (best[1], best[2]) if best[0] < unsmoothed else (None, None)

    def _fold(self, graph: Graph, x: fx.Node, ops: list[fx.Node], s: torch.Tensor) -> str:
        """Fold X / s into X's producer; returns which kind of fold was made."""
        only_group = set(x.users) == set(ops)
        if only_group and is_op(x, aten.layer_norm) and len(x.args[1]) == 1 and is_private_const(x.args[2]) \
                and (x.args[3] is None or is_private_const(x.args[3])):
            for i in (2, 3):
                if x.args[i] is not None:
                    self._set(graph, x, i, graph.attr(x.args[i]).double() / s)
            return "layernorm"
        bias = x.args[2] if is_op(x, aten.linear) and len(x.args) > 2 else None
        if only_group and is_op(x, aten.linear) and is_private_const(x.args[1]) and (bias is None or is_private_const(bias)):
            self._set(graph, x, 1, graph.attr(x.args[1]).double() / s[:, None])
            if bias is not None:
                self._set(graph, x, 2, graph.attr(bias).double() / s)
            return "linear"
        first = min(ops, key=list(graph.nodes).index)
        inv = graph.add_constant((1.0 / s).to(x.meta["val"].dtype if "val" in x.meta else torch.float32),
                                 f"{x.name}_smooth_inv", before=first)
        with graph.graph.inserting_before(first):
            mul = graph.graph.call_function(aten.mul.Tensor, (x, inv))
        if "val" in x.meta:
            mul.meta["val"] = x.meta["val"]
        for o in ops:
            o.replace_input_with(x, mul)
        return "explicit_mul"

    @staticmethod
    def _set(graph: Graph, op: fx.Node, i: int, value: torch.Tensor) -> None:
        old = op.args[i]
        new = graph.add_constant(value.to(graph.attr(old).dtype), f"{op.name}_{old.name}_smooth", before=op)
        args = list(op.args)
        args[i] = new
        op.args = tuple(args)
