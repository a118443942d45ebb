import functools

import pytest
import torch
import torch.nn.functional as F

import qcompiler
from qcompiler.calib import CalibData
from qcompiler.config import Config
from qcompiler.errors import PassError, QCError
from qcompiler.ir import QMETA, is_op, verify
from qcompiler.ops import fake_quant, fake_quant_log2, log_sqrt2_split
from qcompiler.passes.calibrate import quality_report
from qcompiler.pipeline import PassContext, PassManager

aten = torch.ops.aten
nn = torch.nn
C, T = 16, 12
OUTLIERS = (1, 5, 9)
PREPARED = ["annotate", "reparam_prepare", "calibrate"]


class LnLinears(nn.Module):
    """LayerNorm -> fused qkv linear and a bias-free fc1: one group; the LN output has outlier channels."""

    def __init__(self):
        super().__init__()
        self.ln, self.qkv, self.fc1 = nn.LayerNorm(C), nn.Linear(C, 3 * C), nn.Linear(C, 2 * C, bias=False)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.weight[list(OUTLIERS)] *= 40.0
            self.ln.bias.normal_()
            self.ln.bias[list(OUTLIERS)] += 10.0

    def forward(self, x):
        h = self.ln(x)
        return self.qkv(h), self.fc1(h)


class Attention(nn.Module):
    """softmax(q k^T) @ v with q, k, v from linears (no LayerNorm)."""

    def __init__(self, heads=2):
        super().__init__()
        self.heads, self.q, self.k, self.v = heads, nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (f(x).reshape(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-2, -1) * 2.0, dim=-1)
        return (a @ v).transpose(1, 2).reshape(b, n, c)


