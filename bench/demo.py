"""`make demo`: compile the real MiniLM sentence encoder to W8A8 artifacts with the CLI (QDQ ONNX
for ONNX Runtime, and, where apache-tvm is installed, the integer-only graph as a tvm-llvm
library), run them, and compare them with FP32: embedding cosine on held-aside real
sentences, size, and latency (batch 8 x seq 128, interleaved runs, medians).

Writes bench/results/demo.json.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TVM_ROW = "W8A8 integer-only, tvm-llvm"
OUT = ROOT / "out" / "demo"
RESULTS = ROOT / "bench" / "results"


def pad_to(arrays: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    return {k: np.pad(v[:, :length], ((0, 0), (0, max(0, length - v.shape[1])))) for k, v in arrays.items()}


def interleaved_medians(fns: dict, runs: int = 15, warmup: int = 2) -> dict[str, float]:
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    torch.set_num_threads(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import qcompiler
    from qcompiler.backends.onnx import OnnxRunner, export_onnx
    from qcompiler.models import zoo

    from accuracy import score  # bench/ is on sys.path when this file runs as a script

    OUT.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    z = zoo.get("minilm")
    calib_path = OUT / "minilm_calib.npz"
    np.savez(calib_path, **z.calib(64))
    ev = z.eval_inputs(256)
    with torch.no_grad():
        ref = z.module(*(torch.from_numpy(ev[k]) for k in z.input_names)).numpy()

    variants = {  # row name -> extra CLI flags
        "W8A8 artifact, int8 sym act": [],  # the default: TensorRT's explicit-quantization convention
        "W8A8 artifact, uint8 asym act": ["--a-asym"],
    }
    if importlib.util.find_spec("tvm") is not None:  # `make install` installs it (the [tvm] extra)
        variants[TVM_ROW] = ["--target", "tvm-llvm"]  # the integer-only graph, compiled by TVM for this CPU
    results, models, compile_s = {}, {}, {}
    for name, flags in variants.items():
        art_dir = OUT / ("minilm-w8a8" + "".join("-" + f.removeprefix("--") for f in flags))
        cmd = [str(Path(sys.executable).with_name("qcompiler")), "compile", "zoo:minilm", "--calib", str(calib_path),
               "-o", str(art_dir), "--force", *flags]
        print("$ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        compile_s[name] = time.perf_counter() - t0
        models[name] = model = qcompiler.load(art_dir)
        if (art_dir / "model.onnx").exists():  # no spinning after a run: see bench/cpu.py
            model.runner = OnnxRunner(art_dir / "model.onnx", spinning=False)
        got = model(ev)[model.outputs[0].name]
        sc = score("cosine", ref, got, None)  # cosine vs FP32 and nearest-neighbour agreement
        main_file = art_dir / ("model.so" if "tvm-llvm" in flags else "model.onnx")  # constants included
        results[name] = (sc["cosine_mean"], sc["cosine_min"], sc["nn_agree"], main_file.stat().st_size)

    fp32_bytes = sum(p.numel() * 4 for p in z.module.state_dict().values() if p.dtype == torch.float32)
    # FP32 in ONNX Runtime, exported by the same backend from the same float graph
    g = qcompiler.trace(z.module, z.example_inputs, input_names=z.input_names, dynamic=z.dynamic)
    fp32_ort = OnnxRunner(export_onnx(g), spinning=False)
    bench = pad_to(z.eval_inputs(8), 128)
    tensors = [torch.from_numpy(bench[k]) for k in z.input_names]
    with torch.no_grad():
        lat = interleaved_medians({
            "FP32 PyTorch": lambda: z.module(*tensors),
            "FP32 ONNX Runtime": lambda: fp32_ort.run(bench),
            **{name: (lambda m=m: m(bench)) for name, m in models.items()},
        })
    rows = [
        ("FP32 PyTorch", 1.0, 1.0, 1.0, fp32_bytes, lat["FP32 PyTorch"]),
        ("FP32 ONNX Runtime", None, None, None, None, lat["FP32 ONNX Runtime"]),
        *[(name, *results[name], lat[name]) for name in variants],
    ]
    print(f"\nall-MiniLM-L6-v2, {len(ev['input_ids'])} held-aside real sentences; latency: batch 8 x seq 128, "
          f"{torch.get_num_threads()} threads, median of 15 interleaved runs; artifacts run by ONNX Runtime"
          f"{', the tvm-llvm one by the TVM runtime' if TVM_ROW in variants else ''}; "
          f"compile took {max(compile_s.values()):.0f} s\n")
    print(f"| {'variant':<30} | {'cosine mean':>11} | {'cosine min':>10} | {'NN agree':>8} | {'size MB':>7} | {'latency ms':>10} |")
    print(f"|{'-' * 32}|{'-' * 13}|{'-' * 12}|{'-' * 10}|{'-' * 9}|{'-' * 12}|")
    f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    for name, cm, cn, ra, size, ms in rows:
        print(f"| {name:<30} | {f(cm, '.4f'):>11} | {f(cn, '.4f'):>10} | {f(ra, '.3f'):>8} | "
              f"{f(size and size / 1e6, '.1f'):>7} | {ms:>10.1f} |")
    (RESULTS / "demo.json").write_text(json.dumps({
        "model": "all-MiniLM-L6-v2", "sentences": len(ev["input_ids"]),
        "compile_seconds": {k: round(v, 1) for k, v in compile_s.items()},
        "threads": torch.get_num_threads(),
        "rows": [dict(zip(("variant", "cosine_mean", "cosine_min", "nn_agreement", "bytes", "latency_ms"), r))
                 for r in rows]}, indent=1) + "\n")
    print(f"\nartifacts in {os.path.relpath(OUT, ROOT)}/ (look inside: .venv/bin/qcompiler inspect "
          f"{os.path.relpath(OUT / 'minilm-w8a8', ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
