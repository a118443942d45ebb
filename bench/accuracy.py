"""Accuracy of static quantization at W8A8, W6A6, W4A8 and W4A4: qcompiler's min-max baseline,
each pass alone, the default recipe, and peers (ONNX Runtime quantize_static / quantize_dynamic,
NNCF, PyTorch PT2E) side by side on the same models, calibration data and evaluation data.

    .venv/bin/python bench/accuracy.py [--models minilm,fashion_cnn,fashion_vit] [--settings W8A8,W4A4]
                                       [--calib N] [--only all|integer]

MiniLM: embedding cosine vs FP32 (mean / min over 256 held-aside real sentences) and top-1
retrieval (nearest other sentence) agreement with FP32. Fashion-MNIST CNN / ViT: top-1 on the
10 k test set. Weights per-channel, activations static per-tensor, unless a row says otherwise.
Every ONNX model (qcompiler's fake-quant artifacts of the onnx and reference targets, which both
write model.onnx, and ORT's and NNCF's outputs) is run by ONNX Runtime on CPU; integer-only
artifacts run in torch (the reference backend, loaded from the saved artifact), and so do PT2E
models and rows whose ONNX artifact ORT rejects (the row says so). Each row counts the ops it quantizes
and lists the compute ops it leaves in float. A peer that cannot do a setting gets an "n/a" row
with the reason. ONNX Runtime quantize_static is reported at its best of 12 configurations
(MinMax / Percentile / Entropy x unsigned / signed activations x every op it can quantize, its
default, or MatMul / Gemm / Conv only), the winner named in the row's note. Results merge into
bench/results/accuracy.json (accuracy_integer.json with
--only integer): each row run replaces its earlier copy (same model, setting and variant) and
the other rows stay, so parts can be re-run.
"""
from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SETTINGS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8), "W4A4": (4, 4)}
EVAL_SENTENCES = 256

BASE = ("remove_identities", "fold_bn", "fold_constants", "fold_additive_mask")
FLOAT_HADAMARD = ("hadamard_*",)
# qcompiler rows: name -> (Config overrides, models it applies to or None for all); all but the
# last name their passes (recipe "none"), the last is what `qcompiler compile` does by default
QC_ROWS = {
    "qcompiler min-max baseline (no passes)": ({"pre_passes": BASE, "recipe": "none"}, None),
    "+ cle": ({"pre_passes": (*BASE, "cle"), "recipe": "none"}, None),
    "+ smooth": ({"pre_passes": (*BASE, "smooth"), "recipe": "none"}, None),
    "+ rotate (hadamard_* in float)": ({"pre_passes": (*BASE, "rotate"), "recipe": "none", "exclude": FLOAT_HADAMARD}, None),
    "+ reparam layernorm": ({"pre_passes": BASE, "recipe": "none", "reparam": ("layernorm",)}, ("minilm", "fashion_vit")),
    "+ reparam layernorm,softmax (reference target)": (
        {"pre_passes": BASE, "reparam": ("layernorm", "softmax"), "recipe": "none", "target": "reference"}, ("minilm", "fashion_vit")),
    "+ log-sqrt2 quantizer for post-Softmax / post-GELU inputs": (
        {"pre_passes": BASE, "recipe": "none", "log_act": ("softmax", "gelu")}, ("minilm", "fashion_vit")),
    "+ bias correction": ({"pre_passes": BASE, "recipe": "none", "bias_correction": True}, None),
    "+ gptq": ({"pre_passes": BASE, "recipe": "none", "gptq": True}, None),
    "+ unsigned grid for non-negative activations": ({"pre_passes": BASE, "recipe": "none", "a_unsigned_nonneg": True}, None),
    # the transformer recipe with each order of its two rewrites (it picks smooth first at W8A8, rotate first below)
    "transformer recipe, smooth then rotate": (
        {"pre_passes": (*BASE, "smooth", "rotate"), "exclude": FLOAT_HADAMARD, "recipe": "transformer"}, ("minilm",)),
    "transformer recipe, rotate then smooth": (
        {"pre_passes": (*BASE, "rotate", "smooth"), "exclude": FLOAT_HADAMARD, "recipe": "transformer"}, ("minilm",)),
    "qcompiler default recipe": ({}, None),
}
# integer-only graphs (qc:: integer ops), run by the reference backend from the saved artifact
INTEGER_ROWS = {
    "qcompiler integer-only (dyadic requant, int softmax/GELU/LN)": ({"integer": True, "target": "reference"}, None),
}
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
# which ops quantize_static quantizes: its default (every op it has a QDQ rule for: LayerNorm,
# Softmax, GELU and the adds included) or the compute layers only, as users do for transformers
ORT_OP_SCOPES = {"all": None, "MatMul/Gemm/Conv": ["MatMul", "Gemm", "Conv"]}
ORT_STATIC = "ORT quantize_static QDQ per-channel"  # every ORT static row's name starts so
# QDQ integer types quantize_static takes (no 6-bit type): weights signed; activations signed or
# unsigned (ORT's CPU kernels prefer U8S8), the better of the two is reported
ORT_TYPES = {8: "QInt8", 4: "QInt4"}
ORT_ACT_TYPES = {8: ("QUInt8", "QInt8"), 4: ("QUInt4", "QInt4")}
# ops that only move or reshape data: not counted as quantized or float compute
_LAYOUT = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Shape", "Concat", "Slice", "Constant", "Cast", "Flatten",
           "Expand", "Identity", "Split", "ConstantOfShape", "Range", "Equal", "Not", "Less", "Greater", "Where",
           "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Clip", "Max", "Min", "Unique"}
