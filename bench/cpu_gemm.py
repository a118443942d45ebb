"""CPU int8 GEMM kernels at MiniLM's linear shapes (batch 8 x seq 128 = 1024 rows), against ONNX
Runtime's MatMulInteger (u8 x s8 -> int32, what quantize_dynamic runs).

    .venv/bin/python bench/cpu_gemm.py [--runs N]    (writes bench/results/cpu-gemm-<int8 kernels>.json)

Rows: backends/tvm/vnni.py's kernel for this CPU (VNNI, or on AVX2 the int16 kernel for 8-bit
weights and the vpmaddubsw kernel for weights in [-64, 64]), each with its per-column requant
epilogue, bit-checked against numpy; ORT's MatMulInteger on the same shape, int32 out, no
requant. Both on one thread per physical core (runtime.configure_threads; ORT without spinning),
medians of interleaved runs, GOP/s = 2 M K N / time.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(1024, 384, 1152), (1024, 384, 384), (1024, 384, 1536), (1024, 1536, 384)]  # q/k/v, out, FFN1, FFN2


def ours(isa, m: int, k: int, n: int, rng):
    """A timed call of vnni.py's kernel (checked once against numpy) and its label."""
    import tvm

    from qcompiler.backends.tvm import vnni
    from qcompiler.backends.tvm.build import target_for
    wmax = vnni.S7_MAX if isa is vnni.AVX2_S7 else 127
    w = rng.integers(-wmax, wmax + 1, (n, k)).astype(np.int8)
    u = rng.integers(0, 256, (1, m, k)).astype(np.uint8) if isa.act == "uint8" else \
        rng.integers(-255, 256, (1, m, k)).astype(np.int16)
    off, mult, shift = rng.integers(-1000, 1000, n), rng.integers(1, 2**20, n), np.full(n, 28)
    e = vnni.epilogue_table(off, mult, shift, isa, -3)
    f = vnni.kernel(k, n, True, vnni.Requant("int8", -3, -128, 127, True), isa)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target_for("llvm", None))
    args = [tvm.runtime.tensor(a) for a in (u, vnni.pack(w, isa), e, np.zeros((1, m, n), np.int8))]
    fn = lib["main"]
    fn(*args)
    p = (u[0].astype(np.int64) @ w.T.astype(np.int64) + off) * mult
    want = np.clip(((p + (1 << 27) - (p < 0)) >> 28) - 3, -128, 127)
    if not np.array_equal(args[3].numpy()[0], want):
        raise SystemExit(f"{isa.name} {m}x{k}x{n}: the kernel differs from numpy")
    return lambda: fn(*args)


def ort_matmul_integer(m: int, k: int, n: int, rng):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(rng.integers(-128, 128, (k, n)).astype(np.int8), "w")
    zps = [numpy_helper.from_array(np.array(3, np.uint8), "az"), numpy_helper.from_array(np.array(0, np.int8), "wz")]
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w", "az", "wz"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])], [w, *zps])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    return lambda: s.run(None, {"a": a})


def main() -> int:
    runs = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 15
    from qcompiler.backends.tvm import vnni
    from qcompiler.backends.tvm.build import int8_dot, target_for
    from qcompiler.backends.tvm.runtime import configure_threads
    configure_threads()
    dot = int8_dot(target_for("llvm", None))
    if dot not in ("vnni", "amx", "avx2"):
        print("this CPU has neither AVX2 nor AVX-512 VNNI: no int8 kernel of ours to measure")
        return 1
    isas = [vnni.isa_of(dot)] + ([vnni.AVX2_S7] if dot == "avx2" else [])
    rng = np.random.default_rng(0)
    rows = []
    print(f"int8 GEMM, {os.environ['TVM_NUM_THREADS']} threads, median of {runs} interleaved runs (GOP/s)\n")
    names = [i.name for i in isas]
    print("| M x K x N | " + " | ".join(names) + " | ORT MatMulInteger | " +
          " | ".join(f"{nm} / ORT" for nm in names) + " |")
    print("|---" * (2 * len(names) + 2) + "|")
    for m, k, n in SHAPES:
        fns = {i.name: ours(i, m, k, n, rng) for i in isas}
        fns["ORT MatMulInteger"] = ort_matmul_integer(m, k, n, rng)
        times = {name: [] for name in fns}
        for f in fns.values():
            f()
        for _ in range(runs):
            for name, f in fns.items():
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
        gops = {name: 2 * m * k * n / float(np.median(t)) / 1e9 for name, t in times.items()}
        ort_g = gops["ORT MatMulInteger"]
        print(f"| {m} x {k} x {n} | " + " | ".join(f"{gops[nm]:.0f}" for nm in names) + f" | {ort_g:.0f} | " +
              " | ".join(f"{gops[nm] / ort_g:.2f}x" for nm in names) + " |")
        rows.append({"m": m, "k": k, "n": n, "gops": {k_: round(v, 1) for k_, v in gops.items()}})
    RESULTS.mkdir(exist_ok=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None)
    (RESULTS / f"cpu-gemm-{dot}.json").write_text(json.dumps({
        "cpu": cpu, "int8_dot": dot, "threads": int(os.environ["TVM_NUM_THREADS"]), "runs": runs,
        "when": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
