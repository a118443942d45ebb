"""Mixed precision as an integer linear program over per-layer configurations (HAWQ-V3).

Variables x[l, o] in {0, 1}, one per (layer l, option o), ordered by layer then option:
    minimize    sum_{l,o} Omega[l,o] x[l,o]
    subject to  sum_o x[l,o] = 1                          for every layer
                sum size[l,o]    x[l,o] <= S              (model size, bytes; if given)
                sum bops[l,o]    x[l,o] <= B              (bit operations; if given)
                sum latency[l,o] x[l,o] <= L              (measured ms; if given)
                x[a,c] = x[b,c]                            for tied layers a, b and shared config c
                x[a,c] = 0                                 for configs not shared by the whole tie group
                x[l,pin(l)] = 1                            for pinned layers
solved by scipy.optimize.milp (HiGHS). Where some layer has two open options of equal Omega
(a trace floored to 0, a "float" pin), equal-Omega optima are broken by a second solve that
minimizes total size subject to Omega <= Omega* (lexicographic), so the answer is well defined;
without such a layer, equal totals would need a coincidence of float sums and the second
solve is skipped (it is the slow one: 0.37 of 0.50 s at 120 layers x 4, past 30 s at 960).
HiGHS is deterministic, so identical problems give identical assignments.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from qcompiler.errors import QCError
from qcompiler.ir import QMETA, Graph
from qcompiler.pipeline import NUMERICS, Pass, PassContext, PassResult, register

from .quantize import layers
from .sensitivity import DEFAULT_OMEGA, OMEGAS, act_inputs, activation_omega, omega, weight_input

MB = 1e6  # budgets in MB are 10^6 bytes
FLOAT_BITS = 32


@dataclass(frozen=True)
class Option:
    config: str  # "w4a8", "w8a8", "w8a16", "float"
    w_bits: int
    a_bits: int | None
    omega: float
    size_bytes: float
    bops: float
    latency_ms: float | None = None


@dataclass
class LayerChoice:
    name: str
    options: list[Option]


@dataclass
class Assignment:
    choices: dict[str, Option]
    objective: float
    totals: dict[str, float]  # size_bytes, bops, latency_ms
    slack: dict[str, float] = field(default_factory=dict)  # budget - total, per given budget
    solve_seconds: float = 0.0
    status: str = ""


def bops(layer_macs: float, w_bits: int, a_bits: int | None) -> float:
    """Bit operations: MACs * w_bits * a_bits (a_bits None: float activations, 32 bits)."""
    return float(layer_macs) * w_bits * (a_bits or FLOAT_BITS)


def weight_size(n_params: int, w_bits: int) -> float:
    """Bytes: n * bits / 8 (float = 32 bits)."""
    return n_params * w_bits / 8.0


_RES = (("size", "size_bytes"), ("bops", "bops"), ("latency", "latency_ms"))


def _budgets(size, b, lat) -> dict[str, float]:
    return {k: float(v) for k, v in zip(("size", "bops", "latency"), (size, b, lat)) if v is not None}


def _value(o: Option, res: str) -> float:
    v = getattr(o, dict(_RES)[res])
    if v is None:
        raise QCError(f"option '{o.config}' has no {res} (a latency budget needs a latency for every option)")
    return float(v)


def _pin_index(lc: LayerChoice, pin) -> int:
    """A pin is a config name ("float", "w4a8") or an int w_bits, meaning the option with that
    w_bits and 8-bit activations (or the only option with that w_bits)."""
    if isinstance(pin, str) and not pin.isdigit():
        hits = [i for i, o in enumerate(lc.options) if o.config == pin]
    else:
        b = int(pin)
        hits = [i for i, o in enumerate(lc.options) if o.w_bits == b and o.a_bits in (8, None)] or \
               [i for i, o in enumerate(lc.options) if o.w_bits == b]
    if len(hits) != 1:
        raise QCError(f"pin {lc.name}={pin} matches {len(hits)} of its options {[o.config for o in lc.options]}")
    return hits[0]


def _allowed(layers_: list[LayerChoice], ties, pins) -> list[list[bool]]:
    """Which options pins and ties leave open, per layer."""
    names = {lc.name: i for i, lc in enumerate(layers_)}
    for n in list(pins) + [n for grp in ties for n in grp]:
        if n not in names:
            raise QCError(f"pin/tie names unknown layer '{n}' (layers: {', '.join(names)})")
    ok = [[True] * len(lc.options) for lc in layers_]
    for n, p in pins.items():
        lc = layers_[names[n]]
        keep = _pin_index(lc, p)
        ok[names[n]] = [i == keep for i in range(len(lc.options))]
    for grp in ties:
        common = set.intersection(*[{o.config for o, a in zip(layers_[names[n]].options, ok[names[n]]) if a} for n in grp])
        for n in grp:
            ok[names[n]] = [a and o.config in common for o, a in zip(layers_[names[n]].options, ok[names[n]])]
    return ok


def _infeasible(layers_, ok, budgets) -> QCError:
    parts = []
    for res, cap in budgets.items():
        lo = sum(min(_value(o, res) for o, a in zip(lc.options, al) if a) for lc, al in zip(layers_, ok) if any(al))
        if res == "size":
            parts.append(f"smallest possible size is {lo / MB:.4g} MB (budget {cap / MB:.4g} MB)")
        else:
            parts.append(f"smallest possible {res} is {lo:.4g} (budget {cap:.4g})")
    return QCError("no assignment meets the budgets: " + "; ".join(parts)
                   + " (each minimum ignores the other budgets; ties and pins included)")


def _assignment(layers_, idx, budgets, seconds, status) -> Assignment:
    choices = {lc.name: lc.options[i] for lc, i in zip(layers_, idx)}
    totals = {"size_bytes": sum(o.size_bytes for o in choices.values()),
              "bops": sum(o.bops for o in choices.values()),
              "latency_ms": sum(o.latency_ms or 0.0 for o in choices.values())}
    key = {"size": "size_bytes", "bops": "bops", "latency": "latency_ms"}
    return Assignment(choices, sum(o.omega for o in choices.values()), totals,
                      {r: cap - totals[key[r]] for r, cap in budgets.items()}, seconds, status)


def solve_bits(layers_: list[LayerChoice], *, size_budget_bytes=None, bops_budget=None, latency_budget=None,
               ties=(), pins=None, time_limit: float = 30.0) -> Assignment:
    """Minimize total Omega under the given budgets, ties and pins (formulation in the module docstring).

    Rows are scaled by their budget and the objective by max |Omega| for HiGHS' tolerances;
    mip_rel_gap is 1e-9 so the optimum is exact, not within HiGHS' default 0.01 %."""
    t0 = time.perf_counter()
    pins = dict(pins or {})
    budgets = _budgets(size_budget_bytes, bops_budget, latency_budget)
    ok = _allowed(layers_, ties, pins)
    if any(not any(a) for a in ok):
        bad = [lc.name for lc, a in zip(layers_, ok) if not any(a)]
        raise QCError(f"ties leave no common configuration for layers {bad}")
    offs = np.cumsum([0] + [len(lc.options) for lc in layers_])
    nv = int(offs[-1])
    c = np.array([o.omega for lc in layers_ for o in lc.options], dtype=float)
    scale = max(float(np.abs(c).max(initial=0.0)), 1e-300)
    rows, lo, hi = [], [], []
    for li in range(len(layers_)):  # exactly one option per layer
        r = np.zeros(nv)
        r[offs[li]:offs[li + 1]] = 1
        rows.append(r), lo.append(1.0), hi.append(1.0)
    for res, cap in budgets.items():
        r = np.array([_value(o, res) for lc in layers_ for o in lc.options]) / max(abs(cap), 1e-300)
        rows.append(r), lo.append(-np.inf), hi.append(cap / max(abs(cap), 1e-300))
    names = {lc.name: i for i, lc in enumerate(layers_)}
    for grp in ties:
        a = names[grp[0]]
        for n in grp[1:]:
            b = names[n]
            for ia, oa in enumerate(layers_[a].options):
                if not ok[a][ia]:
                    continue
                ib = next(j for j, ob in enumerate(layers_[b].options) if ob.config == oa.config)
                r = np.zeros(nv)
                r[offs[a] + ia], r[offs[b] + ib] = 1, -1
                rows.append(r), lo.append(0.0), hi.append(0.0)
    ub = np.array([1.0 if a else 0.0 for al in ok for a in al])
    A = np.array(rows)
    opts = {"presolve": True, "time_limit": time_limit, "mip_rel_gap": 1e-9}
    cons = [LinearConstraint(A, lo, hi)]
    res = milp(c / scale, integrality=np.ones(nv), bounds=Bounds(np.zeros(nv), ub), constraints=cons, options=opts)
    if res.x is None and res.status == 2:
        raise _infeasible(layers_, ok, budgets)
    if res.x is None:
        raise QCError(f"the ILP found no assignment within {time_limit} s ({res.message})")
    if not _equal_omegas(layers_, ok):
        x = np.round(res.x)
        idx = [int(np.argmax(x[offs[i]:offs[i + 1]])) for i in range(len(layers_))]
        return _assignment(layers_, idx, budgets, time.perf_counter() - t0, res.message)
    # lexicographic tie-break: least total size among assignments with Omega <= Omega*
    sizes = np.array([o.size_bytes for lc in layers_ for o in lc.options])
    best = float(c @ np.round(res.x)) / scale
    cons2 = cons + [LinearConstraint((c / scale)[None, :], -np.inf, best + 1e-9 * max(abs(best), 1.0))]
    res2 = milp(sizes / max(sizes.max(initial=0.0), 1e-300), integrality=np.ones(nv), bounds=Bounds(np.zeros(nv), ub),
                constraints=cons2, options=opts)
    x = np.round(res2.x if res2.x is not None else res.x)
    idx = [int(np.argmax(x[offs[i]:offs[i + 1]])) for i in range(len(layers_))]
    return _assignment(layers_, idx, budgets, time.perf_counter() - t0, res.message)


