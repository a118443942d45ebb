"""RepQ-ViT (Li et al. 2023): calibrate with complex quantizers, run with simple ones.

Two passes around calibration:  annotate -> reparam_prepare -> calibrate -> reparam -> fake_quant.
Without `reparam` the fake-quant graph keeps the calibration quantizers (per-channel, log-sqrt2);
`reparam` turns them into per-tensor and shift-only ones that give the same codes.

(a) LayerNorm -> linear.  An activation X = layer_norm(x, [C], gamma, beta) whose every user
is a quantized aten.linear is calibrated per channel c (last dim, asymmetric):
    q_c = clamp(round(X_c / s_c) + z_c, qmin, qmax),   Q(X)_c = (q_c - z_c) s_c.
One per-tensor quantizer (s~, z~) with  s~ = mean_c s_c  (RepQ's choice) and an integer z~
(round(mean_c z_c) for an asymmetric spec; the spec's fixed zero point, 0 for signed, when it
is symmetric), r1 = s_c / s~, r2 = z_c - z~ (an integer), and
    X'_c = X_c / r1_c + r2_c s~        i.e.  gamma' = gamma / r1,  beta' = (beta + s_c r2) / r1
give X'_c / s~ = X_c / s_c + r2_c, so the per-tensor codes are clamp(round(X_c/s_c) + z_c, ..)
= q_c: the same integers, and  Q~(X')_c = (q_c - z~) s~ = (Q(X)_c + s_c r2_c) / r1_c,  i.e.
Q(X) = r1 * Q~(X') - s_c r2.  Every consumer linear(Q(X), W, b) is therefore
    linear(Q~(X'), W diag(r1), b - W (s_c r2))          W'[:, c] = W[:, c] r1_c.
The activation part is exact in real arithmetic; in float32 the folded affine rounds, so a
code may move by one where X_c / s_c lies within float32 rounding of a .5 tie. Weight
quantization (run afterwards, on W') sees W diag(r1) instead of W: with quantized weights
the two graphs differ by design, by the change in W's per-output-channel quantization error.
Declined: the LayerNorm has no affine weight, is not over the last dim only, its parameters
or a consumer's weight/bias are shared or not constants, its output feeds anything but
quantized linears, or the consumers quantize it with different specs.

(b) Softmax -> matmul.  Attention probabilities P = softmax(..) feeding matmul(P, V) are
calibrated with the log-sqrt2 quantizer (scale s = max P, b bits, qcompiler.ops):
    q = clamp(round(-2 log2(P / s)), 0, 2^b - 1),   P^ = s 2^(-q/2)   (0 at the zero code 2^b - 1).
No single log2 quantizer reproduces it (its odd levels s 2^(-m - 1/2) are not s' 2^-n for one
s'), so the inference form splits P^ by the parity of q into two shift-only terms:
    P^ = E + sqrt2 O,   E = s 2^(-q/2) [q even],   O = s 2^(-ceil(q/2)) [q odd]   (qc::log_sqrt2_split)
and  matmul(P^, V) = matmul(E, V) + sqrt2 * matmul(O, V):  two matmuls whose left operands are
s times a power of two (a shift of V), and one constant factor on the odd-parity result.
P^ == E + round32(sqrt2) O holds bit for bit; the matmul outputs agree up to float32
summation order. V keeps its quantizer (shared by both matmuls).
Bookkeeping: the matmul keeps its name and annotation (now on E; input 0 is no longer a
fake-quant input) and records meta["qc"]["log_sqrt2_split"] = {bits, scale, spec, "split": the
qc::log_sqrt2_split node (the softmax quantizer now), "odd": the new matmul(O, V), "sum": the node
that now carries the original matmul's value}; the odd matmul is annotated as a layer of its own
(V's quantizer) with {"even": the original matmul's name}: it has no counterpart in the float
graph, and quality_report (passes/calibrate.py) attributes it to the original.
Declined: the matmul's output is itself quantized (integer mode), so the sum could not carry it.

Which parts run: `config.extra["reparam_parts"]`, a subset of ("layernorm", "softmax") (default
both). "layernorm" alone leaves only qc::fake_quant in the graph (what the ONNX backend exports);
"softmax" adds qc::fake_quant_log2 / qc::log_sqrt2_split, which a backend must translate.
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx as fx

from qcompiler.errors import QCError
from qcompiler.ir import QMETA, Graph, eliminate_dead_code, is_op, is_private_const, op_name
from qcompiler.ops import SQRT2_F32, log_sqrt2_split
from qcompiler.pipeline import NUMERICS, Pass, PassContext, PassResult, register
from qcompiler.qspec import QParams, QuantSpec

from .quantize import layers

aten = torch.ops.aten
_SOFTMAX = (aten.softmax, aten._softmax)
_MATMUL = (aten.matmul, aten.bmm)
LN, SOFTMAX = "layernorm", "softmax"
PARTS = (LN, SOFTMAX)


def _act_entry(node: fx.Node, i: int) -> dict | None:
    """The activation annotation of input i of a quantized op, or None."""
    q = node.meta.get(QMETA, {}).get("inputs", {}).get(i)
    return q if q is not None and q["role"] == "act" else None


def _ln_group(ln: fx.Node) -> tuple[list[fx.Node], str | None]:
    """(consumer linears, None) when the LayerNorm's output can be reparameterized, else ([], reason)."""
    users = list(ln.users)
    for u in users:
        if not is_op(u, aten.linear) or u.args[0] is not ln or ln in u.args[1:]:
            return [], f"output also feeds {u.name} ({op_name(u)}), not a linear's input"
        if _act_entry(u, 0) is None:
            return [], f"consumer {u.name} does not quantize it (kept in float)"
    if len(ln.args[1]) != 1:
        return [], f"normalized over {list(ln.args[1])}, not the last dim only"
    gamma = ln.args[2] if len(ln.args) > 2 else None
    beta = ln.args[3] if len(ln.args) > 3 else None
    if gamma is None:
        return [], "LayerNorm has no affine weight to fold the scales into"
    if not is_private_const(gamma) or not (beta is None or is_private_const(beta)):
        return [], "LayerNorm affine parameters are not constants of this LayerNorm alone"
    for u in users:
        b = u.args[2] if len(u.args) > 2 else None
        if not is_private_const(u.args[1]) or not (b is None or is_private_const(b)):
            return [], f"weight or bias of {u.name} is shared with other ops or not a constant"
    specs = {_original(_act_entry(u, 0)) for u in users}
    if len(specs) > 1:
        return [], "its consumers quantize it with different specs"
    spec = specs.pop()
    if spec.log_base or spec.granularity != "tensor":
        return [], f"its quantizer is {spec.describe()}, not uniform per-tensor"
    return users, None


