"""CorrectBias: empirical bias correction (Nagel et al. 2019, "DFQ", section 4.2).

Quantizing a weight shifts a layer's expected output: for y = op(x, W) + b (linear, or conv
with its own stride, padding, dilation and groups)
    E[y_q - y] = E[op(x, Q(W) - W)]   (op is linear in W),
which the following layers see as a bias error (for linear, (Q(W) - W) E[x]; for conv, the
same summed over kernel positions, except near padded borders). The shift is measured
exactly, per output channel c, over the layer's float input on the calibration set,
    delta_c = mean over samples (and spatial positions) of op(x, Q(W) - W)_c,
and folded into the bias, b'_c = b_c - delta_c (a layer without bias gets b' = -delta), so
that mean(op(x, Q(W)) + b') = mean(op(x, W) + b) per channel on the calibration data.

W is the float weight: the original weight recorded by gptq in meta["qc"]["gptq"]
["float_weight"] when gptq has rounded the layer (so its residual error is corrected), else
the layer's weight constant; x is the layer's input in the float network (gptq-rounded
weights are run at their original values to record it). Q(W) is what the fake-quant will
compute: qc::fake_quant of the weight constant with its stored QParams (gptq's), else
weight_qparams(constant, spec).
Runs after "annotate" (and after "gptq"), before "fake_quant". Declined, with a reason:
layers without a bias input (matmul family, embedding), a bias that is not a constant,
layers whose input gets no calibration rows. Option: Config.extra["bias_correction"] =
{"max_batches": 64}.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qcompiler.errors import QCError
from qcompiler.ir import QMETA, Graph, eliminate_dead_code
from qcompiler.pipeline import NUMERICS, Pass, PassContext, PassResult, register
from qcompiler.qspec import fake_quantize, weight_qparams

from .calibrate import _Recorder
from .quantize import layers

OPTIONS = {"max_batches": 64}
_LAYERS = ("linear", "conv1d", "conv2d", "conv3d")


def _options(ctx: PassContext) -> dict:
    extra = getattr(ctx.config, "extra", None) or {}
    opts = dict(extra.get("bias_correction", {}) or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise QCError(f"unknown bias_correction options {unknown} (known: {', '.join(OPTIONS)})")
    return {**OPTIONS, **opts}


def _bias(node: fx.Node):
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def quantized_weight_delta(graph: Graph, node: fx.Node, w_idx: int) -> torch.Tensor:
    """Q(W) - W for a layer's weight: Q as the fake-quant will apply it, W the float weight."""
    info = node.meta[QMETA]
    q = info["inputs"][w_idx]
    wc = graph.attr(node.args[w_idx]).detach()
    qp = q["qparams"] if q["qparams"] is not None and q["qparams"].spec == q["spec"] else weight_qparams(wc, q["spec"])
    w_float = info.get("gptq", {}).get("float_weight", wc)
    return fake_quantize(wc, qp) - w_float


def _float_graph(graph: Graph) -> Graph:
    """The graph with every gptq-rounded weight back at its original value (a copy; the graph itself
    when gptq has not run), so each layer's input is the float network's."""
    rounded = [n for n in layers(graph) if "gptq" in n.meta[QMETA]]
    if not rounded:
        return graph
    g = graph.copy()
    for n in layers(g):
        info = n.meta[QMETA]
        if "gptq" in info:
            w_idx = next(i for i, q in info["inputs"].items() if q["role"] == "weight")
            g.attr(n.args[w_idx]).copy_(info["gptq"]["float_weight"])
    return g


@register
class CorrectBias(Pass):
    """Subtract each weight layer's measured output shift E[op(x, Q(W) - W)] from its bias."""

    name = "bias_correction"
    numerics = NUMERICS
    requires = ("annotated",)
    provides = ("bias_corrected",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if "quantized" in graph.meta.get("facts", ()):
            raise QCError("bias_correction runs before fake_quant (the graph already has fake-quant nodes)")
        opts = _options(ctx)
        declined: list[str] = []
        todo: list[tuple[fx.Node, torch.Tensor]] = []
        for node in layers(graph):
            info = node.meta[QMETA]
            w_idx = next((i for i, q in sorted(info["inputs"].items()) if q["role"] == "weight"), None)
            if w_idx is None:
                continue  # activation x activation product: no weight error
            kind = info["op"].split(".")[-1]
            b = _bias(node) if kind in _LAYERS else None
            if kind not in _LAYERS:
                why = f"{kind} has no bias input to correct"
            elif not isinstance(node.args[0], fx.Node):
                why = "input is not a graph value"
            elif b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
                why = "bias is not a constant"
            else:
                todo.append((node, quantized_weight_delta(graph, node, w_idx)))
                continue
            declined.append(f"{node.name}: {why}")
        stats = {"layers": 0, "biases_added": 0, "declined": len(declined)}
        if not todo:
            return PassResult(graph, False, stats, declined)
        if ctx.calib is None:
            raise QCError("bias_correction needs calibration data (ctx.calib)")
        ctx.calib.validate(graph.inputs)

        sums: dict[str, list] = {n.name: [None, 0] for n, _ in todo}
        watch: dict[str, list[tuple[fx.Node, torch.Tensor]]] = {}
        for node, dw in todo:
            watch.setdefault(node.args[0].name, []).append((node, dw))

        def record(n, x):
            for node, dw in watch[n.name]:
                shift = node.target(x, dw.to(x.dtype), None, *node.args[3:], **{k: v for k, v in node.kwargs.items()
                                                                                if k != "bias"})
                linear = node.meta[QMETA]["op"].endswith("linear")
                ch = shift.dim() - 1 if linear else (1 if x.dim() == dw.dim() else 0)  # conv: batched or not
                s = shift.double().movedim(ch, 0).reshape(shift.shape[ch], -1)
                acc = sums[node.name]
                acc[0] = s.sum(1) if acc[0] is None else acc[0] + s.sum(1)
                acc[1] += s.shape[1]

        rec = _Recorder(_float_graph(graph).gm, set(watch), record)
        mb = opts["max_batches"]
        with torch.no_grad():
            for batch in ctx.calib.batches(graph.inputs, None if mb is None else int(mb)):
                rec.run(*batch)

        for node, dw in todo:
            total, count = sums[node.name]
            if count == 0:
                declined.append(f"{node.name}: no calibration rows reached this layer")
                continue
            delta = total / count
            b = _bias(node)
            old = graph.attr(b).detach().double() if b is not None else torch.zeros_like(delta)
            new_b = (old - delta).to(graph.attr(node.args[1]).dtype)
            new = graph.add_constant(new_b, f"{node.name}_bias_corrected", before=node)
            if "bias" in node.kwargs:
                node.update_kwarg("bias", new)
            elif len(node.args) > 2:
                node.update_arg(2, new)
            else:
                node.args = (*node.args, new)
            node.meta[QMETA]["bias_correction"] = {"max_abs_shift": float(delta.abs().max())}
            stats["layers"] += 1
            stats["biases_added"] += int(b is None)
        stats["declined"] = len(declined)
        if stats["layers"]:
            eliminate_dead_code(graph)
            graph.recompile()
        return PassResult(graph, stats["layers"] > 0, stats, declined)
