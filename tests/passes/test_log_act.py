"""log_act: log2 / log-sqrt2 quantizers for post-Softmax and post-GELU activations (passes/log_act.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qcompiler
from qcompiler.calib import CalibData
from qcompiler.config import Config
from qcompiler.errors import QCError
from qcompiler.ir import QMETA, is_op
from qcompiler.ops import fake_quant_log2
from qcompiler.pipeline import PassContext, PassManager

aten = torch.ops.aten
nn = torch.nn
C, T = 16, 10
OUTLIERS = [2, 7]


class Ffn(nn.Module):
    """fc2(gelu(fc1(x))) + attention softmax(q k^T) @ v; fc1 has outlier output channels."""

    def __init__(self, bias2=True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C, bias=bias2)
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        with torch.no_grad():
            self.fc1.weight[OUTLIERS] *= 30.0

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1), dim=-1)
        return self.fc2(F.gelu(self.fc1(x))) + a @ self.v(x)


class SmoothedFfn(Ffn):
    """GELU times a positive per-channel constant (what SmoothQuant inserts when GELU cannot absorb it)."""

    def __init__(self, sign=1.0):
        super().__init__()
        s = torch.linspace(0.5, 3.0, 4 * C) * sign
        self.register_buffer("s", s)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)) * self.s)


class GeluIntoMatmul(nn.Module):
    """GELU output into an activation x activation matmul (no bias to take the shift)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        return F.gelu(self.fc1(x)) @ self.fc2(x).transpose(-2, -1)


class SharedFc2(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x))) + self.fc2(x)


def _x(n, seed, outlier=True):
    x = torch.randn(n, T, C, generator=torch.Generator().manual_seed(seed))
    if outlier:
        x[..., 3] *= 50.0  # an outlier input channel
    return x


def _run(make, kinds=("softmax", "gelu"), base="sqrt2", passes=("annotate", "log_act")):
    torch.manual_seed(0)
    m = make().eval()
    g = qcompiler.trace(m, (_x(2, 0),))
    ctx = PassContext(config=Config(log_act=kinds, log_act_base=base),
                      calib=CalibData({g.inputs[0].name: _x(32, 1).numpy()}, batch_size=16))
    before = g.copy()
    pm = PassManager(list(passes))
    g = pm.run(g, ctx)
    return m, before, g, {r["pass"]: r for r in pm.record}, ctx


def _close(a, b):
    s = float(b.abs().max())
    torch.testing.assert_close(a / s, b / s, rtol=1e-5, atol=1e-5)


def _log_inputs(g):
    return {(n.name, i): q["spec"] for n in g.nodes if QMETA in n.meta
            for i, q in n.meta[QMETA]["inputs"].items() if q["spec"].log_base}


@pytest.mark.parametrize("make", [Ffn, lambda: Ffn(bias2=False), SmoothedFfn])
def test_gelu_shift_folds_into_bias_and_keeps_outputs(make):
    """The float graph after log_act (shift added, bias folded) equals the one before, with outlier channels."""
    _, before, g, rec, _ = _run(make)
    adds = [n for n in g.nodes if is_op(n, aten.add) and "log_shift" in str(n.args[1])]
    assert len(adds) == 1 and rec["log_act"]["stats"]["gelu_shifts"] == 1
    fc2 = next(iter(adds[0].users))
    assert is_op(fc2, aten.linear) and fc2.args[2] is not None
    for seed in (3, 4, 5):
        x = _x(8, seed)
        _close(g(x)[0], before(x)[0])
    # the shifted input is non-negative for any input: GELU's minimum is -0.16997
    shift = g.attr(adds[0].args[1])
    z = torch.linspace(-20, 20, 400001)
    m = shift / 0.17
    assert bool(((F.gelu(z)[:, None] * m.reshape(1, -1)) + shift.reshape(1, -1) > 0).all())


