import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompiler
from qcompiler.calib import CalibData
from qcompiler.config import Config
from qcompiler.errors import QCError
from qcompiler.ir import QMETA
from qcompiler.passes.mixed_precision import (LayerChoice, Option, greedy_by_sensitivity, random_assignments,
                                              solve_bits)
from qcompiler.passes.quantize import layers
from qcompiler.pipeline import PassContext, PassManager

CONFIGS = (("w2a8", 2, 8), ("w4a8", 4, 8), ("w8a8", 8, 8), ("w8a16", 8, 16))


def _problem(n_layers, configs=CONFIGS, seed=0, latency=True):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_layers):
        n, macs, tr = int(rng.integers(1_000, 100_000)), float(rng.integers(10_000, 10_000_000)), rng.lognormal()
        opts = [Option(c, w, a, tr * 4.0 ** (-w) * (1 + 1 / a), n * w / 8, macs * w * a,
                       float(rng.uniform(0.5, 1.0)) * w * a / 64 if latency else None) for c, w, a in configs]
        out.append(LayerChoice(f"l{i}", opts))
    return out


def _totals(lcs, key):
    return [sum(getattr(o, key) for o in col) for col in zip(*(lc.options for lc in lcs))]


def test_120_layers_within_budgets_and_deterministic():
    """120 layers x 4 configs, size + BOPs + latency budgets: every budget met, slack >= 0, and a second
    solve gives the same assignment (the solve time is measured by bench/pareto.py --ilp-timing)."""
    lcs = _problem(120)
    lo_s, *_, hi_s = sorted(_totals(lcs, "size_bytes"))
    budgets = dict(size_budget_bytes=0.5 * (lo_s + hi_s), bops_budget=0.4 * max(_totals(lcs, "bops")),
                   latency_budget=0.5 * max(_totals(lcs, "latency_ms")))
    a = solve_bits(lcs, **budgets)
    assert a.totals["size_bytes"] <= budgets["size_budget_bytes"] and a.totals["bops"] <= budgets["bops_budget"]
    assert a.totals["latency_ms"] <= budgets["latency_budget"] and all(v >= 0 for v in a.slack.values())
    b = solve_bits(lcs, **budgets)
    assert {k: o.config for k, o in a.choices.items()} == {k: o.config for k, o in b.choices.items()}
    assert a.objective == b.objective


def test_matches_brute_force_optimum():
    """6 layers x 3 configs: the ILP objective equals the best of all 3^6 assignments within budget."""
    lcs = _problem(6, CONFIGS[:3], seed=3)
    size, bops_ = 0.55 * max(_totals(lcs, "size_bytes")), 0.6 * max(_totals(lcs, "bops"))
    best = min(sum(o.omega for o in combo) for combo in itertools.product(*(lc.options for lc in lcs))
               if sum(o.size_bytes for o in combo) <= size and sum(o.bops for o in combo) <= bops_)
    a = solve_bits(lcs, size_budget_bytes=size, bops_budget=bops_)
    assert a.objective == pytest.approx(best, rel=1e-9)


def test_ties_and_pins_are_honoured():
    """Tied layers share a config; pinned layers get theirs (int pin -> w{b}a8, "float" keeps float)."""
    lcs = _problem(8, seed=5)
    lcs[7] = LayerChoice("l7", lcs[7].options + [Option("float", 32, 32, 0.0, 4 * lcs[7].options[0].size_bytes / 0.25,
                                                        0.0, 1.0)])
    size = 0.4 * max(_totals(lcs[:7], "size_bytes")) + lcs[7].options[-1].size_bytes
    a = solve_bits(lcs, size_budget_bytes=size, ties=[["l0", "l3", "l5"]], pins={"l1": 8, "l2": "w2a8", "l7": "float"})
    assert a.choices["l0"].config == a.choices["l3"].config == a.choices["l5"].config
    assert a.choices["l1"].config == "w8a8" and a.choices["l2"].config == "w2a8" and a.choices["l7"].config == "float"
    assert a.totals["size_bytes"] <= size
    with pytest.raises(QCError, match="unknown layer 'nope'"):
        solve_bits(lcs, pins={"nope": 8})


def test_infeasible_budget_names_minimum_size():
    """A size budget below the all-2-bit size fails with the smallest possible size in MB."""
    lcs = _problem(5, seed=1)
    smallest = min(_totals(lcs, "size_bytes"))
    with pytest.raises(QCError, match=f"smallest possible size is {smallest / 1e6:.4g} MB"):
        solve_bits(lcs, size_budget_bytes=0.9 * smallest)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 12), frac=st.floats(0.05, 0.95))