def _original(q: dict) -> QuantSpec:
    return q["reparam"]["spec"] if "reparam" in q else q["spec"]


def _softmax_consumers(graph: Graph) -> list[fx.Node]:
    """Quantized matmuls whose left operand is a softmax output."""
    return [n for n in layers(graph) if is_op(n, *_MATMUL) and isinstance(n.args[0], fx.Node)
            and is_op(n.args[0], *_SOFTMAX) and _act_entry(n, 0) is not None]


def _layer_norms(graph: Graph) -> list[fx.Node]:
    """LayerNorms with at least one quantized user."""
    return [n for n in graph.nodes if is_op(n, aten.layer_norm) and any(_act_entry(u, 0) for u in n.users
                                                                         if u.args and u.args[0] is n)]


@register
class PrepareReparameterization(Pass):
    """Switch the annotated activations RepQ-ViT reparameterizes to their calibration
    quantizers: LayerNorm outputs feeding linears to per-channel asymmetric (axis -1),
    softmax outputs feeding matmuls to log-sqrt2. Runs after annotate, before calibrate."""

    name = "reparam_prepare"
    numerics = NUMERICS
    requires = ("annotated",)
    provides = ("reparam_prepared",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if "calibrated" in graph.meta.get("facts", []):
            raise QCError("reparam_prepare must run before calibrate (it changes what is observed)")
        parts = tuple(ctx.config.extra.get("reparam_parts", PARTS)) if ctx.config is not None else PARTS
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise QCError(f"unknown reparam_parts {unknown} (choose from {', '.join(PARTS)})")
        stats: Counter = Counter()
        declined: list[str] = []
        for ln in (_layer_norms(graph) if LN in parts else []):
            users, why = _ln_group(ln)
            if why:
                declined.append(f"{ln.name}: {why}")
                stats["declined_layernorm"] += 1
                continue
            for u in users:
                q = _act_entry(u, 0)
                spec = _original(q)
                q["reparam"] = {"kind": LN, "spec": spec}
                q["spec"], q["qparams"] = spec.with_(granularity="channel", axis=-1, symmetric=False), None
            stats["layernorm_per_channel"] += 1
        for m in (_softmax_consumers(graph) if SOFTMAX in parts else []):
            q = _act_entry(m, 0)
            spec = _original(q)
            if spec.log_base:
                continue
            q["reparam"] = {"kind": SOFTMAX, "spec": spec}
            q["spec"] = QuantSpec(bits=spec.bits, signed=False, symmetric=True, log_base="sqrt2")
            q["qparams"] = None
            stats["softmax_log_sqrt2"] += 1
        changed = any(v for k, v in stats.items() if not k.startswith("declined_"))
        return PassResult(graph, changed, dict(stats), declined)


@register
class ReparameterizeScales(Pass):
    """Fold per-channel LayerNorm-output scales into the LayerNorm affine and the consumer
    linears (one per-tensor quantizer remains), and split log-sqrt2 softmax quantizers into
    two shift-only terms (see the module docstring for the math)."""

    name = "reparam"
    numerics = NUMERICS
    requires = ("annotated", "reparam_prepared", "calibrated")
    provides = ("reparameterized",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        declined: list[str] = []
        groups: dict[fx.Node, list[fx.Node]] = {}
        for n in layers(graph):
            q = _act_entry(n, 0)
            if q is not None and q.get("reparam", {}).get("kind") == LN:
                groups.setdefault(n.args[0], []).append(n)
        for ln, consumers in groups.items():
            users, why = _ln_group(ln)
            if why or set(users) != set(consumers):
                declined.append(f"{ln.name}: {why or 'consumers changed since reparam_prepare'} "
                                "(kept per-channel)")
                stats["declined_layernorm"] += 1
                continue
            self._fold_layernorm(graph, ln, users)
            stats["layernorm_folded"] += 1
            stats["linears_updated"] += len(users)
        for m in _softmax_consumers(graph):
            q = _act_entry(m, 0)
            if q.get("reparam", {}).get("kind") != SOFTMAX:
                continue
            if m.meta[QMETA].get("output") is not None:
                declined.append(f"{m.name}: matmul output is quantized, the split sum could not carry it "
                                "(kept log-sqrt2)")
                stats["declined_softmax"] += 1
                continue
            self._split_softmax(graph, m, q)
            stats["softmax_split"] += 1
        changed = any(v for k, v in stats.items() if not k.startswith("declined_"))
        if changed:
            eliminate_dead_code(graph)  # the replaced LayerNorm and linear parameters
            graph.recompile()
        return PassResult(graph, changed, dict(stats), declined)

    @staticmethod
    def _fold_layernorm(graph: Graph, ln: fx.Node, users: list[fx.Node]) -> None:
        entries = [_act_entry(u, 0) for u in users]
        qp: QParams = entries[0]["qparams"]
        if qp is None:
            raise QCError("LayerNorm output was never calibrated", node=ln.name, op=op_name(ln))
        spec = entries[0]["reparam"]["spec"]
        s_c, z_c = qp.scale.double().reshape(-1), qp.zero_point.double().reshape(-1)
        s_t = s_c.mean().float()  # the per-tensor scale as the quantizer will hold it
        if spec.symmetric:
            z_t = 0 if spec.signed else (spec.qmax + spec.qmin + 1) // 2
        else:
            z_t = int(torch.round(z_c.mean()).clamp(spec.qmin, spec.qmax))
        r1 = s_c / s_t.double()
        shift = s_c * (z_c - z_t)  # s_c r2
        gamma = graph.attr(ln.args[2])
        beta_node = ln.args[3] if len(ln.args) > 3 else None
        beta = graph.attr(beta_node).double() if beta_node is not None else torch.zeros_like(s_c)
        args = list(ln.args) + [None] * (4 - len(ln.args))
        args[2] = _constant(graph, gamma.double() / r1, gamma.dtype, f"{ln.name}_gamma_reparam", ln)
        args[3] = _constant(graph, (beta + shift) / r1, gamma.dtype, f"{ln.name}_beta_reparam", ln)
        ln.args = tuple(args)
        for u, q in zip(users, entries):
            w_node = u.args[1]
            w = graph.attr(w_node)
            b_node = u.args[2] if len(u.args) > 2 else None
            b = graph.attr(b_node).double() if b_node is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            w_new = _constant(graph, w.double() * r1, w.dtype, f"{u.name}_weight_reparam", u)
            b_new = _constant(graph, b - w.double() @ shift, w.dtype, f"{u.name}_bias_reparam", u)
            u.args = (u.args[0], w_new, b_new, *u.args[3:])
            q["spec"] = spec
            q["qparams"] = QParams(s_t.reshape(()), torch.tensor(z_t, dtype=torch.int32), spec)
            q["reparam"] = {**q["reparam"], "r1_max": float(r1.max()), "r1_min": float(r1.min())}
            for wq in u.meta[QMETA]["inputs"].values():
                if wq["role"] == "weight":
                    wq["qparams"] = None  # recomputed from the new weight

    @staticmethod
    def _split_softmax(graph: Graph, m: fx.Node, q: dict) -> None:
        qp: QParams = q["qparams"]
        if qp is None:
            raise QCError("softmax output was never calibrated", node=m.name, op=op_name(m))
        p, v = m.args[0], m.args[1]
        info = m.meta[QMETA]
        s = graph.add_constant(qp.scale.float().reshape(()), f"{p.name}_log_scale", before=m)
        g = graph.graph
        with g.inserting_before(m):
            split = g.call_function(log_sqrt2_split, (p, s, qp.spec.bits))
            even = g.call_function(operator.getitem, (split, 0))
            odd = g.call_function(operator.getitem, (split, 1))
        split.meta["qparams"] = qp
        split.name = f"{p.name}_log_sqrt2"
        if "val" in p.meta:
            split.meta["val"] = (p.meta["val"], p.meta["val"])
            even.meta["val"] = odd.meta["val"] = p.meta["val"]
        with g.inserting_after(m):
            m_odd = g.create_node("call_function", m.target, (odd, *m.args[1:]), dict(m.kwargs), name=f"{m.name}_odd")
        with g.inserting_after(m_odd):
            scaled = g.create_node("call_function", aten.mul.Tensor, (m_odd, SQRT2_F32), name=f"{m.name}_odd_sqrt2")
        with g.inserting_after(scaled):
            total = g.create_node("call_function", aten.add.Tensor, (m, scaled), name=f"{m.name}_sum")
        for n in (m_odd, scaled, total):
            if "val" in m.meta:
                n.meta["val"] = m.meta["val"]
        m.replace_all_uses_with(total, delete_user_cb=lambda u: u is not total)
        m.args = (even, v, *m.args[2:])
        inputs = {i: e for i, e in info["inputs"].items() if i != 0}
        info["inputs"] = inputs
        info["log_sqrt2_split"] = {"bits": qp.spec.bits, "scale": float(qp.scale), "odd": m_odd.name,
                                   "split": split.name, "sum": total.name, "spec": q["reparam"]["spec"]}
        m_odd.meta[QMETA] = {"layer": m_odd.name, "op": info["op"],
                             "inputs": {i: dict(e) for i, e in inputs.items()},
                             "log_sqrt2_split": {"even": m.name}}


def _constant(graph: Graph, value: torch.Tensor, dtype: torch.dtype, hint: str, before: fx.Node) -> fx.Node:
    return graph.add_constant(value.to(dtype), hint, before=before)