_FX_LAYOUT = {"view", "reshape", "_unsafe_view", "transpose", "permute", "unsqueeze", "squeeze", "expand", "clone",
              "contiguous", "slice", "select", "cat", "flatten", "unflatten", "unbind", "getitem", "t", "alias",
              "to", "_to_copy", "detach", "split", "chunk", "sym_size", "lift_fresh_copy", "arange", "eq", "ne",
              "lt", "gt", "where", "masked_fill", "full", "ones", "zeros", "clamp", "sym_numel", "size", "copy",
              "empty", "new_ones", "new_zeros", "scalar_tensor", "type_as", "expand_as", "_assert_tensor_metadata",
              "index", "any", "all", "logical_not", "bitwise_not", "ones_like", "zeros_like", "max", "min"}


def run_batched(fn, inputs: dict[str, np.ndarray], batch: int) -> np.ndarray:
    n = len(next(iter(inputs.values())))
    outs = [fn({k: v[i:i + batch] for k, v in inputs.items()}) for i in range(0, n, batch)]
    return np.concatenate(outs)


def score(metric: str, ref: np.ndarray, got: np.ndarray, labels) -> dict:
    if metric == "top1":
        return {"top1": float((got.argmax(1) == labels).mean()), "agree_fp32": float((got.argmax(1) == ref.argmax(1)).mean())}
    a = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    b = got / np.linalg.norm(got, axis=1, keepdims=True)
    cos = (a * b).sum(1)

    def nn(e):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "nn_agree": float((nn(a) == nn(b)).mean())}


# -- which ops a model quantizes and which it leaves in float ---------------------------------

