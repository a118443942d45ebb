"""CPU speed of the integer-only TVM artifact against ONNX Runtime on MiniLM.

    .venv/bin/python bench/cpu.py [--profile]    (writes bench/results/cpu-<int8 kernels>.json)

all-MiniLM-L6-v2, batch 8 x seq 128 (real sentences padded to 128 tokens), the machine's
cores, median of interleaved runs. Rows: ORT FP32; ORT int8 static QDQ S8S8 (ORT's own
quantize_static, per-channel, MinMax: every op it quantizes, and MatMul / Gemm / Conv only,
bench/accuracy.py's best ORT static configuration for MiniLM) and dynamic (quantize_dynamic,
per-channel); qcompiler's
W8A8 QDQ artifact run by ORT; qcompiler's integer-only tvm-llvm artifact for this CPU (AMX
linears where it has AMX) and, on a CPU with AVX-512 VNNI, the same built for icelake-server
(VNNI kernels only: what a CPU without AMX runs); on an AVX2 CPU, also the tvm-llvm artifact
with 7-bit weights (--w-bits 7), whose linears run on vpmaddubsw, exact for |w| <= 64. Accuracy: embedding
cosine vs FP32 PyTorch on 256 held-aside sentences, each row scored on the same inputs.
--profile: also time each kernel of the tvm-llvm artifact (TVM's VM instrument around every
call, 5 runs, kernels grouped by name without their numbers), printed and stored as "profile".
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import ORT_OP_SCOPES, ort_dynamic, ort_static, run_batched, score  # noqa: E402
from demo import interleaved_medians, pad_to  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


VNNI_MCPU = "icelake-server"
VNNI_ONLY = f"qcompiler tvm-llvm artifact, VNNI only ({VNNI_MCPU})"
W7_AVX2 = "qcompiler tvm-llvm artifact, W7A8 (vpmaddubsw)"


def profile(artifact_dir: Path, feeds: dict, runs: int = 5) -> list[dict]:
    """ms per run of each kernel group of a tvm-llvm artifact (VM instrument; needs apache-tvm)."""
    import re
    from collections import defaultdict

    import tvm
    from tvm import relax

    from qcompiler.backends.tvm.runtime import configure_threads, request_amx_permission
    request_amx_permission()
    configure_threads()
    man = json.loads((artifact_dir / "manifest.json").read_text())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact_dir / "model.so")), tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[d["name"]])) for d in man["inputs"]]
    total, calls, start = defaultdict(float), defaultdict(int), {}

    def instrument(_func, name, before, _ret, *_args):
        if before:
            start[name] = time.perf_counter()
        else:
            group = re.sub(r"\d+", "", name)
            total[group] += time.perf_counter() - start[name]
            calls[group] += 1
        return 0
    vm["main"](*args)
    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](*args)
    return [{"kernel": k, "ms_per_run": round(1000 * v / runs, 3), "calls_per_run": calls[k] // runs}
            for k, v in sorted(total.items(), key=lambda kv: -kv[1])]


def main() -> int:
    want_profile = "--profile" in sys.argv[1:]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import qcompiler
    from qcompiler.backends.onnx import OnnxRunner, export_onnx
    from qcompiler.models import zoo

    z = zoo.get("minilm")
    calib = z.calib(64)
    ev = z.eval_inputs(256)
    with torch.no_grad():
        ref = run_batched(lambda f: z.module(*(torch.from_numpy(f[k]) for k in z.input_names)).numpy(), ev, 32)
    g = qcompiler.trace(z.module, z.example_inputs, input_names=z.input_names, dynamic=z.dynamic)
    fp32 = export_onnx(g)
    work = tempfile.mkdtemp()
    runners, compile_s, dirs = {}, {}, {}
    # no ORT session spins after its run (its default): in interleaved runs the spinning threads
    # took the cores from whatever ran next (measured: the tvm-llvm artifact 1.5x slower after one)
    ort_runner = lambda model: OnnxRunner(model, spinning=False)  # noqa: E731
    runners["ORT FP32"] = ort_runner(fp32)
    t0 = time.perf_counter()
    runners["ORT int8 static QDQ S8S8 (quantize_static)"] = ort_runner(
        ort_static(fp32, calib, 8, 8, "MinMax", work))
    compile_s["ORT static"] = time.perf_counter() - t0
    # bench/accuracy.py's best ORT static configuration for MiniLM W8A8 (S8S8 MinMax, MatMul/Gemm/Conv only)
    runners["ORT int8 static QDQ S8S8, MatMul/Gemm/Conv only"] = ort_runner(
        ort_static(fp32, calib, 8, 8, "MinMax", work, op_types=ORT_OP_SCOPES["MatMul/Gemm/Conv"]))
    runners["ORT int8 dynamic (quantize_dynamic)"] = ort_runner(ort_dynamic(fp32, work))
    from qcompiler.backends.tvm.build import int8_dot, target_for
    target = target_for("llvm", None)
    dot = int8_dot(target)  # the int8 kernels the tvm-llvm artifact uses here: "amx", "vnni", "avx2" or None
    for name, target_name, w_bits in (("qcompiler W8A8 QDQ artifact on ORT", "onnx", 8),
                                      ("qcompiler integer-only tvm-llvm artifact", "tvm-llvm", 8),
                                      # what a CPU with AVX-512 VNNI but no AMX runs (Ice Lake server, AMD Zen 4)
                                      (VNNI_ONLY, f"tvm-llvm:{VNNI_MCPU}", 8),
                                      (W7_AVX2, "tvm-llvm", 7)):
        if name == VNNI_ONLY and dot not in ("vnni", "amx"):  # this CPU has no AVX-512 VNNI to run it
            continue
        if name == W7_AVX2 and dot != "avx2":  # 7-bit weights change the kernel on AVX2 only
            continue
        t0 = time.perf_counter()
        art = qcompiler.compile(g.copy(), calib, config=qcompiler.Config(target=target_name, w_bits=w_bits))
        compile_s[name] = time.perf_counter() - t0
        dirs[name] = Path(work) / f"{target_name}-w{w_bits}"
        art.save(dirs[name])
        runners[name] = ort_runner(dirs[name] / "model.onnx") if target_name == "onnx" else \
            qcompiler.load(dirs[name]).runner
    out = g.outputs[0].name
    acc = {name: score("cosine", ref, run_batched(lambda f, r=r: r.run(f)[out], ev, 32), None)
           for name, r in runners.items()}
    bench = pad_to(z.eval_inputs(8), 128)
    lat = interleaved_medians({name: (lambda r=r: r.run(bench)) for name, r in runners.items()}, runs=11)
    fastest_int8 = min(v for k, v in lat.items() if k.startswith("ORT int8"))
    print(f"\nall-MiniLM-L6-v2 on {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), batch 8 x seq 128, "
          f"median of 11 interleaved runs; cosine vs FP32 on {len(ev['input_ids'])} sentences; tvm-llvm int8 kernels: "
          f"{dot or 'generic'} ({target.attrs.get('mcpu', '')})\n")
    w = max(len(name) for name in runners)
    print(f"| {'variant':<{w}} | {'cosine mean':>11} | {'cosine min':>10} | {'latency ms':>10} | "
          f"{'vs fastest ORT int8':>19} |")
    print(f"|{'-' * (w + 2)}|{'-' * 13}|{'-' * 12}|{'-' * 12}|{'-' * 21}|")
    rows = []
    for name in runners:
        a, ms = acc[name], lat[name]
        print(f"| {name:<{w}} | {a['cosine_mean']:>11.4f} | {a['cosine_min']:>10.4f} | {ms:>10.1f} | "
              f"{fastest_int8 / ms:>18.2f}x |")
        rows.append({"variant": name, **a, "latency_ms": round(ms, 2), "speed_vs_fastest_ort_int8": fastest_int8 / ms})
    prof = None
    if want_profile:
        prof = profile(dirs["qcompiler integer-only tvm-llvm artifact"], bench)
        print(f"\nkernels of the tvm-llvm artifact, ms per run (VM instrument, sum {sum(p['ms_per_run'] for p in prof):.1f}):")
        for p in prof[:20]:
            print(f"  {p['ms_per_run']:8.2f}  x{p['calls_per_run']:<4d} {p['kernel']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"cpu-{dot or 'generic'}.json").write_text(json.dumps({
        "model": "all-MiniLM-L6-v2", "batch": 8, "seq": 128, "cores": os.cpu_count(),
        "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None),
        "tvm_int8_dot": dot, "tvm_target": str(target.attrs.get("mcpu", "")),
        "compile_seconds": {k: round(v, 1) for k, v in compile_s.items()}, "rows": rows,
        **({"profile": prof} if prof else {})}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