def _x(n, seed):
    return torch.randn(n, T, C, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _model(make, seed=0):
    torch.manual_seed(seed)
    return make().eval()


@functools.cache
def _traced(make):
    return qcompiler.trace(_model(make), (_x(2, 0),))


def _run(make, passes, config, float_weights=True):
    """Run `passes` on the traced seeded make(); with float_weights the weight annotations are dropped before fake_quant."""
    g = _traced(make).copy()
    ctx = PassContext(config=config, calib=CalibData({g.inputs[0].name: _x(32, 1).numpy()}, batch_size=16))
    head = [p for p in passes if p != "fake_quant"]
    pm = PassManager(head)
    g = pm.run(g, ctx)
    if float_weights:
        for n in g.nodes:
            if QMETA in n.meta:
                n.meta[QMETA]["inputs"] = {i: q for i, q in n.meta[QMETA]["inputs"].items() if q["role"] != "weight"}
    if "fake_quant" in passes:
        g = PassManager(["fake_quant"]).run(g, ctx)
    return g, {r["pass"]: r for r in pm.record}


def _targets(g, op):
    return [n for n in g.nodes if n.op == "call_function" and n.target is op]


def _ln_codes(g, x):
    """Integer codes of the LayerNorm output's quantizer in graph g, recomputed from its constants in float32."""
    ln = next(n for n in g.nodes if is_op(n, aten.layer_norm))
    fq = next(iter(ln.users))
    assert fq.target is fake_quant
    s, z = g.attr(fq.args[1]), g.attr(fq.args[2])
    h = F.layer_norm(x, (C,), g.attr(ln.args[2]), g.attr(ln.args[3]))
    s = s if s.dim() == 0 else s.reshape(1, 1, -1)
    z = z if z.dim() == 0 else z.reshape(1, 1, -1)
    return torch.clamp(torch.round(h / s) + z, fq.args[3], fq.args[4]), (h / s).double()


def _close_rows(a, b, ok_rows):
    scale = float(b.abs().max())
    torch.testing.assert_close(a[ok_rows] / scale, b[ok_rows] / scale, rtol=1e-5, atol=1e-5)


def test_structure_after_reparam():
    """reparam folds the LN group (qkv + fc1) into one per-tensor quantizer on new weights; no per-channel act quantizer stays."""
    g, rec = _run(LnLinears, PREPARED + ["reparam", "fake_quant"], Config(a_bits=8), float_weights=False)
    verify(g)
    assert rec["reparam_prepare"]["stats"] == {"layernorm_per_channel": 1}
    assert rec["reparam"]["stats"] == {"layernorm_folded": 1, "linears_updated": 2}
    fqs = _targets(g, fake_quant)
    acts = [f for f in fqs if f.args[0].op != "get_attr"]
    assert len(acts) == 1 and g.attr(acts[0].args[1]).dim() == 0  # one per-tensor quantizer for both linears
    assert int(g.attr(acts[0].args[2])) == 0  # the config's symmetric spec keeps z = 0
    for lin in (n for n in g.nodes if is_op(n, aten.linear)):
        assert lin.args[0] is acts[0]
        assert "reparam" in lin.args[1].args[0].target  # the weight quantizer reads the NEW weight
        assert len(lin.args) == 3 and "reparam" in lin.args[2].target  # fc1 gained a bias: b - W (s_c r2)


@pytest.mark.parametrize("a_symmetric", [True, False])
def test_layernorm_reparam_keeps_codes_and_outputs(a_symmetric):
    """Float weights: per-tensor codes on the new LN output equal the per-channel ones (but at fp32 .5 ties) and outputs agree at 1e-5."""
    cfg = Config(a_bits=8, a_symmetric=a_symmetric)
    before, _ = _run(LnLinears, PREPARED + ["fake_quant"], cfg)
    after, _ = _run(LnLinears, PREPARED + ["reparam", "fake_quant"], cfg)
    x = _x(16, 2)
    q_b, ratio = _ln_codes(before, x)
    q_a, _ = _ln_codes(after, x)
    moved = q_a != q_b
    near_tie = (ratio - torch.floor(ratio) - 0.5).abs() < 1e-4
    assert bool((~moved | near_tie).all()) and float(moved.float().mean()) < 1e-3
    assert bool(((q_a - q_b).abs() <= 1).all())
    ok_rows = ~moved.any(-1)
    assert float(ok_rows.float().mean()) > 0.95
    for a, b in zip(after(x), before(x)):
        _close_rows(a, b, ok_rows)


def test_layernorm_reparam_with_quantized_weights():
    """W8 on the new weights: outputs move from the per-channel graph's by the weight-quantization change (< 2 %, error vs float within 1.5x)."""
    cfg = Config(a_bits=8, w_bits=8)
    before, _ = _run(LnLinears, PREPARED + ["fake_quant"], cfg, float_weights=False)
    after, _ = _run(LnLinears, PREPARED + ["reparam", "fake_quant"], cfg, float_weights=False)
    ref = _model(LnLinears)
    x = _x(16, 2)
    with torch.no_grad():
        for a, b, r in zip(after(x), before(x), ref(x)):
            diff = float((a - b).norm() / b.norm())
            err_a, err_b = float((a - r).norm() / r.norm()), float((b - r).norm() / r.norm())
            print(f"W8A8 relative error vs float: per-channel {err_b:.4f}, reparam {err_a:.4f}; between them {diff:.4f}")
            assert diff < 2e-2 and err_a < 1.5 * err_b, (diff, err_a, err_b)


def test_reparam_beats_plain_per_tensor_on_outlier_channels():
    """With outlier channels, the reparameterized per-tensor quantizer has under half the error of plain per-tensor (float weights, A6)."""
    cfg = Config(a_bits=6)
    plain, _ = _run(LnLinears, ["annotate", "calibrate", "fake_quant"], cfg)
    rep, _ = _run(LnLinears, PREPARED + ["reparam", "fake_quant"], cfg)
    ref = _model(LnLinears)
    x = _x(16, 2)
    with torch.no_grad():
        for p, q, r in zip(plain(x), rep(x), ref(x)):
            e_rep, e_plain = float((q - r).norm() / r.norm()), float((p - r).norm() / r.norm())
            print(f"A6 relative error vs float: plain per-tensor {e_plain:.4f}, reparam {e_rep:.4f}")
            assert e_rep < 0.5 * e_plain


def test_softmax_split_equals_log_sqrt2():
    """softmax -> matmul: calibrated log-sqrt2, split into even/odd shift terms; outputs equal the log-sqrt2 graph at 1e-5."""
    cfg = Config(a_bits=4, op_types=("matmul",))
    before, rb = _run(Attention, PREPARED + ["fake_quant"], cfg)
    after, ra = _run(Attention, PREPARED + ["reparam", "fake_quant"], cfg)
    assert rb["reparam_prepare"]["stats"] == {"softmax_log_sqrt2": 1}
    assert ra["reparam"]["stats"] == {"softmax_split": 1}
    assert len(_targets(before, fake_quant_log2)) == 1 and not _targets(after, fake_quant_log2)
    assert len(_targets(after, log_sqrt2_split)) == 1 and len(_targets(after, aten.matmul.default)) == 3
    verify(after)
    x = _x(8, 3)
    torch.testing.assert_close(after(x)[0], before(x)[0], rtol=1e-5, atol=1e-5)


def test_quality_report_after_softmax_split():
    """quality_report on a split graph: the odd-half matmul (no float counterpart) does not break it; each
    split matmul keeps one row with its input-0 (split quantizer) and output SQNR, equal to the log-sqrt2 graph's."""
    cfg = Config(a_bits=4, op_types=("matmul",))
    before, _ = _run(Attention, PREPARED + ["fake_quant"], cfg)
    after, _ = _run(Attention, PREPARED + ["reparam", "fake_quant"], cfg)
    float_graph = _traced(Attention).copy()
    calib = CalibData({float_graph.inputs[0].name: _x(16, 4).numpy()}, batch_size=8)
    rows_b = quality_report(float_graph, before, calib)
    rows_a = quality_report(float_graph, after, calib)
    split = next(n for n in after.nodes if "log_sqrt2_split" in n.meta.get(QMETA, {})
                 and "odd" in n.meta[QMETA]["log_sqrt2_split"])
    assert split.meta[QMETA]["log_sqrt2_split"]["odd"] not in {n.name for n in float_graph.nodes}
    assert [r["layer"] for r in rows_a] == [r["layer"] for r in rows_b]  # no row for the odd half
    for a, b in zip(rows_a, rows_b):
        assert a.keys() == b.keys() and "input0_sqnr_db" in a, (a, b)
        for k in a:
            if k.endswith("_sqnr_db"):
                assert a[k] == pytest.approx(b[k], abs=0.05), (k, a, b)
    assert rows_a[1]["layer"] == split.name and 0 < rows_a[1]["input0_sqnr_db"] < 60


class Block(nn.Module):
    """Pre-LN attention: LayerNorm -> fused qkv, softmax(q k^T) @ v."""

    def __init__(self, heads=2):
        super().__init__()
        self.heads, self.ln, self.qkv = heads, nn.LayerNorm(C), nn.Linear(C, 3 * C)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


@pytest.mark.parametrize("parts,stats", [(("layernorm",), {"layernorm_folded": 1, "linears_updated": 1}),
                                         (("softmax",), {"softmax_split": 1})])
def test_parts_option(parts, stats):
    """config.extra["reparam_parts"] picks the reparameterizations; "layernorm" alone leaves only qc::fake_quant."""
    g, rec = _run(Block, PREPARED + ["reparam", "fake_quant"], Config(extra={"reparam_parts": parts}))
    assert rec["reparam"]["stats"] == stats
    assert bool(_targets(g, log_sqrt2_split)) == ("softmax" in parts)
    with pytest.raises(PassError, match="unknown reparam_parts"):
        _run(Block, PREPARED, Config(extra={"reparam_parts": ("gelu",)}))


class LnNoAffine(LnLinears):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(C, elementwise_affine=False)


class LnAlsoSigmoid(LnLinears):
    def forward(self, x):
        h = self.ln(x)
        return self.qkv(h), self.fc1(h) + h.sigmoid().sum(-1, keepdim=True)


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2, self.fc = nn.LayerNorm(C), nn.LayerNorm(C), nn.Linear(C, C)

    def forward(self, x):
        return self.fc(self.ln1(x)) + self.fc(self.ln2(x))


@pytest.mark.parametrize("model,reason", [(LnNoAffine, "no affine"), (LnAlsoSigmoid, "not a linear's input"),
                                          (SharedWeight, "shared")])
def test_declines_with_reasons(model, reason):
    """LN without affine, LN output used by a non-linear op, shared consumer weights: declined, nothing folded."""
    g, rec = _run(model, PREPARED + ["reparam"], Config())
    declined = rec["reparam_prepare"]["declined"]
    assert declined and all(reason in d for d in declined), declined
    assert rec["reparam"]["changed"] is False and rec["reparam"]["stats"] == {}
    assert all(not q["spec"].log_base and q["spec"].granularity == "tensor"
               for n in g.nodes if QMETA in n.meta for q in n.meta[QMETA]["inputs"].values() if q["role"] == "act")


def test_no_candidates_and_pass_order():
    """A model with neither LayerNorm nor softmax is left alone; reparam needs reparam_prepare, which must precede calibrate."""
    def mlp():
        return nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C))

    _, rec = _run(mlp, PREPARED + ["reparam"], Config())
    assert not rec["reparam_prepare"]["changed"] and not rec["reparam"]["changed"]
    with pytest.raises(PassError, match="reparam_prepared"):
        _run(mlp, ["annotate", "calibrate", "reparam"], Config())
    with pytest.raises(PassError, match="before calibrate"):
        _run(LnLinears, ["annotate", "calibrate", "reparam_prepare"], Config())
    assert issubclass(PassError, QCError)
