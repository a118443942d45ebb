"""Calibration (observers over real data) and the per-layer quality report (SQNR)."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.fx as fx
from tqdm import tqdm

from qcompiler.calib import CalibData
from qcompiler.errors import QCError
from qcompiler.ir import QMETA, Graph
from qcompiler.ops import SQRT2_F32
from qcompiler.pipeline import NUMERICS, Pass, PassContext, PassResult, register
from qcompiler.qspec import Observer, QuantSpec

from .quantize import act_quantizers, layers


class _Recorder(fx.Interpreter):
    """Runs a graph and hands the value of each watched node to a callback."""

    def __init__(self, gm, watch: set[str], on_value):
        super().__init__(gm)
        self.watch, self.on_value = watch, on_value

    def run_node(self, n):
        v = super().run_node(n)
        if n.name in self.watch:
            self.on_value(n, v)
        return v


def _progress(it: Iterable, total: int, desc: str):
    return tqdm(it, total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                disable=None)  # None: hide when not a terminal


@register
class Calibrate(Pass):
    """Run the calibration set through the float graph; every annotated activation gets
    QParams from its observer (min-max, percentile, MSE or KL, as its QuantSpec says)."""

    name = "calibrate"
    numerics = NUMERICS
    requires = ("annotated",)
    provides = ("calibrated",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        calib: CalibData | None = ctx.calib
        if calib is None:
            raise QCError("calibration data is required (no silent random calibration)")
        calib.validate(graph.inputs)
        observers: dict[tuple[str, QuantSpec], Observer] = {}
        by_node: dict[str, list[Observer]] = {}
        for node in layers(graph):
            for src, q in act_quantizers(node):
                key = (src.name, q["spec"])
                if key not in observers:
                    observers[key] = Observer(q["spec"])
                    by_node.setdefault(src.name, []).append(observers[key])

        def observe(n, v):
            for o in by_node[n.name]:
                try:
                    o.observe(v)
                except QCError as e:
                    raise QCError(str(e), node=n.name, op=str(n.target)) from None

        rec = _Recorder(graph.gm, set(by_node), observe)
        with torch.no_grad():
            for batch in _progress(calib.batches(graph.inputs), calib.num_batches(), "calibrating"):
                rec.run(*batch)
        for node in layers(graph):
            for src, q in act_quantizers(node):
                q["qparams"] = observers[(src.name, q["spec"])].qparams()
                q["spec"] = q["qparams"].spec  # unsigned_if_nonneg: the grid the observer chose
        return PassResult(graph, bool(observers), {"activation_observers": len(observers),
                                                   "batches": calib.num_batches()})


def _sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _split_sqrt2(v) -> torch.Tensor:
    """The log-sqrt2 quantized value E + round32(sqrt2) O from qc::log_sqrt2_split's (E, O)."""
    even, odd = v
    return even + SQRT2_F32 * odd