def _equal_omegas(layers_: list[LayerChoice], ok) -> bool:
    """Whether some layer has two open options of the same Omega (where equal-Omega optima come from)."""
    return any(len({o.omega for o, a in zip(lc.options, al) if a}) < sum(al) for lc, al in zip(layers_, ok))


def _feasible(a: Assignment, budgets: dict[str, float]) -> bool:
    key = {"size": "size_bytes", "bops": "bops", "latency": "latency_ms"}
    return all(a.totals[key[r]] <= cap * (1 + 1e-12) for r, cap in budgets.items())


def greedy_by_sensitivity(layers_: list[LayerChoice], *, size_budget_bytes=None, bops_budget=None,
                          latency_budget=None, pins=None) -> Assignment | None:
    """Baseline: start every layer at its least-Omega option; while a budget is exceeded, take
    the step to a cheaper option with the least Omega increase per unit of budget saved
    (resources summed as fractions of their budgets). None when it gets stuck. No ties."""
    budgets = _budgets(size_budget_bytes, bops_budget, latency_budget)
    ok = _allowed(layers_, (), dict(pins or {}))
    cur = [min((i for i in range(len(lc.options)) if al[i]), key=lambda i: (lc.options[i].omega, i))
           for lc, al in zip(layers_, ok)]
    cost = lambda o: sum(_value(o, r) / cap for r, cap in budgets.items())  # noqa: E731
    while True:
        a = _assignment(layers_, cur, budgets, 0.0, "greedy")
        if _feasible(a, budgets):
            return a
        best = None
        for li, (lc, al) in enumerate(zip(layers_, ok)):
            o = lc.options[cur[li]]
            for j, oj in enumerate(lc.options):
                saved = cost(o) - cost(oj)
                if al[j] and saved > 0:
                    key = ((oj.omega - o.omega) / saved, li, j)
                    best = min(best, key) if best else key
        if best is None:
            return None
        cur[best[1]] = best[2]


