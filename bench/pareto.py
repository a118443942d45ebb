"""Mixed precision vs its baselines across budgets: accuracy against model size (and against
measured ONNX Runtime CPU latency) for the HAWQ ILP assignment, uniform widths, the best of 20
random assignments of equal or smaller cost, and greedy-by-sensitivity at the same budget.

    .venv/bin/python bench/pareto.py [--models fashion_cnn,fashion_vit,minilm] [--w-bits 2,4,8]
    .venv/bin/python bench/pareto.py --ilp-timing      # ILP solve time, synthetic 120..960 layers x 4

Per model, one sensitivity run (Hutchinson traces of weights and of layer inputs, activation
widths 8 and 16) and one calibration per activation width are reused by every assignment.
Each assignment is scored by qcompiler's fake-quant graph run in torch (round-to-nearest
weights, no GPTQ): Fashion-MNIST CNN and ViT top-1 on the test set (the first --eval-images),
MiniLM embedding cosine vs FP32 on --eval-text held-aside sentences. Every difference to HAWQ
comes with its paired standard error over the evaluation samples.
Size sweep: weights --w-bits (default {2, 4, 8}: with 8-bit activations 4-bit weights are near
lossless, 2-bit ones are not) at 8-bit activations, budgets evenly inside (all-lowest,
all-highest). Latency sweep (--latency-models): weights {4, 8} x the activation widths of the
model's committed ONNX Runtime CPU table bench/results/latency/<model>-onnx-cpu.json (read, not
re-measured, unless --measure-latency). Random assignments are screened on the first --screen
evaluation samples and the best --screen-keep re-scored on all of them (0: all scored on all).
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

from qcompiler.passes.sensitivity import DEFAULT_OMEGA, OMEGAS

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
        self.blockwise = name in a.blockwise_models.split(",")
        self.sens = hutchinson_traces(self.ann, self.calib, a_bits=A_BITS, max_iters=a.hutchinson_iters,
                                      max_batches=a.sensitivity_batches, progress=False, seed=0,
                                      blockwise=self.blockwise,
                                      w_bits=a.w_bits_all if a.omega == "quadratic" else None)
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
        n_eval = a.eval_text if text else a.eval_images
        ev = z.eval_inputs(n_eval)
        self.labels = z.eval_labels(n_eval)
        bs = 32 if text else 1000
        self.batches = [tuple(torch.from_numpy(ev[k][i:i + bs]) for k in z.input_names)
                        for i in range(0, len(ev[z.input_names[0]]), bs)]
        self.n_eval = len(ev[z.input_names[0]])
        with torch.no_grad():
            self.ref = np.concatenate([z.module(*b).numpy() for b in self.batches])
        self.memo: dict[tuple, np.ndarray] = {}  # (configs, samples scored) -> per-sample scores
        self.evals = 0  # samples scored so far
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

    def per_sample(self, assignment, choices, limit: int | None = None) -> np.ndarray:
        """Per evaluation sample (the first `limit`, default all): 1/0 top-1 hit (images) or cosine to
        FP32 (MiniLM) of the fake-quant graph for an assignment."""
        from qcompiler.ir import QMETA
        from qcompiler.passes.mixed_precision import apply_choices
        from qcompiler.passes.quantize import InsertFakeQuant, layers

        limit = min(limit or self.n_eval, self.n_eval)
        key = tuple(o.config for _, o in sorted(assignment.choices.items()))
        for (k, n), v in self.memo.items():
            if k == key and n >= limit:
                return v[:limit]
        g = self.copy()
        nodes = [n for n in layers(g) if n.name in self.sens]
        apply_choices(nodes, choices, assignment)
        for n in layers(g):
            for i, q in n.meta[QMETA]["inputs"].items():
                if q["role"] == "act":
                    q["qparams"] = self.qparams[(n.name, i, q["spec"].bits)]
        g = InsertFakeQuant().run(g, self.ctx).graph
        got, done = [], 0
        with torch.no_grad():
            for b in self.batches:
                if done >= limit:
                    break
                got.append(g(*b)[0].numpy())
                done += len(got[-1])
        got = np.concatenate(got)[:limit]
        self.evals += limit
        if self.metric == "top1":
            v = (got.argmax(1) == self.labels[:limit]).astype(np.float64)
        else:
            ref = self.ref[:limit] / np.linalg.norm(self.ref[:limit], axis=1, keepdims=True)
            v = (ref * got / np.linalg.norm(got, axis=1, keepdims=True)).sum(1).astype(np.float64)
        self.memo[(key, limit)] = v
        return v

    def score(self, assignment, choices) -> float:
        """Top-1 (images) or mean cosine vs FP32 (MiniLM) on all evaluation samples."""
        return float(self.per_sample(assignment, choices).mean())


def paired(m: Model, a, b, choices) -> tuple[float, float]:
    """(score(a) - score(b), its paired standard error) over the evaluation samples."""
    d = m.per_sample(a, choices) - m.per_sample(b, choices)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def sweep(m: Model, choices, res: str, budgets, a, uniform_configs) -> list[dict]:
    """Each method at each budget of resource `res` ("size" or "latency")."""
    from qcompiler.errors import QCError
    from qcompiler.passes.mixed_precision import _assignment, greedy_by_sensitivity, random_assignments, solve_bits

    score = lambda x: m.score(x, choices)  # noqa: E731
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
    screen = a.screen if m.metric == "top1" else a.screen_text
    screen = screen if 0 < screen < m.n_eval else 0
    rows = []
    for bi, budget in enumerate(budgets):
        kw = {kw_name: budget}
        t0 = time.perf_counter()
        try:
            hawq = solve_bits(choices, **kw)
        except QCError as e:
            log(f"  {m.name} {res} budget {budget:.4g}: {e}")
            continue
        row = {"model": m.name, "sweep": res, "omega": a.omega, "budget": budget, "hawq": score(hawq),
               "hawq_cost": hawq.totals[total_key], "hawq_omega": hawq.objective,
               "hawq_configs": _counts(hawq), "hawq_assignment": {k: o.config for k, o in hawq.choices.items()}}
        feas = {c: x for c, x in uniform.items() if x.totals[total_key] <= budget * (1 + 1e-12)}
        us = {c: score(x) for c, x in feas.items()}
        best_u = max(us, key=us.get) if us else None
        row.update(uniform_best=us.get(best_u), uniform_config=best_u, uniform_all=us,
                   uniform_costs={c: x.totals[total_key] for c, x in feas.items()})
        if best_u:
            row["hawq_minus_uniform"], row["se_vs_uniform"] = paired(m, hawq, feas[best_u], choices)
        rnd = random_assignments(choices, **kw, k=a.random, seed=1000 + bi, tries=a.random_tries) if a.random else []
        if screen:  # all on the first `screen` samples, the best few on all of them
            pre = [float(m.per_sample(r, choices, screen).mean()) for r in rnd]
            keep = set(np.argsort(pre)[::-1][:a.screen_keep].tolist())
            rs = [score(r) if i in keep else None for i, r in enumerate(rnd)]
            row.update(random_screen=pre, random_screened_on=screen)
        else:
            rs = [score(r) for r in rnd]
        full = [i for i, v in enumerate(rs) if v is not None]
        best_r = max(full, key=lambda i: rs[i]) if full else None
        row.update(random_n=len(rnd), random_best=rs[best_r] if full else None, random_all=rs,
                   random_costs=[r.totals[total_key] for r in rnd], random_omegas=[r.objective for r in rnd])
        if full:
            row["random_best_omega"] = rnd[best_r].objective
            row["hawq_minus_random"], row["se_vs_random"] = paired(m, hawq, rnd[best_r], choices)
        g = greedy_by_sensitivity(choices, **kw)
        row.update(greedy=score(g) if g else None, greedy_cost=g.totals[total_key] if g else None,
                   greedy_omega=g.objective if g else None)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        log(f"  {m.name} {res} <= {budget:.4g}: HAWQ {row['hawq']:.4f}, uniform {row['uniform_best']} ({best_u}), "
            f"random best {row['random_best']} of {len(rnd)}, greedy {row['greedy']}  [{row['seconds']} s]")
    return rows


def _counts(a) -> dict:
    out: dict[str, int] = {}
    for o in a.choices.values():
        out[o.config] = out.get(o.config, 0) + 1
    return out


def verdicts(rows: list[dict], z: float = 2.0) -> dict:
    """Per model and sweep: HAWQ >= best uniform and >= best random at every budget; strictly better
    than both somewhere. The *_noise verdicts count a difference only beyond z paired standard errors."""
    out = {}
    for key in sorted({_key(r) for r in rows}):
        rs = [r for r in rows if _key(r) == key]
        ge_u = all(r["uniform_best"] is None or r["hawq"] >= r["uniform_best"] for r in rs)
        ge_r = all(r["random_best"] is None or r["hawq"] >= r["random_best"] for r in rs)
        strict = any((r["uniform_best"] is None or r["hawq"] > r["uniform_best"]) and
                     (r["random_best"] is None or r["hawq"] > r["random_best"]) for r in rs)
        worse = lambda r, k: r.get(f"hawq_minus_{k}") is not None and r[f"hawq_minus_{k}"] < -z * r[f"se_vs_{k}"]  # noqa: E731
        better = lambda r, k: r.get(f"hawq_minus_{k}") is None or r[f"hawq_minus_{k}"] > z * r[f"se_vs_{k}"]  # noqa: E731
        out["/".join(k for k in key if k != DEFAULT_OMEGA)] = {
            "hawq_ge_uniform_everywhere": ge_u, "hawq_ge_best_random_everywhere": ge_r,
            "strictly_better_than_both_somewhere": strict,
            "never_worse_beyond_noise": not any(worse(r, "uniform") or worse(r, "random") for r in rs),
            "better_than_both_beyond_noise_somewhere": any(better(r, "uniform") and better(r, "random") for r in rs),
            "budgets": len(rs)}
    return out


def _key(r: dict) -> tuple[str, str, str]:
    return r["model"], r["sweep"], r.get("omega", "trace")


def print_table(rows: list[dict]) -> None:
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    d = lambda r, k: "-" if r.get(f"hawq_minus_{k}") is None else \
        f"{r[f'hawq_minus_{k}']:+.4f}±{r[f'se_vs_{k}']:.4f}"  # noqa: E731
    print(f"| {'model':<11} | {'sweep':<7} | {'budget':>10} | {'HAWQ':>6} | {'uniform':>6} | {'(which)':<7} | "
          f"{'rand best':>9} | {'n':>2} | {'greedy':>6} | {'HAWQ-unif ± se':>16} | {'HAWQ-rand ± se':>16} | HAWQ configs |")
    print("|" + "|".join("-" * w for w in (13, 9, 12, 8, 8, 9, 11, 4, 8, 18, 18, 14)) + "|")
    for r in rows:
        b = f"{r['budget'] / 1e6:.4f} MB" if r["sweep"] == "size" else f"{r['budget']:.2f} ms"
        cfgs = " ".join(f"{k}:{v}" for k, v in sorted(r["hawq_configs"].items()))
        sw = r["sweep"] + ("" if r.get("omega", "trace") == DEFAULT_OMEGA else "/" + r.get("omega", "trace"))
        print(f"| {r['model']:<11} | {sw:<7} | {b:>10} | {f(r['hawq'])} | {f(r['uniform_best'])} | "
              f"{r['uniform_config'] or '-':<7} | {f(r['random_best']):>9} | {r['random_n']:>2} | {f(r['greedy'])} | "
              f"{d(r, 'uniform'):>16} | {d(r, 'random'):>16} | {cfgs} |")


def plot(rows: list[dict], sens: dict, fp32: dict) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install 'qcompiler[report]'): no plots, the table and JSON are written")
        return []
    other = [r for r in rows if r.get("omega", "trace") != DEFAULT_OMEGA]  # drawn as a line beside the default's
    rows = [r for r in rows if r.get("omega", "trace") == DEFAULT_OMEGA]
    keys = sorted({(r["model"], r["sweep"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, (model, res) in zip(axes[0], keys):
        rs = sorted((r for r in rows if (r["model"], r["sweep"]) == (model, res)), key=lambda r: r["budget"])
        x = lambda r: r["budget"] / 1e6 if res == "size" else r["budget"]  # noqa: E731
        sx = (lambda c: c / 1e6) if res == "size" else (lambda c: c)  # noqa: E731
        for r in rs:
            pts = [(sx(c), v) for c, v in zip(r["random_costs"], r["random_all"]) if v is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, color="0.6", zorder=1)
            if r.get("random_screen"):  # the screened-out ones, at their screening score
                pts = [(sx(c), v) for c, v, f in zip(r["random_costs"], r["random_screen"], r["random_all"]) if f is None]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=5, color="0.85", marker="x", zorder=1)
        ax.plot([x(r) for r in rs], [r["hawq"] for r in rs], "o-", color="C0", label=f"ILP, {DEFAULT_OMEGA} Ω", zorder=3)
        qs = sorted((r for r in other if (r["model"], r["sweep"]) == (model, res)), key=lambda r: r["budget"])
        if qs:
            ax.plot([x(r) for r in qs], [r["hawq"] for r in qs], "D-", color="C4", ms=4,
                    label="ILP, HAWQ-V3's trace Ω" if qs[0].get("omega", "trace") == "trace" else "ILP, other Ω", zorder=3)
        ax.plot([x(r) for r in rs], [r["random_best"] for r in rs], "s--", color="C2", label="best of random", zorder=2)
        ax.plot([x(r) for r in rs], [r["greedy"] for r in rs], "^:", color="C1", label="greedy", zorder=2)
        ax.plot([x(r) for r in rs], [r["uniform_best"] for r in rs], "x-.", color="C3", label="best uniform", zorder=2)
        ax.axhline(fp32[model], color="k", lw=0.6, ls=":", label="FP32")
        lo = min([r[k] for r in rs for k in ("hawq", "random_best", "greedy", "uniform_best") if r[k] is not None]
                 + [r["hawq"] for r in qs])
        pad = 0.15 * (fp32[model] - lo) + 0.002
        ax.set_ylim(lo - pad, fp32[model] + pad)  # random points far below the methods are clipped
        ax.set_xlabel("weight size budget (MB)" if res == "size" else "ORT CPU latency budget (ms)")
        ax.set_ylabel("top-1" if model != "minilm" else "cosine vs FP32")
        ax.set_title(f"{model}: accuracy vs {res}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
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
    p.add_argument("--w-bits", default="2,4,8", help="weight widths of the CNN/ViT size sweep (8-bit activations)")
    p.add_argument("--w-bits-text", default="4,8", help="weight widths of MiniLM's size sweep (its W4A8 is lossy)")
    p.add_argument("--eval-images", type=int, default=10000, help="Fashion-MNIST test images scored (the first N)")
    p.add_argument("--eval-text", type=int, default=128, help="MiniLM evaluation sentences scored")
    p.add_argument("--size-budgets", type=int, default=4, help="budgets evenly inside (all-lowest, all-highest) size")
    p.add_argument("--latency-budgets", type=int, default=2, help="latency budgets (0: no latency sweep)")
    p.add_argument("--latency-models", default="fashion_cnn,fashion_vit",
                   help="models with a latency sweep (MiniLM's table has a8 only, and W4 runs ORT's int8 kernel)")
    p.add_argument("--measure-latency", action="store_true", help="re-measure the latency tables instead of reading them")
    p.add_argument("--random", type=int, default=20, help="random assignments per budget")
    p.add_argument("--random-tries", type=int, default=50000, help="rejection-sampling draws for the random ones")
    p.add_argument("--screen", type=int, default=1000, help="score random assignments on this many samples first")
    p.add_argument("--screen-text", type=int, default=32, help="--screen for MiniLM (sentences)")
    p.add_argument("--screen-keep", type=int, default=3, help="re-score the best this many on all samples")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--calib-text", type=int, default=32)
    p.add_argument("--sensitivity-batches", type=int, default=2)
    p.add_argument("--hutchinson-iters", type=int, default=30)
    p.add_argument("--omega", choices=OMEGAS, default=DEFAULT_OMEGA,
                   help="the quadratic form dW^T H dW along the quantization error (the library's default) or "
                        "HAWQ-V3's Tr(H)/n ||dW||^2")
    p.add_argument("--blockwise-models", default="fashion_cnn,fashion_vit",
                   help="models whose weight traces take one HVP per layer (no cross-layer noise; layers x the cost)")
    p.add_argument("--latency-repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--ilp-timing", action="store_true", help="only time the ILP on synthetic 120..960-layer problems")
    p.add_argument("--part", help="write only this JSON (one model's rows, for running models in parallel processes)")
    p.add_argument("--merge", nargs="+", metavar="PART", help="combine --part files into the table, JSON and plots")
    a = p.parse_args()
    a.w_bits_all = sorted({4, 8} | {int(b) for b in f"{a.w_bits},{a.w_bits_text}".split(",")})
    if a.ilp_timing:
        return ilp_timing()
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        sens, info = {}, {}  # per model and layer, later parts add to (and override) earlier ones
        for d in parts:
            for k, v in d["sensitivity"].items():
                for layer, x in v.items():
                    sens.setdefault(k, {}).setdefault(layer, {}).update(x)
            for k, v in d["models"].items():
                info.setdefault(k, {}).update(v)
        return report([r for d in parts for r in d["rows"]], sens, info, [d["settings"] for d in parts],
                      " && ".join(d["command"] for d in parts) + " && " + shlex.join(["python", "bench/pareto.py", *sys.argv[1:]]),
                      sum(d["seconds"] for d in parts))
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qcompiler.latency import load_table, profile_layers, save_table
    from qcompiler.passes.mixed_precision import build_choices
    from qcompiler.passes.sensitivity import weight_input

    t_start = time.perf_counter()
    rows, sens, fp32, info = [], {}, {}, {}
    for name in a.models.split(","):
        m = Model(name, a)
        sens[name] = m.sens
        w_bits = sorted(int(b) for b in (a.w_bits_text if m.metric == "cosine" else a.w_bits).split(","))
        fp32[name] = 1.0 if m.metric == "cosine" else float((m.ref.argmax(1) == m.labels).mean())
        _, size_choices, _ = build_choices(m.ann, {"bits": w_bits, "omega": a.omega})
        lo = sum(min(o.size_bytes for o in lc.options) for lc in size_choices)
        hi = sum(max(o.size_bytes for o in lc.options) for lc in size_choices)
        fr = np.linspace(0, 1, a.size_budgets + 2)[1:-1]
        rows += sweep(m, size_choices, "size", [lo + f * (hi - lo) for f in fr], a, [f"w{b}a8" for b in w_bits])
        info[name] = {"weighted_layers": len(size_choices), "size_w_bits": w_bits, "size_min_bytes": lo,
                      "size_max_bytes": hi, "fp32": fp32[name], "sensitivity_seconds": round(m.sensitivity_seconds, 1),
                      "eval_samples": m.n_eval, "blockwise_traces": m.blockwise, "max_trace_rel_std": max(v["rel_std"] for v in m.sens.values()),
                      "median_trace_rel_std": float(np.median([v["rel_std"] for v in m.sens.values()]))}
        if a.latency_budgets > 0 and name in a.latency_models.split(","):
            t0 = time.perf_counter()
            path = RESULTS / "latency" / f"{name}-onnx-cpu.json"
            configs = ("w4a8", "w8a8", "w4a16", "w8a16")
            if a.measure_latency:
                table = profile_layers(m.ann, "onnx-cpu", configs, calib=m.calib, batch=m.calib.batch_size,
                                       repeats=a.latency_repeats, progress=False, timer_options={"threads": 1})
                path.parent.mkdir(parents=True, exist_ok=True)
                save_table(path, table, model=name, command=shlex.join(
                    ["python", "bench/pareto.py", *sys.argv[1:]]) + "  (table built inside: profile_layers(annotated "
                    f"graph, 'onnx-cpu', {list(configs)}, batch {m.calib.batch_size}, threads=1))")
            table = load_table(path)
            a_menu = sorted({int(k.split(":")[2].split("a")[1]) for k in table if "a" in k.split(":")[2]})
            configs = tuple(f"w{w}a{x}" for x in a_menu for w in (4, 8))
            _, lat_choices, _ = build_choices(m.ann, {"bits": [4, 8], "a_bits": a_menu, "omega": a.omega}, table)
            lmin = sum(min(o.latency_ms for o in lc.options) for lc in lat_choices)
            lmax = sum(max(o.latency_ms for o in lc.options) for lc in lat_choices)
            fr = np.linspace(0, 1, a.latency_budgets + 2)[1:-1]
            rows += sweep(m, lat_choices, "latency", [lmin + f * (lmax - lmin) for f in fr], a, configs)
            info[name].update(latency_table=os.path.relpath(path, ROOT), latency_min_ms=lmin, latency_max_ms=lmax,
                              latency_seconds=round(time.perf_counter() - t0, 1))
        shapes = {n.name: "x".join(map(str, m.ann.attr(n.args[weight_input(n)]).shape)) for n in _weighted(m.ann)}
        rank = sorted(m.sens, key=lambda n: -sum(x["omega"][8] for x in m.sens[n].get("act", {}).values()))
        info[name]["act_ranking_omega8"] = [
            {"layer": n, "weight_shape": shapes.get(n), "omega8": sum(x["omega"][8] for x in m.sens[n].get("act", {}).values()),
             "trace_per_elem": sum(x["trace"] / x["numel"] for x in m.sens[n].get("act", {}).values())}
            for n in rank if m.sens[n].get("act")]
        info[name]["scored_samples"] = m.evals
        log(f"{name}: done, {time.perf_counter() - t_start:.0f} s so far")
    command = shlex.join(["python", "bench/pareto.py", *sys.argv[1:]])
    if a.part:
        doc = {"command": command, "settings": vars(a), "seconds": round(time.perf_counter() - t_start, 1),
               "models": info, "rows": rows, "sensitivity": sens}
        Path(a.part).write_text(json.dumps(doc, indent=1, default=str) + "\n")
        return 0
    return report(rows, sens, info, vars(a), command, time.perf_counter() - t_start)


def _weighted(graph):
    from qcompiler.passes.quantize import layers
    from qcompiler.passes.sensitivity import weight_input
    return [n for n in layers(graph) if weight_input(n) is not None]


def ilp_timing(sizes=(120, 240, 480, 960), repeats: int = 5) -> int:
    """Synthetic problems (the generator of tests/passes/test_mixed_precision.py: 4 configs w2a8, w4a8,
    w8a8, w8a16) under size + BOPs + latency budgets: median solve_bits wall time of `repeats`,
    budgets met, identical assignments on every repeat."""
    from qcompiler.passes.mixed_precision import LayerChoice, Option, solve_bits
    torch.set_num_threads(2)
    configs = (("w2a8", 2, 8), ("w4a8", 4, 8), ("w8a8", 8, 8), ("w8a16", 8, 16))
    out = []
    print(f"| {'layers':>6} | {'options':>7} | {'median s':>8} | {'max s':>6} | budgets met | deterministic |")
    print("|--------|---------|----------|--------|-------------|---------------|")
    for n_layers in sizes:
        rng = np.random.default_rng(0)
        lcs = []
        for i in range(n_layers):
            n, macs, tr = int(rng.integers(1_000, 100_000)), float(rng.integers(10_000, 10_000_000)), rng.lognormal()
            lcs.append(LayerChoice(f"l{i}", [Option(c, w, x, tr * 4.0 ** (-w) * (1 + 1 / x), n * w / 8, macs * w * x,
                                                    float(rng.uniform(0.5, 1.0)) * w * x / 64) for c, w, x in configs]))
        tot = lambda k: [sum(getattr(o, k) for o in col) for col in zip(*(lc.options for lc in lcs))]  # noqa: E731
        budgets = dict(size_budget_bytes=0.5 * (min(tot("size_bytes")) + max(tot("size_bytes"))),
                       bops_budget=0.4 * max(tot("bops")), latency_budget=0.5 * max(tot("latency_ms")))
        times, picks, ok = [], set(), True
        for _ in range(repeats):
            t0 = time.perf_counter()
            x = solve_bits(lcs, **budgets)
            times.append(time.perf_counter() - t0)
            picks.add(tuple(o.config for o in x.choices.values()))
            ok &= all(v >= 0 for v in x.slack.values())
        r = {"layers": n_layers, "options": 4 * n_layers, "median_s": float(np.median(times)), "max_s": max(times),
             "budgets_met": bool(ok), "deterministic": len(picks) == 1, "status": x.status}
        out.append(r)
        print(f"| {n_layers:>6} | {r['options']:>7} | {r['median_s']:>8.3f} | {r['max_s']:>6.3f} | {str(ok):>11} | "
              f"{str(r['deterministic']):>13} |")
    doc = {"command": shlex.join(["python", "bench/pareto.py", *sys.argv[1:]]), "cpu_threads": os.cpu_count(),
           "loadavg_1min": os.getloadavg()[0], "rows": out}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pareto.ilp.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote bench/results/pareto.ilp.json (1-min load average {doc['loadavg_1min']:.2f})")
    return 0


def report(rows, sens, info, settings, command, seconds) -> int:
    """Print the table and verdicts; write pareto.json and the plots."""
    fp32 = {k: v["fp32"] for k, v in info.items()}
    print_table(rows)
    v = verdicts(rows)
    print()
    for k, x in v.items():
        print(f"{k}: HAWQ >= uniform at every budget: {x['hawq_ge_uniform_everywhere']}; >= best random: "
              f"{x['hawq_ge_best_random_everywhere']}; strictly better than both somewhere: "
              f"{x['strictly_better_than_both_somewhere']}; never worse beyond 2 se: {x['never_worse_beyond_noise']}; "
              f"better than both beyond 2 se somewhere: {x['better_than_both_beyond_noise_somewhere']} "
              f"({x['budgets']} budgets)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    plots = plot(rows, sens, fp32)
    doc = {"command": command, "settings": settings, "seconds": round(seconds, 1), "models": info, "verdicts": v,
           "rows": rows, "sensitivity": sens, "plots": plots}
    (RESULTS / "pareto.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"\nwrote bench/results/pareto.json{''.join(', ' + p for p in plots)} in {doc['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