def onnx_ops(model_bytes: bytes) -> dict:
    """Compute nodes of a QDQ ONNX model: quantized (an activation input comes from a
    DequantizeLinear), weight-only (only a constant input does), float (none does)."""
    import onnx
    m = onnx.load_from_string(model_bytes)
    inits = {i.name for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    dq_of_const = {o for n in m.graph.node if n.op_type == "DequantizeLinear" and
                   (n.input[0] in inits or getattr(producer.get(n.input[0]), "op_type", "") == "Constant")
                   for o in n.output}
    dq = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}

    def through_layout(name: str) -> str:
        """The tensor a chain of layout ops (a Transpose of a dequantized weight, ...) starts from."""
        seen = 0
        while name in producer and producer[name].op_type in _LAYOUT and producer[name].op_type not in (
                "DequantizeLinear", "QuantizeLinear") and producer[name].input and seen < 16:
            name, seen = producer[name].input[0], seen + 1
        return name
    out = {"quantized": Counter(), "weight_only": Counter(), "float": Counter()}
    for n in m.graph.node:
        if n.op_type in _LAYOUT:
            continue
        ins = [through_layout(i) for i in n.input if i]
        if n.op_type == "Gather" and not (ins[0] in dq or ins[0] in inits):
            continue  # indexing a shape, not an embedding table
        act_q = any(i in dq and i not in dq_of_const for i in ins)
        w_q = any(i in dq_of_const for i in ins)
        key = "quantized" if act_q or n.op_type.endswith("Integer") else "weight_only" if w_q else "float"
        out[key][n.op_type] += 1
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def fx_ops(gm: torch.fx.GraphModule) -> dict:
    """The same classification over an fx graph: a node reading a qc::fake_quant /
    quantized_decomposed dequantize output counts as quantized."""
    def is_dq(n):
        return isinstance(n, torch.fx.Node) and n.op == "call_function" and \
            any(k in str(n.target) for k in ("fake_quant", "dequantize"))

    def const(n):
        while is_dq(n) or (isinstance(n, torch.fx.Node) and n.op == "call_function" and "quantize" in str(n.target)):
            n = n.args[0]
        return isinstance(n, torch.fx.Node) and n.op == "get_attr"
    out = {"quantized": Counter(), "weight_only": Counter(), "float": Counter()}
    for n in gm.graph.nodes:
        if n.op != "call_function" or is_dq(n) or "quantize" in str(n.target):
            continue
        name = str(getattr(n.target, "__name__", n.target)).split(".")[0]
        if name in _FX_LAYOUT:
            continue
        ins = [a for a in n.args if isinstance(a, torch.fx.Node)]
        act_q = any(is_dq(a) and not const(a) for a in ins)
        w_q = any(is_dq(a) and const(a) for a in ins)
        out["quantized" if act_q else "weight_only" if w_q else "float"][name] += 1
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def _ops_summary(ops: dict) -> dict:
    return {"ops": ops, "quantized_ops": sum(ops["quantized"].values()) + sum(ops["weight_only"].values())}


# -- peers -----------------------------------------------------------------------------------

class _Reader:
    def __init__(self, calib: dict[str, np.ndarray], batch: int = 8):
        n = len(next(iter(calib.values())))
        self.items = [{k: v[i:i + batch] for k, v in calib.items()} for i in range(0, n, batch)]
        self.it = iter(self.items)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.items)


def ort_static(fp32_onnx: bytes, calib, w_bits: int, a_bits: int, method: str, workdir: str,
               act_type: str | None = None, op_types: list[str] | None = None) -> bytes:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre, dst = (os.path.join(workdir, f) for f in ("fp32.onnx", "pre.onnx", "q.onnx"))
    Path(src).write_bytes(fp32_onnx)
    try:
        quant_pre_process(src, pre, skip_symbolic_shape=True)
    except Exception:  # pre-processing is advisory; quantize the model as exported when it fails
        pre = src

    class Reader(_Reader, CalibrationDataReader):
        pass

    quantize_static(pre, dst, Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=getattr(QuantType, act_type or ORT_TYPES[a_bits]),
                    weight_type=getattr(QuantType, ORT_TYPES[w_bits]),
                    calibrate_method=getattr(CalibrationMethod, method), op_types_to_quantize=op_types,
                    extra_options={"CalibMaxIntermediateOutputs": 16})
    return Path(dst).read_bytes()


def ort_dynamic(fp32_onnx: bytes, workdir: str) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src, dst = os.path.join(workdir, "fp32.onnx"), os.path.join(workdir, "qd.onnx")
    Path(src).write_bytes(fp32_onnx)
    quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)
    return Path(dst).read_bytes()


def nncf_quantize(fp32_onnx: bytes, calib, transformer: bool) -> bytes:
    import nncf
    import onnx
    model = onnx.load_from_string(fp32_onnx)
    data = nncf.Dataset(_Reader(calib).items)
    q = nncf.quantize(model, data, subset_size=len(next(iter(calib.values()))),
                      model_type=nncf.ModelType.TRANSFORMER if transformer else None)
    return q.SerializeToString()


def pt2e_quantize(z, calib):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    dims = {k: {d: torch.export.Dim.AUTO for d in v} for k, v in z.dynamic.items()}
    ep = torch.export.export(z.module, z.example_inputs, dynamic_shapes={k: dims.get(k, {}) for k in z.input_names})
    q = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_dynamic=False))
    m = prepare_pt2e(ep.module(), q)
    with torch.no_grad():
        for b in _Reader(calib).items:
            m(*(torch.from_numpy(b[k]) for k in z.input_names))
    return convert_pt2e(m)


