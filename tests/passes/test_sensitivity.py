import torch

import qcompiler
from qcompiler.calib import CalibData
from qcompiler.ir import QMETA
from qcompiler.passes.quantize import layers
from qcompiler.passes.sensitivity import EstimateSensitivity, hutchinson_traces, omega, perturbation
from qcompiler.pipeline import PassContext, PassManager
from qcompiler.qspec import default_weight_spec


def _annotated(model, x):
    return PassManager(["annotate"]).run(qcompiler.trace(model, (x[:2],)))


def _linear_problem(seed=0, n=32, fin=6, fout=4):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(fin, fout)
    x, y = torch.randn(n, fin), torch.randn(n, fout)
    return lin, x, y


def test_trace_matches_exact_quadratic():
    """MSE of one linear layer is quadratic in W: the estimate is within 5% of Tr(H) = 2/N ||X||_F^2."""
    lin, x, y = _linear_problem()
    g = _annotated(lin, x)
    calib = CalibData({"input": x.numpy()}, batch_size=8)
    res = hutchinson_traces(g, calib, loss="mse", labels=y.numpy(), max_iters=400, tol=5e-3, progress=False)
    (r,) = res.values()
    exact = 2.0 / len(x) * float((x ** 2).sum())
    w = lin.weight.detach().clone()
    h = torch.autograd.functional.hessian(lambda w_: torch.nn.functional.mse_loss(x @ w_.T + lin.bias, y), w)
    assert abs(float(h.reshape(w.numel(), -1).trace()) - exact) < 1e-4 * exact
    assert abs(r["trace"] - exact) < 0.05 * exact, (r, exact)
    assert r["n_params"] == w.numel() and r["rel_std"] < 0.05


def test_seeded_reproducibility():
    """Same seed -> identical traces; another seed -> different numbers within 10%."""
    lin, x, y = _linear_problem(1)
    g = _annotated(lin, x)
    calib = CalibData({"input": x.numpy()}, batch_size=16)
    kw = dict(loss="mse", labels=y.numpy(), max_iters=100, tol=1e-2, progress=False)
    a, b = hutchinson_traces(g, calib, seed=3, **kw), hutchinson_traces(g, calib, seed=3, **kw)
    c = hutchinson_traces(g, calib, seed=4, **kw)
    assert a == b
    (ta,), (tc,) = [r["trace"] for r in a.values()], [r["trace"] for r in c.values()]
    assert ta != tc and abs(ta - tc) < 0.1 * ta


def _mlp(hot: int | None = None):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                            torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    if hot is not None:  # relu(W x + b) / 30 fed to 30 W': same function, d out / d W is 30x larger
        with torch.no_grad():
            m[hot].weight /= 30.0
            m[hot].bias /= 30.0
            m[hot + 2].weight *= 30.0
    return m.eval()


def test_pass_keeps_outputs_and_stores_meta():
    """The pass is exact (graph outputs unchanged, weights restored) and records a trace per layer."""
    m = _mlp()
    x = torch.randn(24, 8)
    g = _annotated(m, x)
    before = g(x)[0].clone()
    ctx = PassContext(calib=CalibData({"input": x.numpy()}, batch_size=8))
    res = EstimateSensitivity()(g, ctx)
    assert not res.changed and res.stats["layers"] == 4
    torch.testing.assert_close(g(x)[0], before, rtol=1e-5, atol=1e-5)
    assert not any(b.requires_grad for b in g.gm.buffers())
    for n in layers(g):
        s = n.meta[QMETA]["sensitivity"]
        assert s["trace"] > 0 and s["n_params"] == g.attr(n.args[1]).numel() and s["loss"] == "kl"


def test_scaled_layer_ranks_first():
    """Rescaling W_k by 1/30 and W_k+1 by 30 keeps the function but multiplies Tr(H_k) by 900: it ranks first."""
    x = torch.randn(32, 8)
    g = _annotated(_mlp(hot=2), x)
    res = hutchinson_traces(g, CalibData({"input": x.numpy()}, batch_size=16), max_iters=30, progress=False)
    per_param = {k: v["trace"] / v["n_params"] for k, v in res.items()}
    assert max(per_param, key=per_param.get) == "linear_1", per_param


def test_omega_grows_as_bits_shrink():
    """||Q_b(W) - W||^2 and Omega grow from 8 to 6 to 4 bits; Omega scales with Tr(H)/n."""
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    p = [perturbation(w, default_weight_spec(b)) for b in (8, 6, 4)]
    assert 0 < p[0] < p[1] < p[2]
    o8, o4 = omega(10.0, w.numel(), w, default_weight_spec(8)), omega(10.0, w.numel(), w, default_weight_spec(4))
    assert o4 > o8 > 0 and abs(o8 - 10.0 / w.numel() * p[0]) < 1e-9 * o8