def quality_report(float_graph: Graph, quant_graph: Graph, calib: CalibData, max_batches: int = 8) -> list[dict]:
    """Per quantized layer: SQNR (dB) of its quantized weight, of its quantized input
    activation(s), and of its output against the float model, on calibration data.

    Layers pair with float nodes by name. A rewrite after the float graph was taken
    (passes/reparam.py) may leave a layer's value on another node, or add layers it lacks:
    - a softmax -> matmul split into log-sqrt2 even/odd halves (meta["qc"]["log_sqrt2_split"]):
      the row of the original matmul measures its output on the "sum" node (matmul(E, V) +
      sqrt2 matmul(O, V)) and its input 0 on the qc::log_sqrt2_split quantizer (E + sqrt2 O
      against the softmax); the odd half ({"even": name}) has no row of its own, its only
      quantizer (V's) is the original's, so it is attributed to that row;
    - any other layer without a float counterpart has no output to compare against and is left
      out (every row carries an output SQNR) rather than failing the report.
    """
    float_names = {n.name for n in float_graph.nodes}
    nodes = {n.name: n for n in quant_graph.nodes}
    qlayers, out_at = [], {}  # reported layers; quant node carrying a layer's value -> float node name
    for n in layers(quant_graph):
        info = n.meta[QMETA]
        split = info.get("log_sqrt2_split", {})
        if "even" in split or n.name not in float_names:
            continue  # the odd half of a split matmul (reported with its even half), or no float twin
        qlayers.append(n)
        out_at[split.get("sum", n.name)] = n.name
    # activation quantizer node -> the node it quantizes (weights are constants: measured once below)
    act_fq = {n.args[i].name: n.args[i].args[0].name for n in qlayers
              for i, q in n.meta[QMETA]["inputs"].items() if q["role"] == "act"}
    splits = {}  # qc::log_sqrt2_split node -> the softmax it quantizes
    for n in qlayers:
        name = n.meta[QMETA].get("log_sqrt2_split", {}).get("split")
        if name in nodes:
            splits[name] = nodes[name].args[0].name
    sums: dict[tuple[str, str], list[float]] = {}

    def add(key, ref, got):
        ref, got = ref.double(), got.double()
        a = sums.setdefault(key, [0.0, 0.0])
        a[0] += float((ref ** 2).sum())
        a[1] += float(((got - ref) ** 2).sum())

    # held per batch: the float layers' outputs until their quantized twins run (each compared once,
    # then dropped) and the quantized tensors an activation quantizer reads; a batch of a large
    # model (DeiT-S at 64 images) made holding every watched value take ~10 GB
    float_vals: dict[str, torch.Tensor] = {}
    quant_vals: dict[str, torch.Tensor] = {}
    quantized_inputs = set(act_fq.values()) | set(splits.values())

    def on_quant(n, v):
        if n.name in quantized_inputs:
            quant_vals[n.name] = v
        if n.name in out_at:
            add(("out", out_at[n.name]), float_vals.pop(out_at[n.name]), v)
        if n.name in act_fq:
            add(("fq", n.name), quant_vals[act_fq[n.name]], v)
        if n.name in splits:
            add(("fq", n.name), quant_vals[splits[n.name]], _split_sqrt2(v))

    f_rec = _Recorder(float_graph.gm, set(out_at.values()), lambda n, v: float_vals.__setitem__(n.name, v))
    q_rec = _Recorder(quant_graph.gm, set(out_at) | set(act_fq) | set(act_fq.values()) | set(splits)
                      | set(splits.values()), on_quant)
    with torch.no_grad():
        for batch in calib.batches(float_graph.inputs, max_batches):
            float_vals.clear(), quant_vals.clear()
            f_rec.run(*batch)
            q_rec.run(*batch)
    rows = []
    for n in qlayers:
        info = n.meta[QMETA]
        row = {"layer": n.name, "op": info["op"]}
        quantizers = [(i, n.args[i].name, q["role"]) for i, q in info["inputs"].items()]
        if info.get("log_sqrt2_split", {}).get("split") in splits:  # input 0's quantizer is the split
            quantizers.append((0, info["log_sqrt2_split"]["split"], "act"))
        for i, fq_name, role in sorted(quantizers):
            fq = nodes[fq_name]
            key = "weight" if role == "weight" else f"input{i}"
            s, e = sums.get(("fq", fq.name), (0.0, 0.0))
            if role == "weight":
                w = quant_graph.attr(fq.args[0]).double()
                wq = fq.target(*[quant_graph.attr(a) if isinstance(a, fx.Node) else a for a in fq.args]).double()
                s, e = float((w ** 2).sum()), float(((wq - w) ** 2).sum())
            row[f"{key}_sqnr_db"] = round(_sqnr_db(s, e), 2)
        s, e = sums.get(("out", n.name), (0.0, 0.0))
        row["output_sqnr_db"] = round(_sqnr_db(s, e), 2)
        rows.append(row)
    return rows