def test_ilp_beats_greedy_and_random(seed, n, frac):
    """Under one size + BOPs budget, the ILP objective is <= greedy's and every feasible random assignment's."""
    lcs = _problem(n, seed=seed, latency=False)
    lo, hi = min(_totals(lcs, "size_bytes")), max(_totals(lcs, "size_bytes"))
    kw = dict(size_budget_bytes=lo + frac * (hi - lo), bops_budget=0.8 * max(_totals(lcs, "bops")))
    try:
        a = solve_bits(lcs, **kw)
    except QCError:
        assert greedy_by_sensitivity(lcs, **kw) is None and not random_assignments(lcs, **kw, k=5, tries=200)
        return
    tol = 1e-9 * max(a.objective, 1e-300)
    g = greedy_by_sensitivity(lcs, **kw)
    assert g is None or a.objective <= g.objective + tol
    assert all(a.objective <= r.objective + tol for r in random_assignments(lcs, **kw, k=20, seed=seed, tries=400))


def test_pass_lowers_least_sensitive_layers_first():
    """On an MLP with equal-size layers and room for exactly two 4-bit layers, the two with the smallest
    Omega(4) - Omega(8) get 4 bits; the fake-quant pipeline still runs afterwards."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()) for _ in range(4)]).eval()
    with torch.no_grad():
        m[1][0].weight /= 20.0  # rescale pairs: same function, different sensitivities
        m[1][0].bias /= 20.0
        m[2][0].weight *= 20.0
    x = torch.randn(32, 16)
    g = qcompiler.trace(m, (x[:2],))
    n_w = 16 * 16
    size_mb = (2 * n_w + 2 * n_w / 2) / 1e6  # two layers at 8 bits, two at 4
    cfg = Config(extra={"mixed_precision": {"bits": [4, 8], "size_mb": size_mb},
                        "sensitivity": {"max_iters": 20, "progress": False}})
    ctx = PassContext(config=cfg, calib=CalibData({"input": x.numpy()}, batch_size=16))
    pm = PassManager(["annotate", "sensitivity", "mixed_precision", "calibrate", "fake_quant"], verify_each=True)
    g = pm.run(g, ctx)
    assert pm.record[2]["stats"] == {"layers": 4, "w4": 2, "w8": 2} and pm.record[2]["changed"]
    mp = {n.name: n.meta[QMETA] for n in layers(g)}
    delta = {k: v["mixed_precision"]["options"]["w4a8"] - v["mixed_precision"]["options"]["w8a8"] for k, v in mp.items()}
    four = {k for k, v in mp.items() if v["inputs"][1]["spec"].bits == 4}
    assert four == set(sorted(delta, key=delta.get)[:2])
    assert all(v["mixed_precision"]["config"] == f"w{v['inputs'][1]['spec'].bits}a8" for v in mp.values())
    assert torch.isfinite(g(x)[0]).all()


def test_pass_keep_float_pin_removes_annotation():
    """A keep-float pin drops the layer's quantization annotation; the others stay annotated."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(16, 8)
    g = qcompiler.trace(m, (x[:2],))
    cfg = Config(extra={"mixed_precision": {"pins": {"linear": "float"}}, "sensitivity": {"progress": False}})
    g = PassManager(["annotate", "sensitivity", "mixed_precision"]).run(g, PassContext(cfg, CalibData({"input": x.numpy()})))
    assert [n.name for n in layers(g)] == ["linear_1"]