def random_assignments(layers_: list[LayerChoice], *, size_budget_bytes=None, bops_budget=None,
                       latency_budget=None, pins=None, k: int = 20, seed: int = 0, tries: int = 20000) -> list[Assignment]:
    """Baseline: up to k uniformly random assignments (pins honoured) that meet the budgets."""
    budgets = _budgets(size_budget_bytes, bops_budget, latency_budget)
    ok = _allowed(layers_, (), dict(pins or {}))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(tries):
        idx = [int(rng.choice([i for i, a in enumerate(al) if a])) for al in ok]
        a = _assignment(layers_, idx, budgets, 0.0, "random")
        if _feasible(a, budgets):
            out.append(a)
            if len(out) == k:
                break
    return out


def layer_macs(node) -> float:
    """MACs per call from recorded shapes (symbolic dims count 1): linear out_numel * in_features;
    conv out_numel * (Cin / groups) * prod(kernel); matmul-like out_numel * inner dim; else 0."""
    def shape(a):
        v = a.meta.get("val") if hasattr(a, "meta") else None
        return [d if isinstance(d, int) else 1 for d in v.shape] if isinstance(v, torch.Tensor) else None
    out, kind = shape(node), node.meta[QMETA]["op"].split(".")[-1]
    if out is None or kind == "embedding":
        return 0.0
    n = math.prod(out)
    if kind == "linear":
        return float(n * shape(node.args[1])[1])
    if kind.startswith("conv"):
        w = shape(node.args[1])
        return float(n * math.prod(w[1:]))
    a = shape(node.args[-2] if kind == "addmm" else node.args[0])
    return float(n * a[-1])


