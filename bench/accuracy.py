"""Accuracy of W8A8 static quantization: qcompiler vs ONNX Runtime's quantize_static, side by
side on the same models, calibration data and evaluation data, in one run.

    .venv/bin/python bench/accuracy.py [--models minilm,fashion_cnn,fashion_vit] [--calib N]

MiniLM: embedding cosine vs FP32 (mean / min over 256 held-aside real sentences) and
nearest-neighbour agreement with FP32. Fashion-MNIST CNN / ViT: top-1 on the 10 k test set.
Every fake-quant model is run by ONNX Runtime (CPU); integer-only rows are the saved integer
artifact run by the reference backend (torch, the kernels that define the integer ops).
Writes bench/results/accuracy.json (accuracy_integer.json with --only integer).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

NO_SMOOTH = ("remove_identities", "fold_bn", "fold_constants")
QC_VARIANTS = {  # name -> Config overrides
    "qcompiler W8A8 default (minmax, smooth, int8 sym act)": {},
    "qcompiler W8A8 minmax, smooth, asym act": {"a_symmetric": False},
    "qcompiler W8A8 percentile, smooth, int8 sym act": {"observer": "percentile"},
    "qcompiler W8A8 minmax, no smooth, int8 sym act": {"pre_passes": NO_SMOOTH},
    "qcompiler W8A8 minmax, no smooth, asym act": {"pre_passes": NO_SMOOTH, "a_symmetric": False},
    "qcompiler W8A8 percentile, no smooth, asym act": {"pre_passes": NO_SMOOTH, "observer": "percentile",
                                                       "a_symmetric": False},
}
# integer-only graphs (qc:: integer ops), run by the reference backend from the saved artifact
INTEGER_VARIANTS = {
    "qcompiler W8A8 integer-only (dyadic requant, int softmax/GELU/LN)": {"integer": True, "target": "reference"},
}
ORT_VARIANTS = {  # name -> quantize_static options
    "ORT quantize_static QDQ per-channel U8S8 minmax": {"activation_type": "QUInt8", "calibrate_method": "MinMax"},
    "ORT quantize_static QDQ per-channel U8S8 percentile": {"activation_type": "QUInt8", "calibrate_method": "Percentile"},
    "ORT quantize_static QDQ per-channel S8S8 minmax": {"activation_type": "QInt8", "calibrate_method": "MinMax"},
    # the same op set qcompiler quantizes by default (ORT's default also quantizes Gather, Add, ...)
    "ORT ... U8S8 minmax, MatMul/Gemm/Conv only": {"activation_type": "QUInt8", "calibrate_method": "MinMax",
                                                   "op_types_to_quantize": ["MatMul", "Gemm", "Conv"]},
}


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


def ort_static(fp32_onnx: bytes, calib: dict[str, np.ndarray], opts: dict, workdir: str) -> bytes:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre, dst = (os.path.join(workdir, f) for f in ("fp32.onnx", "pre.onnx", "q.onnx"))
    Path(src).write_bytes(fp32_onnx)
    try:
        quant_pre_process(src, pre, skip_symbolic_shape=True)
    except Exception:  # pre-processing is advisory; quantize the model as exported when it fails
        pre = src

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = len(next(iter(calib.values())))
            self.it = iter([{k: v[i:i + 8] for k, v in calib.items()} for i in range(0, n, 8)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=getattr(QuantType, opts["activation_type"]), weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, opts["calibrate_method"]),
                    op_types_to_quantize=opts.get("op_types_to_quantize"))
    return Path(dst).read_bytes()


def bench_model(name: str, n_calib: int) -> list[dict]:
    import qcompiler
    from qcompiler.backends.onnx import OnnxRunner, export_onnx
    from qcompiler.models import zoo

    z = zoo.get(name)
    calib = z.calib(n_calib)
    ev = z.eval_inputs(256 if name == "minilm" else None)
    labels = z.eval_labels(256 if name == "minilm" else None)
    batch = 32 if name == "minilm" else 500
    with torch.no_grad():
        ref = run_batched(lambda f: z.module(*(torch.from_numpy(f[k]) for k in z.input_names)).numpy(), ev, batch)
    rows = [{"model": name, "variant": "FP32 (PyTorch)", **score(z.metric, ref, ref, labels), "seconds": 0.0}]
    g = qcompiler.trace(z.module, z.example_inputs, input_names=z.input_names, dynamic=z.dynamic)
    out_name = g.outputs[0].name
    variants = {**QC_VARIANTS, **INTEGER_VARIANTS}
    for variant, overrides in variants.items():
        t0 = time.perf_counter()
        art = qcompiler.compile(g.copy(), calib, config=qcompiler.Config(**overrides))
        extra = {}
        if "model.onnx" in art.files:
            runner = OnnxRunner(art.files["model.onnx"])
        else:  # the artifact as deployed: saved, loaded back, run by its backend
            d = tempfile.mkdtemp()
            runner = qcompiler.load(art.save(Path(d) / "art")).runner
            integer = art.manifest["integer"]
            extra = {"float_islands": len(integer["float_islands"]),
                     "within_1_lsb_of_fake_quant": integer["agreement_with_fake_quant"].get(out_name, {}).get(
                         "within_1_lsb")}
        got = run_batched(lambda f: runner.run(f)[out_name], ev, batch)
        rows.append({"model": name, "variant": variant, **score(z.metric, ref, got, labels), **extra,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  {name}: {variant}: {rows[-1]}", file=sys.stderr, flush=True)
    fp32_onnx = export_onnx(g)
    for variant, opts in ORT_VARIANTS.items():
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            try:
                runner = OnnxRunner(ort_static(fp32_onnx, calib, opts, d))
            except Exception as e:  # a peer failing on a model is a result, not a crash
                rows.append({"model": name, "variant": variant, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
        names = runner.output_names
        got = run_batched(lambda f: runner.run(f)[names[0]], ev, batch)
        rows.append({"model": name, "variant": variant, **score(z.metric, ref, got, labels),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  {name}: {variant}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"| {'model':<11} | {'variant':<55} | {'top-1 / cos mean':>16} | {'cos min':>7} | {'NN / argmax agree':>17} |")
    print(f"|{'-' * 13}|{'-' * 57}|{'-' * 18}|{'-' * 9}|{'-' * 19}|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']:<11} | {r['variant']:<55} | {'failed: ' + r['error'][:40]:>16} |")
            continue
        main_ = r.get("top1", r.get("cosine_mean"))
        mn = f"{r['cosine_min']:.4f}" if "cosine_min" in r else ""
        ag = r.get("agree_fp32", r.get("nn_agree"))
        print(f"| {r['model']:<11} | {r['variant']:<55} | {main_:>16.4f} | {mn:>7} | {ag:>17.4f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,fashion_cnn,fashion_vit")
    p.add_argument("--calib", type=int, default=64, help="calibration samples per model")
    p.add_argument("--only", choices=["all", "integer"], default="all",
                   help="integer: only the integer-only rows (and FP32), for a quick check")
    a = p.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.only == "integer":
        QC_VARIANTS.clear()
        ORT_VARIANTS.clear()
    rows = []
    for name in a.models.split(","):
        rows += bench_model(name, a.calib)
    print_table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("accuracy.json" if a.only == "all" else f"accuracy_{a.only}.json")
    out.write_text(json.dumps({"calibration_samples": a.calib, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {os.path.relpath(out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
