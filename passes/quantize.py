"""Quantization: decide what is quantized (AnnotateQuantization), then turn calibrated
annotations into qc::fake_quant nodes (InsertFakeQuant).

State lives in `node.meta[QMETA]` of each quantized op ("layer"):
    {"layer": name, "op": "aten.linear",
     "inputs": {arg_index: {"role": "act" | "weight", "spec": QuantSpec, "qparams": QParams | None}}}
"""
from __future__ import annotations

import fnmatch

import torch
import torch.fx as fx

from qcompiler.config import Config
from qcompiler.errors import QCError
from qcompiler.ir import QMETA, Graph, op_name
from qcompiler.ops import fake_quant, fake_quant_log2
from qcompiler.pipeline import NUMERICS, Pass, PassContext, PassResult, register
from qcompiler.qspec import QParams, QuantSpec, weight_qparams

aten = torch.ops.aten

# op name -> (activation arg indices, weight arg index or None, weight channel axis, weight group axis)
QUANTIZABLE = {
    "linear": ((0,), 1, 0, 1),
    "conv1d": ((0,), 1, 0, 1),
    "conv2d": ((0,), 1, 0, 1),
    "conv3d": ((0,), 1, 0, 1),
    "matmul": ((0, 1), None, -1, -2),
    "mm": ((0, 1), None, -1, -2),
    "bmm": ((0, 1), None, -1, -2),
    "addmm": ((1, 2), None, -1, -2),
    "embedding": ((), 0, 0, 1),  # weight-only: one scale per table row (token)
}


def layers(graph: Graph) -> list[fx.Node]:
    """The annotated (quantized) op nodes, in graph order."""
    return [n for n in graph.nodes if QMETA in n.meta]


def act_quantizers(node: fx.Node) -> list[tuple[fx.Node, dict]]:
    """(quantized value, annotation) for each activation quantizer of a layer: its annotated
    activation inputs, and its own output when meta["qc"]["output"] is set (integer mode)."""
    info = node.meta[QMETA]
    out = [(node.args[i], q) for i, q in sorted(info["inputs"].items()) if q["role"] == "act"]
    if info.get("output") is not None:
        out.append((node, info["output"]))
    return out


def _is_float_value(a) -> bool:
    v = a.meta.get("val") if isinstance(a, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


@register
class AnnotateQuantization(Pass):
    """Mark the inputs of conv/linear/matmul ops, and embedding tables (weight-only), for
    quantization (by op type and name glob).

    A constant input is a weight (per-channel on its output-channel axis by default);
    other float inputs are activations (per-tensor, static).
    """

    name = "annotate"
    numerics = NUMERICS
    provides = ("annotated",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cfg: Config = ctx.config or Config()
        w_base, a_spec = cfg.weight_spec(), cfg.act_spec()
        stats = {"layers": 0, "excluded_by_name": 0}
        declined = []
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            kind = op_name(node).split(".")[-1]
            if kind not in QUANTIZABLE or kind not in cfg.op_types:
                continue
            if (cfg.include and not any(fnmatch.fnmatchcase(node.name, p) for p in cfg.include)) or \
                    any(fnmatch.fnmatchcase(node.name, p) for p in cfg.exclude):
                stats["excluded_by_name"] += 1
                declined.append(f"{node.name}: kept in float by name pattern")
                continue
            act_idx, w_idx, ch_axis, grp_axis = QUANTIZABLE[kind]
            inputs = {}
            for i in sorted(set(act_idx) | ({w_idx} if w_idx is not None else set())):
                a = node.args[i] if i < len(node.args) else None
                if not isinstance(a, fx.Node) or not _is_float_value(a):
                    continue
                if a.op == "get_attr":
                    rank = a.meta["val"].dim()
                    axis = (grp_axis if w_base.granularity == "group" else ch_axis) % rank
                    inputs[i] = {"role": "weight", "spec": w_base.with_(axis=axis), "qparams": None}
                else:
                    inputs[i] = {"role": "act", "spec": a_spec, "qparams": None}
            if not inputs:
                declined.append(f"{node.name}: no float inputs to quantize")
                continue
            node.meta[QMETA] = {"layer": node.name, "op": op_name(node), "inputs": inputs}
            stats["layers"] += 1
        return PassResult(graph, stats["layers"] > 0, stats, declined)


@register
class InsertFakeQuant(Pass):
    """Insert qc::fake_quant on every annotated input, with calibrated activation QParams
    and weight QParams from the exact weight tensor (unless a pass, e.g. gptq, already set
    them for the weight's spec: then they are used as they are). One quantizer per
    (tensor, spec): consumers of the same activation share it."""

    name = "fake_quant"
    numerics = NUMERICS
    requires = ("annotated", "calibrated")
    provides = ("quantized",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        made: dict[tuple[str, QuantSpec], fx.Node] = {}
        stats = {"weight_quantizers": 0, "act_quantizers": 0}
        last_ph = ([n for n in graph.nodes if n.op == "placeholder"] or [None])[-1]
        for node in layers(graph):
            info = node.meta[QMETA]
            args = list(node.args)
            for i, q in sorted(info["inputs"].items()):
                src = args[i]
                key = (src.name, q["spec"])
                if key not in made:
                    if q["role"] == "weight" and (q["qparams"] is None or q["qparams"].spec != q["spec"]):
                        q["qparams"] = weight_qparams(graph.attr(src), q["spec"])
                    elif q["qparams"] is None:
                        raise QCError("activation was never calibrated", node=node.name, op=info["op"])
                    anchor = src if src.op != "placeholder" else last_ph
                    made[key] = _insert_fake_quant(graph, src, q["qparams"], after=anchor)
                    stats["weight_quantizers" if q["role"] == "weight" else "act_quantizers"] += 1
                else:
                    q["qparams"] = made[key].meta["qparams"]
                args[i] = made[key]
            node.args = tuple(args)
            out = info.get("output")
            if out is not None:  # an output quantization point: every later use reads the quantized value
                if out["qparams"] is None:
                    raise QCError("output was never calibrated", node=node.name, op=info["op"])
                key = (node.name, out["spec"])
                users = list(node.users)
                made[key] = fq = _insert_fake_quant(graph, node, out["qparams"], after=node)
                for u in users:
                    u.replace_input_with(node, fq)
                stats["act_quantizers"] += 1
        graph.recompile()
        return PassResult(graph, bool(made), stats)


def _insert_fake_quant(graph: Graph, src: fx.Node, qp: QParams, after: fx.Node) -> fx.Node:
    spec = qp.spec
    with graph.graph.inserting_after(after):
        if spec.log_base:  # log2 / log-sqrt2 quantizer: a scale, no zero point
            fq = graph.graph.call_function(fake_quant_log2, (src, None, spec.bits, spec.log_root))
        else:
            fq = graph.graph.call_function(fake_quant, (src, None, None, spec.qmin, spec.qmax, *spec.axis_and_group))
    s = graph.add_constant(qp.scale, f"{src.name}_scale", before=fq)
    if spec.log_base:
        fq.args = (src, s, *fq.args[2:])
    else:
        z = graph.add_constant(qp.zero_point, f"{src.name}_zero_point", before=fq)
        fq.args = (src, s, z, *fq.args[3:])
    fq.meta["val"] = src.meta.get("val")
    fq.meta["qparams"] = qp
    fq.name = f"{src.name}_fq"
    return fq