def shape_str(shape) -> str:
    """64x128; a symbolic dim is written '*'."""
    return "x".join(str(d) if isinstance(d, int) else "*" for d in shape)


def latency_key(op: str, weight_shape, config: str, act_shape=None) -> str:
    """A latency table key: "<op>:<weight shape>:<config>", e.g. "aten.linear:384x1536:w8a8";
    with act_shape, the key of a model holding one (op, weight shape) at several input shapes,
    "<op>:<weight shape>:<config>:<input shape, symbolic dims '*'>"."""
    key = f"{op}:{shape_str(weight_shape)}:{config}"
    return key if act_shape is None else f"{key}:{shape_str(act_shape)}"


def layer_act_shape(node) -> tuple | None:
    """The recorded shape of a layer's first activation input (None for weight-only layers)."""
    idx = act_inputs(node)
    v = node.args[idx[0]].meta.get("val") if idx else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def lookup_latency(table: dict, node, weight_shape, config: str) -> float | None:
    """The layer's entry: the input-shape-specific key if the table has one, else the plain key."""
    op, a = node.meta[QMETA]["op"], layer_act_shape(node)
    hit = table.get(latency_key(op, weight_shape, config, a)) if a is not None else None
    return hit if hit is not None else table.get(latency_key(op, weight_shape, config))


def config_name(w_bits: int, a_bits: int | None) -> str:
    return f"w{w_bits}" + (f"a{a_bits}" if a_bits else "")


