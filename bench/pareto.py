"""Mixed precision vs its baselines across budgets: accuracy against model size (and against
measured ONNX Runtime CPU latency) for the HAWQ ILP assignment, uniform widths, the best of 20
random assignments of equal or smaller cost, and greedy-by-sensitivity at the same budget.

    .venv/bin/python bench/pareto.py [--models fashion_cnn,fashion_vit,minilm] [--eval-images 10000]

Per model, one sensitivity run (Hutchinson traces of weights and of layer inputs, activation
widths 8 and 16) and one calibration per activation width are reused by every assignment.
Each assignment is scored by qcompiler's fake-quant graph run in torch: Fashion-MNIST CNN and
ViT top-1 on the test set (the first --eval-images), MiniLM embedding cosine vs FP32 on 128
held-aside sentences. Size sweep: weights {4, 8} at 8-bit activations. Latency sweep: weights
{4, 8} x activations {8, 16}, latency from a table measured here by qcompiler.latency
(onnx-cpu; written to bench/results/latency/<model>-onnx-cpu.json).
Writes bench/results/pareto.json, pareto.png (when matplotlib is installed: the "report"
extra) and pareto.sensitivity.png, and prints the table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
A_BITS = (8, 16)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Model:
    """A zoo model prepared once: float graph, annotated graph with sensitivities, cached activation
    QParams per width, evaluation data and reference outputs, and a memo of scored assignments."""

    def __init__(self, name: str, a):
        import qcompiler
        from qcompiler.calib import CalibData
        from qcompiler.config import Config
        from qcompiler.ir import QMETA
        from qcompiler.models import zoo
        from qcompiler.passes.quantize import layers
        from qcompiler.passes.sensitivity import hutchinson_traces
        from qcompiler.pipeline import PassContext, PassManager

        self.name = name
        z = zoo.get(name)
        self.metric = z.metric
        text = name == "minilm"
        g = qcompiler.trace(z.module, z.example_inputs, input_names=z.input_names, dynamic=z.dynamic)
        self.calib = CalibData(z.calib(a.calib_text if text else a.calib_images), batch_size=8 if text else 32)
        self.ctx = PassContext(config=Config(), calib=self.calib)
        t0 = time.perf_counter()
        self.float_graph = PassManager(list(Config().pre_passes)).run(g, self.ctx)  # smooth etc.: as compile() runs
        self.ann = PassManager(["annotate"]).run(self.float_graph.copy(), self.ctx)
        self.sens = hutchinson_traces(self.ann, self.calib, a_bits=A_BITS, max_iters=a.hutchinson_iters,
                                      max_batches=a.sensitivity_batches, progress=False, seed=0)
        for n in layers(self.ann):
            if n.name in self.sens:
                n.meta[QMETA]["sensitivity"] = self.sens[n.name]
        self.sensitivity_seconds = time.perf_counter() - t0
        self.qparams = {}  # (layer, input index, bits) -> QParams, from the calibrate pass at that width
        for bits in A_BITS:
            g = self.copy()
            for n in layers(g):
                for q in n.meta[QMETA]["inputs"].values():
                    if q["role"] == "act":
                        q["spec"] = q["spec"].with_(bits=bits)
            g = PassManager(["calibrate"]).run(g, self.ctx)
            for n in layers(g):
                for i, q in n.meta[QMETA]["inputs"].items():
                    if q["role"] == "act":
                        self.qparams[(n.name, i, bits)] = q["qparams"]
        ev = z.eval_inputs(128 if text else a.eval_images)
        self.labels = z.eval_labels(128 if text else a.eval_images)
        self.batches = [tuple(torch.from_numpy(ev[k][i:i + (32 if text else 1000)]) for k in z.input_names)
                        for i in range(0, len(ev[z.input_names[0]]), 32 if text else 1000)]
        self.n_eval = len(ev[z.input_names[0]])
        with torch.no_grad():
            self.ref = np.concatenate([z.module(*b).numpy() for b in self.batches])
        self.memo: dict[tuple, float] = {}
        log(f"{name}: {len(self.sens)} weighted layers, sensitivity + calibration {self.sensitivity_seconds:.0f} s")

    def copy(self):
        """A copy of the annotated graph whose annotations are its own (Graph.copy can share node.meta
        entries with the original, and assignments rewrite them)."""
        from qcompiler.ir import QMETA
        from qcompiler.passes.quantize import layers
        g = self.ann.copy()
        for n in layers(g):
            n.meta[QMETA] = copy.deepcopy(n.meta[QMETA])
        return g

    def score(self, assignment, choices) -> float:
        """Top-1 (images) or mean cosine vs FP32 (MiniLM) of the fake-quant graph for an assignment."""
        from accuracy import score as accuracy_score  # bench/ is on sys.path when this file runs as a script
        from qcompiler.ir import QMETA
        from qcompiler.passes.mixed_precision import apply_choices
        from qcompiler.passes.quantize import InsertFakeQuant, layers

        key = tuple(o.config for _, o in sorted(assignment.choices.items()))
        if key in self.memo:
            return self.memo[key]
        g = self.copy()
        nodes = [n for n in layers(g) if n.name in self.sens]
        apply_choices(nodes, choices, assignment)
        for n in layers(g):
            for i, q in n.meta[QMETA]["inputs"].items():
                if q["role"] == "act":
                    q["qparams"] = self.qparams[(n.name, i, q["spec"].bits)]
        g = InsertFakeQuant().run(g, self.ctx).graph
        with torch.no_grad():
            got = np.concatenate([g(*b)[0].numpy() for b in self.batches])
        s = accuracy_score(self.metric, self.ref, got, self.labels)
        self.memo[key] = v = s["top1"] if self.metric == "top1" else s["cosine_mean"]
        return v


def sweep(m: Model, choices, res: str, budgets, k_random: int, uniform_configs) -> list[dict]:
    """Each method at each budget of resource `res` ("size" or "latency")."""
    from qcompiler.errors import QCError
    from qcompiler.passes.mixed_precision import _assignment, greedy_by_sensitivity, random_assignments, solve_bits

    score = lambda a: m.score(a, choices)  # noqa: E731
    kw_name = {"size": "size_budget_bytes", "latency": "latency_budget"}[res]
    total_key = {"size": "size_bytes", "latency": "latency_ms"}[res]
    uniform = {}
    for cfg in uniform_configs:
        idx = []
        for lc in choices:
            hits = [i for i, o in enumerate(lc.options) if o.config == cfg] or \
                   [i for i, o in enumerate(lc.options) if o.config == cfg.split("a")[0]]
            if not hits:
                raise ValueError(f"{lc.name} has no option {cfg} (options {[o.config for o in lc.options]})")
            idx.append(hits[0])
        uniform[cfg] = _assignment(choices, idx, {}, 0.0, "uniform")
    rows = []
    for bi, budget in enumerate(budgets):
        kw = {kw_name: budget}
        t0 = time.perf_counter()
        try:
            hawq = solve_bits(choices, **kw)
        except QCError as e:
            log(f"  {m.name} {res} budget {budget:.4g}: {e}")
            continue
        row = {"model": m.name, "sweep": res, "budget": budget, "hawq": score(hawq),
               "hawq_cost": hawq.totals[total_key], "hawq_omega": hawq.objective,
               "hawq_configs": _counts(hawq)}
        feas = {c: a for c, a in uniform.items() if a.totals[total_key] <= budget * (1 + 1e-12)}
        us = {c: score(a) for c, a in feas.items()}
        best_u = max(us, key=us.get) if us else None
        row.update(uniform_best=us.get(best_u), uniform_config=best_u, uniform_all=us)
        rnd = random_assignments(choices, **kw, k=k_random, seed=1000 + bi)
        rs = [score(r) for r in rnd]
        row.update(random_n=len(rs), random_best=max(rs) if rs else None, random_all=rs,
                   random_costs=[r.totals[total_key] for r in rnd])
        g = greedy_by_sensitivity(choices, **kw)
        row.update(greedy=score(g) if g else None, greedy_cost=g.totals[total_key] if g else None)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        log(f"  {m.name} {res} <= {budget:.4g}: HAWQ {row['hawq']:.4f}, uniform {row['uniform_best']} ({best_u}), "
            f"random best {row['random_best']} of {len(rs)}, greedy {row['greedy']}  [{row['seconds']} s]")
    return rows


def _counts(a) -> dict:
    out: dict[str, int] = {}
    for o in a.choices.values():
        out[o.config] = out.get(o.config, 0) + 1
    return out


def verdicts(rows: list[dict]) -> dict:
    """Per model and sweep: HAWQ >= best uniform and >= best random at every budget; strictly better somewhere."""
    out = {}
    for key in sorted({(r["model"], r["sweep"]) for r in rows}):
        rs = [r for r in rows if (r["model"], r["sweep"]) == key]
        ge_u = all(r["uniform_best"] is None or r["hawq"] >= r["uniform_best"] for r in rs)
        ge_r = all(r["random_best"] is None or r["hawq"] >= r["random_best"] for r in rs)
        strict = any((r["uniform_best"] is None or r["hawq"] > r["uniform_best"]) and
                     (r["random_best"] is None or r["hawq"] > r["random_best"]) for r in rs)
        out[f"{key[0]}/{key[1]}"] = {"hawq_ge_uniform_everywhere": ge_u, "hawq_ge_best_random_everywhere": ge_r,
                                     "strictly_better_than_both_somewhere": strict, "budgets": len(rs)}
    return out


def print_table(rows: list[dict]) -> None:
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"| {'model':<11} | {'sweep':<7} | {'budget':>10} | {'HAWQ':>7} | {'uniform':>7} | {'(which)':<7} | "
          f"{'rand best':>9} | {'n':>2} | {'greedy':>7} | HAWQ configs")
    print("|" + "|".join("-" * w for w in (13, 9, 12, 9, 9, 9, 11, 4, 9, 30)) + "|")
    for r in rows:
        b = f"{r['budget'] / 1e6:.4f} MB" if r["sweep"] == "size" else f"{r['budget']:.3f} ms"
        cfgs = " ".join(f"{k}:{v}" for k, v in sorted(r["hawq_configs"].items()))
        print(f"| {r['model']:<11} | {r['sweep']:<7} | {b:>10} | {f(r['hawq']):>7} | {f(r['uniform_best']):>7} | "
              f"{r['uniform_config'] or '-':<7} | {f(r['random_best']):>9} | {r['random_n']:>2} | {f(r['greedy']):>7} | {cfgs}")


def plot(rows: list[dict], sens: dict, fp32: dict) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install 'qcompiler[report]'): no plots, the table and JSON are written")
        return []
    keys = sorted({(r["model"], r["sweep"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, (model, res) in zip(axes[0], keys):
        rs = sorted((r for r in rows if (r["model"], r["sweep"]) == (model, res)), key=lambda r: r["budget"])
        x = lambda r: r["budget"] / 1e6 if res == "size" else r["budget"]  # noqa: E731
        for r in rs:
            ax.scatter([c / 1e6 if res == "size" else c for c in r["random_costs"]], r["random_all"], s=6,
                       color="0.75", zorder=1)
        ax.plot([x(r) for r in rs], [r["hawq"] for r in rs], "o-", color="C0", label="HAWQ ILP", zorder=3)
        ax.plot([x(r) for r in rs], [r["random_best"] for r in rs], "s--", color="C2", label="best of random", zorder=2)
        ax.plot([x(r) for r in rs], [r["greedy"] for r in rs], "^:", color="C1", label="greedy", zorder=2)
        ax.plot([x(r) for r in rs], [r["uniform_best"] for r in rs], "x-.", color="C3", label="best uniform", zorder=2)
        ax.axhline(fp32[model], color="k", lw=0.6, ls=":", label="FP32")
        ax.set_xlabel("weight size budget (MB)" if res == "size" else "ORT CPU latency budget (ms)")
        ax.set_ylabel("top-1" if model != "minilm" else "cosine vs FP32")
        ax.set_title(f"{model}: accuracy vs {res}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "pareto.png", dpi=120)
    fig2, axes2 = plt.subplots(len(sens), 1, figsize=(11, 2.6 * len(sens)), squeeze=False)
    for ax, (model, s) in zip(axes2[:, 0], sens.items()):
        names = list(s)
        w = [s[n]["trace"] / s[n]["n_params"] for n in names]
        act = [sum(a["trace"] / a["numel"] for a in s[n].get("act", {}).values()) for n in names]
        xs = np.arange(len(names))
        ax.bar(xs - 0.2, w, 0.4, label="weights Tr(H)/n")
        ax.bar(xs + 0.2, act, 0.4, label="input activation Tr(H)/n per sample")
        ax.set_yscale("log")
        ax.set_xticks(xs, names, rotation=90, fontsize=6)
        ax.set_title(f"{model}: per-layer Hessian trace per element", fontsize=9)
        ax.legend(fontsize=7)
    fig2.tight_layout()
    fig2.savefig(RESULTS / "pareto.sensitivity.png", dpi=110)
    return ["bench/results/pareto.png", "bench/results/pareto.sensitivity.png"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="fashion_cnn,fashion_vit,minilm")
    p.add_argument("--eval-images", type=int, default=10000, help="Fashion-MNIST test images scored (the first N)")
    p.add_argument("--size-budgets", type=int, default=4, help="budgets strictly between all-4-bit and all-8-bit size")
    p.add_argument("--latency-budgets", type=int, default=3, help="latency budgets (0: no latency sweep)")
    p.add_argument("--random", type=int, default=20, help="random assignments per budget")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--calib-text", type=int, default=32)
    p.add_argument("--sensitivity-batches", type=int, default=2)
    p.add_argument("--hutchinson-iters", type=int, default=30)
    p.add_argument("--latency-repeats", type=int, default=15)
    p.add_argument("--part", help="write only this JSON (one model's rows, for running models in parallel processes)")
    p.add_argument("--merge", nargs="+", metavar="PART", help="combine --part files into the table, JSON and plots")
    a = p.parse_args()
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        return report([r for d in parts for r in d["rows"]], {k: v for d in parts for k, v in d["sensitivity"].items()},
                      {k: v for d in parts for k, v in d["models"].items()}, parts[0]["settings"],
                      " && ".join(d["command"] for d in parts) + " && " + shlex.join(["python", "bench/pareto.py", *sys.argv[1:]]),
                      sum(d["seconds"] for d in parts))
    torch.set_num_threads(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qcompiler.latency import profile_layers, save_table
    from qcompiler.passes.mixed_precision import build_choices

    t_start = time.perf_counter()
    rows, sens, fp32, info = [], {}, {}, {}
    for name in a.models.split(","):
        m = Model(name, a)
        sens[name] = m.sens
        fp32[name] = 1.0 if m.metric == "cosine" else float((m.ref.argmax(1) == m.labels).mean())
        _, size_choices, _ = build_choices(m.ann, {"bits": [4, 8]})
        lo = sum(min(o.size_bytes for o in lc.options) for lc in size_choices)
        hi = sum(max(o.size_bytes for o in lc.options) for lc in size_choices)
        fr = np.linspace(0, 1, a.size_budgets + 2)[1:-1]
        rows += sweep(m, size_choices, "size", [lo + f * (hi - lo) for f in fr], a.random, ("w4a8", "w8a8"))
        info[name] = {"weighted_layers": len(size_choices), "size_all4_bytes": lo, "size_all8_bytes": hi,
                      "fp32": fp32[name], "sensitivity_seconds": round(m.sensitivity_seconds, 1),
                      "eval_samples": m.n_eval}
        if a.latency_budgets > 0:
            t0 = time.perf_counter()
            configs = ("w4a8", "w8a8", "w4a16", "w8a16")
            table = profile_layers(m.ann, "onnx-cpu", configs, calib=m.calib, batch=m.calib.batch_size,
                                   repeats=a.latency_repeats, progress=False, timer_options={"threads": 1})
            path = RESULTS / "latency" / f"{name}-onnx-cpu.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_table(path, table, model=name, command=shlex.join(
                ["python", "bench/pareto.py", *sys.argv[1:]]) + "  (table built inside: profile_layers(annotated "
                f"graph, 'onnx-cpu', {list(configs)}, batch {m.calib.batch_size}, threads=1))")
            _, lat_choices, _ = build_choices(m.ann, {"bits": [4, 8], "a_bits": list(A_BITS)}, table)
            lmin = sum(min(o.latency_ms for o in lc.options) for lc in lat_choices)
            lmax = sum(max(o.latency_ms for o in lc.options) for lc in lat_choices)
            fr = np.linspace(0, 1, a.latency_budgets + 2)[1:-1]
            rows += sweep(m, lat_choices, "latency", [lmin + f * (lmax - lmin) for f in fr], a.random, configs)
            info[name].update(latency_table=os.path.relpath(path, ROOT), latency_min_ms=lmin, latency_max_ms=lmax,
                              latency_profile_seconds=round(time.perf_counter() - t0, 1))
        info[name]["top_sensitive_act_inputs"] = sorted(
            m.sens, key=lambda n: -sum(x["omega"][8] for x in m.sens[n].get("act", {}).values()))[:6]
        log(f"{name}: done, {time.perf_counter() - t_start:.0f} s so far")
    command = shlex.join(["python", "bench/pareto.py", *sys.argv[1:]])
    if a.part:
        doc = {"command": command, "settings": vars(a), "seconds": round(time.perf_counter() - t_start, 1),
               "models": info, "rows": rows, "sensitivity": sens}
        Path(a.part).write_text(json.dumps(doc, indent=1, default=str) + "\n")
        return 0
    return report(rows, sens, info, vars(a), command, time.perf_counter() - t_start)


def report(rows, sens, info, settings, command, seconds) -> int:
    """Print the table and verdicts; write pareto.json and the plots."""
    fp32 = {k: v["fp32"] for k, v in info.items()}
    print_table(rows)
    v = verdicts(rows)
    print()
    for k, x in v.items():
        print(f"{k}: HAWQ >= uniform at every budget: {x['hawq_ge_uniform_everywhere']}; >= best random: "
              f"{x['hawq_ge_best_random_everywhere']}; strictly better than both somewhere: "
              f"{x['strictly_better_than_both_somewhere']} ({x['budgets']} budgets)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    plots = plot(rows, sens, fp32)
    doc = {"command": command, "settings": settings, "seconds": round(seconds, 1), "models": info, "verdicts": v,
           "rows": rows, "sensitivity": sens, "plots": plots}
    (RESULTS / "pareto.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"\nwrote bench/results/pareto.json{''.join(', ' + p for p in plots)} in {doc['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