# -- one model --------------------------------------------------------------------------------

class Bench:
    def __init__(self, name: str, n_calib: int):
        import qcompiler
        from qcompiler.backends.onnx import export_onnx
        from qcompiler.models import zoo
        self.name, self.z = name, zoo.get(name)
        self.calib = self.z.calib(n_calib)
        n_eval = EVAL_SENTENCES if name == "minilm" else None
        self.ev, self.labels = self.z.eval_inputs(n_eval), self.z.eval_labels(n_eval)
        self.eval_size = len(next(iter(self.ev.values())))
        self.batch = 32 if name == "minilm" else 500
        with torch.no_grad():
            self.ref = self._run_torch(self.z.module)
        self.g = qcompiler.trace(self.z.module, self.z.example_inputs, input_names=self.z.input_names,
                                 dynamic=self.z.dynamic)
        self.out_name = self.g.outputs[0].name
        self.fp32_onnx = export_onnx(self.g)
        self.rows: list[dict] = []
        self.sink = None  # called with each new row: main() merges it into the results file at once

    def _run_torch(self, module) -> np.ndarray:
        def f(b):
            r = module(*(torch.from_numpy(b[k]) for k in self.z.input_names))
            return (r[0] if isinstance(r, (tuple, list)) else r).detach().numpy()
        return run_batched(f, self.ev, self.batch)

    def add(self, setting: str, variant: str, got: np.ndarray | None = None, **extra) -> None:
        row = {"model": self.name, "setting": setting, "variant": variant}
        if got is not None:
            row.update(score(self.z.metric, self.ref, got, self.labels))
        row.update(extra)
        self.rows.append(row)
        if self.sink is not None:
            self.sink(row)
        print(f"  {self.name} {setting}: {variant}: {json.dumps({k: v for k, v in row.items() if k != 'ops'})[:400]}",
              file=sys.stderr, flush=True)

    def fp32(self) -> None:
        self.add("FP32", "FP32 (PyTorch)", self.ref, **_ops_summary(onnx_ops(self.fp32_onnx)), seconds=0.0)

    def qcompiler_row(self, setting: str, variant: str, overrides: dict, baseline: dict | None) -> dict | None:
        import qcompiler
        from qcompiler.backends.onnx import OnnxRunner
        w, a = SETTINGS[setting]
        t0 = time.perf_counter()
        try:
            art = qcompiler.compile(self.g.copy(), self.calib, config=qcompiler.Config(w_bits=w, a_bits=a, **overrides))
        except Exception as e:  # a pass failing on a model is a result, not a crash
            self.add(setting, variant, na=f"{type(e).__name__}: {e}"[:300])
            return None
        m = art.manifest
        passes = {r["pass"]: r for r in m["passes"]}
        extra = {"recipe": m["recipe"]["name"]}
        if variant == "qcompiler default recipe":
            extra["recipe_settings"] = m["recipe"]["settings"]
            extra["recipe_declined"] = {k: v[:3] for k, v in m["recipe"]["declined"].items()}
        added = [p for p in overrides.get("pre_passes", ()) if p not in BASE] + \
            [p for p in ("gptq", "bias_correction", "log_act") if overrides.get(p)] + \
            (["reparam_prepare", "reparam"] if overrides.get("reparam") else [])
        unchanged = [p for p in added if p in passes and not passes[p]["changed"]]
        if baseline is not None and added and unchanged == added:
            why = "; ".join([d for p in added for d in passes[p]["declined"]][:2]) or "no candidates in this graph"
            self.add(setting, variant, **{k: baseline[k] for k in baseline if k in (
                "top1", "agree_fp32", "cosine_mean", "cosine_min", "nn_agree", "ops", "quantized_ops")},
                note=f"= baseline: {added[0]} changed nothing ({why})"[:300], seconds=round(time.perf_counter() - t0, 1))
            return self.rows[-1]
        runner = None
        if "model.onnx" in art.files:
            try:
                runner = OnnxRunner(art.files["model.onnx"])
                ops = onnx_ops(art.files["model.onnx"])
            except Exception as e:  # score the same fake-quant graph on the reference backend, and say so
                extra["onnx_error"] = str(e)[:300]
                art = qcompiler.compile(self.g.copy(), self.calib, config=qcompiler.Config(
                    w_bits=w, a_bits=a, **{**overrides, "target": "reference"}))
        if runner is None:  # the artifact as deployed: saved, loaded back, run by its backend
            d = tempfile.mkdtemp()
            runner = qcompiler.load(art.save(Path(d) / "art")).runner
            ops = fx_ops(runner.graph.gm)
            if m.get("integer"):
                integer = m["integer"]
                extra.update(float_islands=len(integer["float_islands"]),
                             within_1_lsb_of_fake_quant=integer["agreement_with_fake_quant"].get(
                                 self.out_name, {}).get("within_1_lsb"))
        notes = ["hadamard_* matmuls (added by rotate) in float"] if "hadamard_*" in m["config"]["exclude"] else []
        if "onnx_error" in extra:
            notes.append("ORT rejects the ONNX artifact (see onnx_error); scored on the reference backend")
        if notes:
            extra["note"] = "; ".join(notes)
        got = run_batched(lambda f: runner.run(f)[self.out_name], self.ev, self.batch)
        self.add(setting, variant, got, **_ops_summary(ops), **extra, seconds=round(time.perf_counter() - t0, 1))
        return self.rows[-1]

    def qcompiler_rows(self, setting: str, rows: dict) -> None:
        baseline = None
        for variant, (overrides, models) in rows.items():
            if models is not None and self.name not in models:
                continue
            r = self.qcompiler_row(setting, variant, overrides, baseline)
            if baseline is None:
                baseline = r

    def peers(self, setting: str, ort_methods) -> None:
        from qcompiler.backends.onnx import OnnxRunner
        w, a = SETTINGS[setting]
        transformer = self.name in ("minilm", "fashion_vit")
        # ONNX Runtime quantize_static: the best of its activation types and calibration methods on the
        # evaluation metric
        name = (f"{ORT_STATIC} (best of U{a}/S{a} activations x {'/'.join(ort_methods)} x ops quantized: "
                f"{' or '.join(ORT_OP_SCOPES)})")
        if w not in ORT_TYPES or a not in ORT_TYPES:
            self.add(setting, name, na=f"ONNX has no {w if w not in ORT_TYPES else a}-bit integer type for QDQ "
                                       "(int4, int8, int16 only)")
        else:
            best, tried = None, {}
            for (scope, op_types), act, method in itertools.product(ORT_OP_SCOPES.items(), ORT_ACT_TYPES[a], ort_methods):
                # e.g. "U8S8 MinMax, ops: all": activation and weight types, calibration method, op scope
                label = f"{'U' if 'UInt' in act else 'S'}{a}S{w} {method}, ops: {scope}"
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as d:
                    try:
                        qb = ort_static(self.fp32_onnx, self.calib, w, a, method, d, act_type=act, op_types=op_types)
                        runner = OnnxRunner(qb)
                        got = run_batched(lambda f: runner.run(f)[runner.output_names[0]], self.ev, self.batch)
                    except Exception as e:  # a peer failing on a model is a result, not a crash
                        tried[label] = f"{type(e).__name__}: {e}"[:200]
                        continue
                s = score(self.z.metric, self.ref, got, self.labels)
                key = s.get("top1", s.get("cosine_mean"))
                tried[label] = round(key, 4)
                print(f"  {self.name} {setting}: ORT {label}: {s}", file=sys.stderr, flush=True)
                if best is None or key > best[0]:
                    best = (key, label, s, qb, round(time.perf_counter() - t0, 1))
            if best is None:
                self.add(setting, name, na=f"all op scopes, activation types and calibration methods failed: {tried}")
            else:
                self.add(setting, name, None, **best[2], **_ops_summary(onnx_ops(best[3])), note=f"best: {best[1]}",
                         configurations_tried=tried, seconds=best[4])
        name = "ORT quantize_dynamic per-channel (W8, activations quantized at run time)"
        if w != 8:
            self.add(setting, name, na="int8 weights only")
        elif a != 8:
            self.add(setting, name, na="dynamic activations are 8-bit")
        else:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as d:
                try:
                    qb = ort_dynamic(self.fp32_onnx, d)
                    runner = OnnxRunner(qb)
                    got = run_batched(lambda f: runner.run(f)[runner.output_names[0]], self.ev, self.batch)
                    self.add(setting, name, got, **_ops_summary(onnx_ops(qb)), note="not static",
                             seconds=round(time.perf_counter() - t0, 1))
                except Exception as e:
                    self.add(setting, name, na=f"{type(e).__name__}: {e}"[:300])
        name = f"NNCF quantize (ONNX{', model_type=TRANSFORMER' if transformer else ''}, default preset)"
        if (w, a) != (8, 8):
            self.add(setting, name, na="NNCF post-training quantization of ONNX models is INT8 (W8A8) only")
        else:
            t0 = time.perf_counter()
            try:
                qb = nncf_quantize(self.fp32_onnx, self.calib, transformer)
                runner = OnnxRunner(qb)
                got = run_batched(lambda f: runner.run(f)[runner.output_names[0]], self.ev, self.batch)
                self.add(setting, name, got, **_ops_summary(onnx_ops(qb)), seconds=round(time.perf_counter() - t0, 1))
            except Exception as e:
                self.add(setting, name, na=f"{type(e).__name__}: {e}"[:300])
        name = "PT2E X86InductorQuantizer static (torchao; u8 asym act, s8 per-channel weights)"
        if (w, a) != (8, 8):
            self.add(setting, name, na="X86InductorQuantizer's static configuration is W8A8 only")
        else:
            t0 = time.perf_counter()
            try:
                m = pt2e_quantize(self.z, self.calib)
                with torch.no_grad():
                    got = self._run_torch(m)
                self.add(setting, name, got, **_ops_summary(fx_ops(m)), note="Q/DQ graph run in torch (eager)",
                         seconds=round(time.perf_counter() - t0, 1))
            except Exception as e:
                self.add(setting, name, na=f"{type(e).__name__}: {e}"[:300])