@pytest.mark.parametrize("kind", ["default", "trace"])
def test_activation_menu_gives_four_configs_and_sets_act_bits(kind):
    """{"bits": [4, 8], "a_bits": [8, 16]}: options w4a8, w4a16, w8a8, w8a16 with Omega = Omega_w + Omega_act
    (Omega_w the quadratic form by default, HAWQ-V3's trace form with "omega": "trace"); under a BOPs
    budget of the all-w8a8 BOPs the ILP stays within it, and the fake-quant graph quantizes each layer's
    input at the chosen width."""
    from qcompiler.ops import fake_quant
    from qcompiler.passes.sensitivity import activation_omega, omega
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                            torch.nn.Linear(32, 8)).eval()
    x = torch.randn(32, 16)
    g = qcompiler.trace(m, (x[:2],))
    macs = [16 * 32, 32 * 32, 32 * 8]
    w8a8_bops = sum(macs) * 8 * 8  # layer_macs counts the symbolic batch dim as 1
    mp = {"bits": [4, 8], "a_bits": [8, 16], "bops": w8a8_bops, **({"omega": kind} if kind != "default" else {})}
    cfg = Config(extra={"mixed_precision": mp, "sensitivity": {"max_iters": 20, "progress": False}})
    ctx = PassContext(config=cfg, calib=CalibData({"input": x.numpy()}, batch_size=16))
    pm = PassManager(["annotate", "sensitivity", "mixed_precision", "calibrate", "fake_quant"], verify_each=True)
    g = pm.run(g, ctx)
    assert pm.record[1]["stats"]["activations"] == 3
    mpm = g.meta["mixed_precision"]
    assert mpm["totals"]["bops"] <= w8a8_bops and mpm["slack"]["bops"] >= 0
    for n in layers(g):
        info = n.meta[QMETA]
        opts, sens = info["mixed_precision"]["options"], info["sensitivity"]
        assert set(opts) == {"w4a8", "w4a16", "w8a8", "w8a16"}
        w = g.attr(n.args[1].args[0])
        wspec = info["inputs"][1]["spec"]
        for c, v in opts.items():
            wb, ab = (int(t) for t in c[1:].split("a"))
            om_w = omega(sens["trace"], w.numel(), w, wspec.with_(bits=wb)) if kind == "trace" else sens["quad"][wb]
            want = om_w + activation_omega(sens, ab)
            assert v == pytest.approx(want, rel=1e-9)
        a_bits = info["inputs"][0]["spec"].bits
        assert info["mixed_precision"]["config"] == f"w{wspec.bits}a{a_bits}"
        fq = n.args[0]
        assert fq.target is fake_quant and fq.args[4] == 2 ** (a_bits - 1) - 1
    assert sum(v for k, v in pm.record[2]["stats"].items() if k.startswith("a")) == 3
    assert torch.isfinite(g(x)[0]).all()


def test_activation_menu_without_activation_sensitivity_is_an_error():
    """An a_bits menu whose widths the sensitivity pass did not estimate fails naming the layer."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(16, 8)
    g = qcompiler.trace(m, (x[:2],))
    cfg = Config(extra={"mixed_precision": {"bits": [4, 8], "a_bits": [8, 16]},
                        "sensitivity": {"progress": False, "a_bits": [8]}})
    with pytest.raises(QCError, match="no activation sensitivity at 16 bits"):
        PassManager(["annotate", "sensitivity", "mixed_precision"]).run(g, PassContext(cfg, CalibData({"input": x.numpy()})))


def test_equal_omega_options_break_ties_to_least_size():
    """A layer whose options all have Omega 0 (a trace floored to 0) takes its smallest option even
    under a budget that fits its largest; layers of distinct Omegas keep their least-Omega option."""
    lcs = _problem(4, CONFIGS[:3], seed=2, latency=False)
    lcs[1] = LayerChoice("l1", [Option(o.config, o.w_bits, o.a_bits, 0.0, o.size_bytes, o.bops)
                                for o in reversed(lcs[1].options)])
    a = solve_bits(lcs, size_budget_bytes=max(_totals(lcs, "size_bytes")))
    assert a.choices["l1"].config == "w2a8"
    assert all(a.choices[f"l{i}"].config == "w8a8" for i in (0, 2, 3))


def test_quadratic_omega_menu_uses_the_quadratic_forms():
    """The default omega ("quadratic") makes the sensitivity pass estimate dW^T H dW per weight width and
    the ILP's weight Omegas equal them; without those estimates the menu is an error naming the layer,
    and an unknown omega is an error."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(16, 8)
    cfg = Config(extra={"mixed_precision": {"bits": [2, 4, 8]}, "sensitivity": {"progress": False, "max_iters": 4}})
    g = PassManager(["annotate", "sensitivity", "mixed_precision"]).run(qcompiler.trace(m, (x[:2],)),
                                                                        PassContext(cfg, CalibData({"input": x.numpy()})))
    for n in layers(g):
        quad, opts = n.meta[QMETA]["sensitivity"]["quad"], n.meta[QMETA]["mixed_precision"]["options"]
        assert opts == {f"w{b}a8": pytest.approx(quad[b], rel=1e-12) for b in (2, 4, 8)}
    cfg = Config(extra={"mixed_precision": {"bits": [4, 8], "omega": "quadratic"},
                        "sensitivity": {"progress": False, "max_iters": 4, "w_bits": [8]}})
    with pytest.raises(QCError, match="no quadratic Omega at 4 bits"):
        PassManager(["annotate", "sensitivity", "mixed_precision"]).run(qcompiler.trace(m, (x[:2],)),
                                                                        PassContext(cfg, CalibData({"input": x.numpy()})))
    cfg = Config(extra={"mixed_precision": {"bits": [4, 8], "omega": "hessian"}, "sensitivity": {"progress": False}})
    with pytest.raises(QCError, match="omega must be one of quadratic, trace, got 'hessian'"):
        PassManager(["annotate", "sensitivity", "mixed_precision"]).run(qcompiler.trace(m, (x[:2],)),
                                                                        PassContext(cfg, CalibData({"input": x.numpy()})))