@pytest.mark.parametrize("base,root", [("2", 1), ("sqrt2", 2)])
def test_specs_calibration_and_fake_quant(base, root):
    """Post-softmax and post-GELU inputs get the log spec; calibrate takes their max; fake_quant inserts qc::fake_quant_log2."""
    _, _, g, rec, ctx = _run(Ffn, base=base, passes=("annotate", "log_act", "calibrate", "fake_quant"))
    logs = [n for n in g.nodes if n.op == "call_function" and n.target is fake_quant_log2]
    assert len(logs) == 2 and {n.args[3] for n in logs} == {root}
    assert rec["log_act"]["stats"] == {"softmax": 1, "gelu": 1, "gelu_shifts": 1}
    probs = next(n for n in logs if is_op(n.args[0], aten.softmax, aten._softmax))
    assert 0.5 < float(g.attr(probs.args[1])) <= 1.0  # the scale is the observed max probability


def test_only_the_named_kinds():
    _, _, g, rec, _ = _run(Ffn, kinds=("softmax",))
    assert [k[0] for k in _log_inputs(g)] == [n.name for n in g.nodes if is_op(n, aten.matmul)][-1:]
    assert not [n for n in g.nodes if "log_shift" in n.name]


def test_log_quantizer_beats_uniform_on_attention_probabilities_at_4_bits():
    """The reason for the option: softmax outputs at 4 bits lose less with the log-sqrt2 grid."""
    from qcompiler.qspec import Observer, QuantSpec, fake_quantize
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(64, 128) * 4, dim=-1)
    err = {}
    for name, spec in {"uniform": QuantSpec(bits=4, signed=False, symmetric=True),
                       "log": QuantSpec(bits=4, signed=False, symmetric=True, log_base="sqrt2")}.items():
        ob = Observer(spec)
        ob.observe(p)
        err[name] = float(((fake_quantize(p, ob.qparams()) - p) ** 2).sum())
    assert err["log"] < err["uniform"]


@pytest.mark.parametrize("make,reason", [(GeluIntoMatmul, "not a linear's input"), (SharedFc2, "shared"),
                                         (lambda: SmoothedFfn(sign=-1.0), "not positive")])
def test_declines_with_reasons(make, reason):
    """No bias to fold into, a shared consumer weight, a negative multiplier: GELU left uniform, graph unchanged."""
    _, before, g, rec, _ = _run(make, kinds=("gelu",))
    assert any(reason in d for d in rec["log_act"]["declined"]), rec["log_act"]["declined"]
    assert not rec["log_act"]["changed"] and not _log_inputs(g)
    assert len(list(g.nodes)) == len(list(before.nodes))


def test_no_candidates_order_and_config():
    def mlp():
        return nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C))

    _, _, _, rec, _ = _run(mlp)
    assert not rec["log_act"]["changed"] and rec["log_act"]["stats"] == {}
    with pytest.raises(QCError, match="before calibrate"):
        _run(Ffn, passes=("annotate", "calibrate", "log_act"))
    with pytest.raises(QCError, match="integer"):
        Config(log_act=("softmax",), integer=True)
    with pytest.raises(QCError, match="unknown log_act"):
        Config(log_act=("relu",))
    assert Config(log_act=("gelu",)).quantize_passes()[:2] == ["annotate", "log_act"]


def test_compile_to_onnx_matches_the_fake_quant_graph(tmp_path):
    """End to end at W4A4: the saved ONNX artifact, run by ONNX Runtime, computes what the fake-quant graph does."""
    from qcompiler.compiler import quantize
    torch.manual_seed(0)
    g = qcompiler.trace(Ffn().eval(), (_x(2, 0),), input_names=["x"])
    calib = CalibData({"x": _x(32, 1).numpy()}, batch_size=16)
    cfg = Config(w_bits=4, a_bits=4, log_act=("softmax", "gelu"), recipe="none")
    art = qcompiler.compile(g.copy(), calib, config=cfg)
    assert [r for r in art.manifest["passes"] if r["pass"] == "log_act"][0]["changed"]
    _, qgraph, _ = quantize(g.copy(), calib, Config(w_bits=4, a_bits=4, log_act=("softmax", "gelu"), recipe="none"))
    run = qcompiler.load(art.save(tmp_path / "a"))
    x = _x(4, 7)
    out = next(iter(run({"x": x.numpy()}).values()))
    ref = qgraph(x)[0].numpy()
    s = np.abs(ref).max()
    np.testing.assert_allclose(out / s, ref / s, atol=1e-4)