# -- table and results ------------------------------------------------------------------------

def _float_str(r: dict) -> str:
    if "ops" not in r:
        return ""
    f = r["ops"]["float"]
    return ", ".join(f"{k} x{v}" for k, v in sorted(f.items(), key=lambda kv: -kv[1])) or "none"


def print_table(rows: list[dict]) -> None:
    hdr = (f"| {'model':<11} | {'setting':<7} | {'variant':<76} | {'top-1 / cos mean':>16} | {'cos min':>7} | "
           f"{'NN / argmax agree':>17} | {'q ops':>5} | float compute ops")
    print(hdr)
    print("|" + "|".join("-" * (len(c) + 0) for c in hdr.split("|")[1:-1]) + "|---")
    for r in rows:
        lead = f"| {r['model']:<11} | {r['setting']:<7} | {r['variant'][:76]:<76} |"
        if "na" in r:
            print(f"{lead} {'n/a':>16} | {'':>7} | {'':>17} | {'':>5} | {r['na'][:90]}")
            continue
        main_ = r.get("top1", r.get("cosine_mean"))
        mn = f"{r['cosine_min']:.4f}" if "cosine_min" in r else ""
        ag = r.get("agree_fp32", r.get("nn_agree"))
        note = f" ({r['note']})" if r.get("note") else ""
        print(f"{lead} {main_:>16.4f} | {mn:>7} | {ag:>17.4f} | {r.get('quantized_ops', ''):>5} | "
              f"{_float_str(r)[:120]}{note[:140]}")