def test_activation_trace_matches_exact_quadratic():
    """Linear -> Linear under MSE is quadratic in each layer's input: Tr(H_a) per batch is
    2 ||W2 W1||_F^2 / fout (first input) and 2 ||W2||_F^2 / fout (hidden); estimates within 5%."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)).eval()
    x, y = torch.randn(32, 6), torch.randn(32, 4)
    g = _annotated(m, x)
    res = hutchinson_traces(g, CalibData({"input": x.numpy()}, batch_size=8), loss="mse", labels=y.numpy(),
                            max_iters=400, tol=5e-3, progress=False, a_bits=[4, 8])
    w1, w2 = m[0].weight.detach(), m[1].weight.detach()
    exact = {"linear": 2 * float(((w2 @ w1) ** 2).sum()) / 4, "linear_1": 2 * float((w2 ** 2).sum()) / 4}
    h = torch.autograd.functional.hessian(lambda a: torch.nn.functional.mse_loss(m[1](a), y[:8]), m[0](x[:8]).detach())
    assert abs(float(h.reshape(40, 40).trace()) - exact["linear_1"]) < 1e-4 * exact["linear_1"]
    for name, want in exact.items():
        act = res[name]["act"][0]
        assert abs(act["trace"] - want) < 0.05 * want, (name, act, want)
        assert act["rel_std"] < 0.05 and act["omega"][4] > act["omega"][8] > 0


def test_activation_omega_uses_the_calibrated_quantizer():
    """Omega_act(b) = Tr(H_a)/n_a ||Q_b(a) - a||^2 averaged over batches, Q_b the observer's quantizer on the
    whole calibration set: on a quadratic (constant trace) it equals Tr(H_a) * ||Q_b(A) - A||^2 / numel(A)."""
    from qcompiler.qspec import Observer, fake_quantize
    torch.manual_seed(1)
    lin = torch.nn.Linear(6, 4).eval()
    x, y = torch.randn(32, 6) * 3, torch.randn(32, 4)
    g = _annotated(lin, x)
    res = hutchinson_traces(g, CalibData({"input": x.numpy()}, batch_size=8), loss="mse", labels=y.numpy(),
                            max_iters=400, tol=5e-3, progress=False, a_bits=[6])
    spec = next(q["spec"] for q in layers(g)[0].meta[QMETA]["inputs"].values() if q["role"] == "act")
    obs = Observer(spec.with_(bits=6))
    obs.observe(x)
    err = float(((fake_quantize(x, obs.qparams()) - x) ** 2).sum())
    trace = 2 * float((lin.weight.detach() ** 2).sum()) / 4
    act = res["linear"]["act"][0]
    assert abs(act["omega"][6] - trace * err / x.numel()) < 0.05 * act["omega"][6]


def test_activation_sensitivity_off_by_default_and_reproducible():
    """Without a_bits no activation entries; with them, the same seed gives identical numbers."""
    lin, x, y = _linear_problem(2)
    g = _annotated(lin, x)
    calib = CalibData({"input": x.numpy()}, batch_size=16)
    kw = dict(loss="mse", labels=y.numpy(), max_iters=50, progress=False, seed=5)
    plain = hutchinson_traces(g, calib, **kw)
    a, b = hutchinson_traces(g, calib, a_bits=[8, 16], **kw), hutchinson_traces(g, calib, a_bits=[8, 16], **kw)
    assert "act" not in plain["linear"] and a == b
    assert a["linear"]["act"][0]["omega"][8] > a["linear"]["act"][0]["omega"][16] > 0


def test_negative_trace_estimate_gives_zero_omega():
    """A negative Hutchinson estimate (noise near zero curvature) is floored: Omega is 0, never negative."""
    from qcompiler.passes.sensitivity import omega
    from qcompiler.qspec import default_weight_spec

    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert omega(-0.7, w.numel(), w, default_weight_spec(4)) == 0.0
    assert omega(0.7, w.numel(), w, default_weight_spec(4)) > 0.0


def test_blockwise_trace_has_no_cross_layer_noise():
    """Linear -> Linear under MSE, W1 x30 and W2 /30 (Tr(H_1) small, Tr(H_2) large): blockwise estimates are
    within 5% of each exact block trace, and for the small block its rel_std is far below the joint
    estimate's (whose samples carry v_1^T H_12 v_2)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)).eval()
    with torch.no_grad():
        m[0].weight *= 30.0
        m[0].bias *= 30.0
        m[1].weight /= 30.0
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    g = _annotated(m, x)
    kw = dict(loss="mse", labels=y.numpy(), max_iters=200, tol=1e-3, progress=False, seed=0)
    calib = CalibData({"input": x.numpy()}, batch_size=16)
    block, joint = hutchinson_traces(g, calib, blockwise=True, **kw), hutchinson_traces(g, calib, **kw)
    w1, b1, w2, b2 = (t.detach() for t in (m[0].weight, m[0].bias, m[1].weight, m[1].bias))
    mse = lambda a, b: torch.nn.functional.mse_loss((x @ a.T + b1) @ b.T + b2, y)  # noqa: E731
    exact = {"linear": float(torch.autograd.functional.hessian(lambda a: mse(a, w2), w1).reshape(30, 30).trace()),
             "linear_1": float(torch.autograd.functional.hessian(lambda b: mse(w1, b), w2).reshape(20, 20).trace())}
    for name, want in exact.items():
        assert abs(block[name]["trace"] - want) < 0.05 * want, (name, block[name], want)
    assert block["linear"]["rel_std"] < 0.2 * joint["linear"]["rel_std"], (block["linear"], joint["linear"])


def test_quadratic_omega_is_the_exact_quadratic_form():
    """One linear layer under MSE: "quad"[b] = dW^T H dW = 2 / (N fout) sum_n ||dW x_n||^2, dW = Q_b(W) - W, to 1e-4."""
    from qcompiler.passes.sensitivity import quantize_weight
    lin, x, y = _linear_problem(3)
    g = _annotated(lin, x)
    res = hutchinson_traces(g, CalibData({"input": x.numpy()}, batch_size=8), loss="mse", labels=y.numpy(),
                            max_iters=4, progress=False, w_bits=[2, 4])
    spec = layers(g)[0].meta[QMETA]["inputs"][1]["spec"]
    for b in (2, 4):
        dw = quantize_weight(lin.weight, spec.with_(bits=b)) - lin.weight.detach()
        want = 2.0 / (len(x) * 4) * float(((x @ dw.T) ** 2).sum())
        assert abs(res["linear"]["quad"][b] - want) < 1e-4 * want, (b, res["linear"]["quad"], want)
    assert res["linear"]["quad"][2] > res["linear"]["quad"][4] > 0