@register
class AssignBitWidths(Pass):
    """Pick each weighted layer's weight (and activation) bits by the ILP, from
    ctx.config.extra["mixed_precision"]:
    {"bits": [4, 8], "a_bits": [8, 16], "size_mb", "bops", "latency_ms" | "latency_ratio",
     "pins": {name: "float" | bits | config}, "ties": [[names]], "omega": "quadratic" | "trace"}
    and optionally ctx.config.extra["latency_table"]: {"<op>:<weight shape, 64x128>:<config>": ms}.
    Options are w{b}a{a} for every b in bits and a in a_bits (without a_bits: the layer's
    annotated activation width; w{b} for weight-only layers); the objective of an option is
    Omega_w(b) + Omega_act(a), BOPs use both widths, size the weight width. Omega_w is the
    quadratic form dW^T H dW along the actual error dW = Q_b(W) - W ("quadratic", the default:
    the sensitivity pass's "quad", see hutchinson_traces) or HAWQ-V3's Tr(H)/n ||dW||^2
    ("trace"; sensitivity.DEFAULT_OMEGA says why it is not the default). "latency_ratio" R
    sets the budget to R x the all-w8a8 latency of the table. A "float" option exists only
    where pinned, and removes the layer's annotation."""

    name = "mixed_precision"
    numerics = NUMERICS
    requires = ("annotated", "sensitivity")
    provides = ("bits_assigned",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        extra = getattr(ctx.config, "extra", None) or {}
        mp, table = dict(extra.get("mixed_precision", {})), extra.get("latency_table")
        nodes, choices, ref_latency = build_choices(graph, mp, table)
        ratio, size = mp.get("latency_ratio"), mp.get("size_mb")
        lat_budget = mp.get("latency_ms") if ratio is None else float(ratio) * ref_latency
        a = solve_bits(choices, size_budget_bytes=None if size is None else size * MB, bops_budget=mp.get("bops"),
                       latency_budget=lat_budget, ties=mp.get("ties", ()), pins=mp.get("pins", {}))
        changed, stats = apply_choices(nodes, choices, a, count_act=bool(mp.get("a_bits")))
        graph.meta["mixed_precision"] = {"omega": mp.get("omega", DEFAULT_OMEGA), "objective": a.objective,
                                         "totals": a.totals, "slack": a.slack,
                                         "solve_seconds": a.solve_seconds,
                                         **({"latency_budget_ms": lat_budget, "all_w8a8_latency_ms": ref_latency}
                                            if ratio is not None else {})}
        return PassResult(graph, changed, stats)


def build_choices(graph: Graph, mp: dict, table: dict | None = None) -> tuple[list, list[LayerChoice], float]:
    """The ILP's layers and options for menu `mp` (AssignBitWidths' settings): (weighted layer
    nodes, their LayerChoices, the all-w8a8 latency of the table; 0.0 unless mp has latency_ratio)."""
    bits = sorted(set(mp.get("bits", [4, 8])))
    a_menu = sorted(set(mp["a_bits"])) if mp.get("a_bits") else None
    pins = dict(mp.get("pins", {}))
    ratio = mp.get("latency_ratio")
    if ratio is not None and mp.get("latency_ms") is not None:
        raise QCError("give a latency budget either in ms or as a ratio, not both")
    need_latency = ratio is not None or mp.get("latency_ms") is not None
    if need_latency and table is None:
        raise QCError("a latency budget needs a latency table (latency is measured, never assumed)")
    kind = mp.get("omega", DEFAULT_OMEGA)
    if kind not in OMEGAS:
        raise QCError(f"mixed precision omega must be one of {', '.join(OMEGAS)}, got {kind!r}")
    nodes = [n for n in layers(graph) if weight_input(n) is not None]
    choices, ref_latency = [], 0.0
    for n in nodes:
        info, wi = n.meta[QMETA], weight_input(n)
        sens = info.get("sensitivity")
        if sens is None:
            raise QCError("layer has no sensitivity (run the sensitivity pass)", node=n.name)
        w, spec = graph.attr(n.args[wi]), info["inputs"][wi]["spec"]
        acts = act_inputs(n)
        a_default = info["inputs"][acts[0]]["spec"].bits if acts else None
        a_opts = a_menu if acts and a_menu else [a_default]
        macs, nparams = layer_macs(n), w.numel()

        def latency(cfg, n=n, w=w, info=info):
            if table is None:
                return None
            lat = lookup_latency(table, n, w.shape, cfg)
            if lat is None and need_latency:
                raise QCError(f"latency table has no entry '{latency_key(info['op'], w.shape, cfg)}'", node=n.name)
            return lat

        opts = []
        quad = {int(k): v for k, v in sens.get("quad", {}).items()}
        for b in bits:
            if kind == "quadratic":
                if b not in quad:
                    raise QCError(f"layer has no quadratic Omega at {b} bits (run the sensitivity pass with "
                                  f"w_bits {bits})", node=n.name)
                om_w = float(quad[b])
            else:
                om_w = omega(sens["trace"], nparams, w, spec.with_(bits=b))
            for a in a_opts:
                om_a = activation_omega(sens, a) if a is not None else 0.0
                if om_a is None and a_menu:
                    raise QCError(f"layer has no activation sensitivity at {a} bits (run the sensitivity pass "
                                  f"with a_bits {a_menu})", node=n.name)
                cfg = config_name(b, a)
                opts.append(Option(cfg, b, a, om_w + (om_a or 0.0), weight_size(nparams, b), bops(macs, b, a),
                                   latency(cfg)))
        if str(pins.get(n.name)) == "float":
            opts.append(Option("float", FLOAT_BITS, FLOAT_BITS, 0.0, weight_size(nparams, FLOAT_BITS),
                               bops(macs, FLOAT_BITS, FLOAT_BITS), latency("float")))
        if ratio is not None:
            ref_latency += latency(config_name(8, 8 if acts else None))
        choices.append(LayerChoice(n.name, opts))
    return nodes, choices, ref_latency


def apply_choices(nodes, choices: list[LayerChoice], a: Assignment, count_act: bool = False) -> tuple[bool, dict]:
    """Write an assignment into the layers' annotations (bits of weight and activation inputs;
    "float" removes the annotation). Returns (changed, counts per width)."""
    stats: dict[str, int] = {"layers": len(nodes)}
    changed = False
    for n, lc in zip(nodes, choices):
        o, wi = a.choices[n.name], weight_input(n)
        key = "float" if o.config == "float" else f"w{o.w_bits}"
        stats[key] = stats.get(key, 0) + 1
        if o.config == "float":
            del n.meta[QMETA]
            changed = True
            continue
        if count_act and o.a_bits is not None:
            stats[f"a{o.a_bits}"] = stats.get(f"a{o.a_bits}", 0) + 1
        for i, q in n.meta[QMETA]["inputs"].items():
            want = o.w_bits if i == wi else o.a_bits
            if q["role"] == "act" and o.a_bits is None:
                continue
            changed |= q["spec"].bits != want
            q["spec"], q["qparams"] = q["spec"].with_(bits=want), None
        n.meta[QMETA]["mixed_precision"] = {"config": o.config, "omega": o.omega,
                                            "options": {x.config: x.omega for x in lc.options}}
    return changed, stats