def markdown_table(rows: list[dict]) -> str:
    """The stored rows as the README's table."""
    out = ["| model | setting | variant | top-1 / cos mean | cos min | NN / argmax agree | ops quantized | left in float |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lead = f"| {r['model']} | {r['setting']} | {r['variant']} |"
        if "na" in r:
            out.append(f"{lead} n/a | | | | {r['na']} |")
            continue
        main_ = r.get("top1", r.get("cosine_mean"))
        mn = f"{r['cosine_min']:.4f}" if "cosine_min" in r else ""
        ag = r.get("agree_fp32", r.get("nn_agree"))
        note = f" ({r['note']})" if r.get("note") else ""
        out.append(f"{lead} {main_:.4f} | {mn} | {ag:.4f} | {r.get('quantized_ops', '')} | {_float_str(r)}{note} |")
    return "\n".join(out)


def merge_results(path: Path, rows: list[dict], done: set[tuple[str, str]], meta: dict) -> list[dict]:
    """Replace the stored rows that were just run again (same model, setting and variant) and
    keep every other row, so a run of some rows or peers (--rows, --no-peers) adds to the
    results instead of dropping the rest. Locked, so parts run as parallel processes can write
    the same file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.exists() else {}
        fresh = {(r["model"], r["setting"], r["variant"]) for r in rows}
        # an ORT static row replaces the one of its model and setting under any earlier name
        fresh |= {(r["model"], r["setting"], v["variant"]) for r in rows if r["variant"].startswith(ORT_STATIC)
                  for v in old.get("rows", []) if v.get("variant", "").startswith(ORT_STATIC)}
        kept = [r for r in old.get("rows", []) if "setting" in r and (r["model"], r["setting"], r["variant"]) not in fresh]
        order = {m: i for i, m in enumerate(["minilm", "fashion_cnn", "fashion_vit"])}
        sorder = {s: i for i, s in enumerate(["FP32", *SETTINGS])}
        vorder = {v: i for i, v in enumerate(["FP32 (PyTorch)", *QC_ROWS, *INTEGER_ROWS])}
        merged = sorted(kept + rows, key=lambda r: (order.get(r["model"], 9), sorder.get(r["setting"], 9),
                                                    vorder.get(r["variant"], len(vorder))))
        runs = {**old.get("runs", {}), **{f"{m}:{s}": meta for m, s in sorted(done)}}
        path.write_text(json.dumps({"about": __doc__.split("\n\n")[0], "runs": runs, "rows": merged}, indent=1) + "\n")
    return merged


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,fashion_cnn,fashion_vit")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {', '.join(SETTINGS)}")
    p.add_argument("--calib", type=int, default=64, help="calibration samples per model")
    p.add_argument("--ort-methods", default=",".join(ORT_METHODS),
                   help="calibration methods of ORT quantize_static to try (the best is reported)")
    p.add_argument("--no-peers", action="store_true", help="qcompiler rows only")
    p.add_argument("--rows", help="only the qcompiler rows whose name contains one of these comma-separated words")
    p.add_argument("--only", choices=["all", "integer", "peers"], default="all",
                   help="integer: only the integer-only rows (and FP32), for a quick check; peers: only the peers")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--table", action="store_true", help="print the stored results as a markdown table; run nothing")
    a = p.parse_args()
    out = RESULTS / ("accuracy_integer.json" if a.only == "integer" else "accuracy.json")
    if a.table:
        print(markdown_table(json.loads(out.read_text())["rows"]))
        return 0
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = ["W8A8"] if a.only == "integer" else [s.strip().upper() for s in a.settings.split(",")]
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        p.error(f"unknown settings {bad} (choose from {', '.join(SETTINGS)})")
    meta = {"calibration_samples": a.calib, "evaluation": {"minilm": f"{EVAL_SENTENCES} sentences",
                                                           "fashion_cnn": "10000 test images",
                                                           "fashion_vit": "10000 test images"},
            "date": time.strftime("%Y-%m-%d"), "ort_methods": a.ort_methods, "peers": not a.no_peers,
            "qcompiler_rows": a.rows or "all", "torch": torch.__version__}
    merged = []
    for name in a.models.split(","):
        t0 = time.perf_counter()
        b = Bench(name, a.calib)
        b.sink = lambda row: merge_results(out, [row], {(row["model"], row["setting"])}, meta)
        b.fp32()
        for s in settings:
            qc = INTEGER_ROWS if a.only == "integer" else {} if a.only == "peers" else QC_ROWS
            if a.rows:
                qc = {k: v for k, v in qc.items() if any(w in k for w in a.rows.split(","))}
            b.qcompiler_rows(s, qc)
            if a.only in ("all", "peers") and not a.no_peers:
                b.peers(s, [m for m in a.ort_methods.split(",") if m])
            # every row is merged into the results as it is measured (Bench.sink): a stopped run keeps it
            merged = merge_results(out, [], {(name, "FP32"), (name, s)}, meta)
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print_table(merged)
    print(f"\nwrote {os.path.relpath(out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
