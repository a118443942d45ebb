import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qcompiler
from qcompiler.calib import CalibData
from qcompiler.config import Config
from qcompiler.errors import PassError
from qcompiler.ir import QMETA, is_op, verify
from qcompiler.passes.gptq import LayerView, gptq_codes, layer_view
from qcompiler.pipeline import PassContext, PassManager
from qcompiler.qspec import fake_quantize, weight_qparams

aten = torch.ops.aten
nn = torch.nn


def _correlated(n, d, seed=0):
    """Calibration rows with correlated channels and a few outlier channels (what GPTQ exploits)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d ** 0.5
    x[:, :3] *= 4.0
    return x


def _run(graph, passes, x, name="input", batch=64, **cfg):
    pm = PassManager(passes, verify_each=True)
    ctx = PassContext(config=Config(**cfg), calib=CalibData({name: x.numpy()}, batch_size=batch))
    return pm.run(graph, ctx), pm.record


def _layer(g, *ops):
    return next(n for n in g.nodes if is_op(n, *ops))


@pytest.fixture(scope="module")
def linear_graph():
    torch.manual_seed(0)
    return qcompiler.trace(nn.Linear(48, 24).eval(), (torch.randn(2, 48),))


@pytest.fixture(scope="module")
def conv_graph():
    torch.manual_seed(1)
    m = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2).eval()
    return qcompiler.trace(m, (torch.randn(2, 8, 10, 10),))


def test_rounds_weight_onto_its_own_grid_and_stores_qparams(linear_graph):
    """W2..W8 per-channel/per-group: new weight on the ORIGINAL weight's grid, QParams stored, counts reported."""
    x = _correlated(256, 48)
    w0 = linear_graph.attr(_layer(linear_graph, aten.linear).args[1]).clone()
    for bits, gran, gs in ((4, "channel", 0), (4, "group", 16), (2, "channel", 0), (3, "group", 8), (8, "channel", 0)):
        g, rec = _run(linear_graph.copy(), ["annotate", "gptq"], x, w_bits=bits, w_granularity=gran, w_group_size=gs)
        assert rec[-1]["changed"] and rec[-1]["stats"] == {"layers": 1, "kept_rtn": 0, "declined": 0}
        node = _layer(g, aten.linear)
        w = g.attr(node.args[1])
        q = node.meta[QMETA]["inputs"][1]
        ref = weight_qparams(w0, q["spec"])
        assert q["qparams"] is not None and torch.equal(q["qparams"].scale, ref.scale)
        assert torch.equal(fake_quantize(w, q["qparams"]), w) and not torch.equal(w, w0)
        assert torch.equal(node.meta[QMETA]["gptq"]["float_weight"], w0)


@pytest.mark.parametrize("gran,gs", [("channel", 0), ("group", 16)])
def test_w4_output_error_below_round_to_nearest(linear_graph, gran, gs):
    """W4 per-channel/per-group, act-order on/off: ||X Wq^T - X W^T|| on calibration rows is below RTN's."""
    x = _correlated(512, 48)
    w0 = linear_graph.attr(_layer(linear_graph, aten.linear).args[1])
    for act_order in (False, True):
        g, _ = _run(linear_graph.copy(), ["annotate", "gptq"], x, w_bits=4, w_granularity=gran, w_group_size=gs,
                    extra={"gptq": {"act_order": act_order, "block_size": 16}})
        node = _layer(g, aten.linear)
        w = g.attr(node.args[1])
        rtn = fake_quantize(w0, weight_qparams(w0, node.meta[QMETA]["inputs"][1]["spec"]))
        err, err_rtn = float((x @ w.t() - x @ w0.t()).norm()), float((x @ rtn.t() - x @ w0.t()).norm())
        assert err < 0.9 * err_rtn, (act_order, err, err_rtn)


def test_conv_gptq_beats_rtn_and_lies_on_grid(conv_graph):
    """Grouped strided padded conv at W4: output error on the calibration images below RTN's, weight on its grid."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 8, 10, 10, generator=gen)
    x = x + 0.8 * x.roll(1, dims=1) + 0.5 * x.roll(1, dims=3)  # correlated channels and neighbours
    node0 = _layer(conv_graph, aten.conv2d)
    w0, b0 = conv_graph.attr(node0.args[1]), conv_graph.attr(node0.args[2])
    g, rec = _run(conv_graph.copy(), ["annotate", "gptq"], x, name="input", batch=8, w_bits=4)
    assert rec[-1]["stats"]["layers"] == 1
    node = _layer(g, aten.conv2d)
    w, qp = g.attr(node.args[1]), node.meta[QMETA]["inputs"][1]["qparams"]
    assert torch.equal(fake_quantize(w, qp), w)
    conv = lambda ww: F.conv2d(x, ww, b0, 2, 1, 1, 2)  # noqa: E731
    ref = conv(w0)
    err_rtn = float((conv(fake_quantize(w0, weight_qparams(w0, qp.spec))) - ref).norm())
    assert float((conv(w) - ref).norm()) < 0.9 * err_rtn


@pytest.mark.parametrize("nd,stride,padding,dilation,groups", [
    (2, (2, 1), ((1, 1), (0, 0)), (1, 2), 1), (2, (1, 1), ((1, 2), (1, 2)), (1, 1), 4), (1, (2,), ((2, 2),), (2,), 2)])
def test_im2col_view_reproduces_conv(nd, stride, padding, dilation, groups):
    """rows(x) @ W_block^T per conv group equals conv(x, W) at fp32 tolerance (asymmetric padding too)."""
    gen = torch.Generator().manual_seed(0)
    k = (3, 2) if nd == 2 else (3,)
    w = torch.randn(8, 8 // groups, *k, generator=gen)
    x = torch.randn(2, 8, *([9] * nd), generator=gen)
    v = LayerView("conv", 0, tuple(w.shape), groups, k, stride, padding, dilation)
    pad = [p for lr in reversed(padding) for p in lr]
    ref = (F.conv2d if nd == 2 else F.conv1d)(F.pad(x, pad), w, None, stride, 0, dilation, groups)
    got = torch.cat([r @ b.t() for r, b in zip(v.rows(x), v.blocks(w))], dim=1)  # [N*L, O]
    torch.testing.assert_close(got, ref.movedim(1, -1).reshape(-1, 8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.assemble(v.blocks(w)), w, rtol=0, atol=0)


def test_view_of_traced_same_padding_conv():
    """padding="same" with dilation, read from the ATen node: the view reproduces the traced conv."""
    torch.manual_seed(0)
    m = nn.Conv2d(4, 6, (3, 2), padding="same", dilation=(1, 2)).eval()
    g = qcompiler.trace(m, (torch.randn(2, 4, 7, 7),))
    node = _layer(g, aten.conv2d)
    node.meta[QMETA] = {"op": "aten.conv2d"}
    v, why = layer_view(g, node, 1)
    x = torch.randn(3, 4, 7, 7)
    with torch.no_grad():
        ref = (m(x) - m.bias[:, None, None]).movedim(1, -1).reshape(-1, 6)
    torch.testing.assert_close(v.rows(x)[0] @ v.blocks(m.weight.detach())[0].t(), ref, rtol=1e-5, atol=1e-5)


def test_codes_equal_rtn_when_hessian_is_diagonal():
    """With H diagonal no error is spread: GPTQ codes are round-to-nearest codes (dead columns too)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    s = torch.full_like(w, 0.3)
    z = torch.zeros_like(w)
    h = torch.diag(torch.rand(10, generator=gen, dtype=torch.float64) + 0.1)
    h[4, 4] = 0.0
    codes = gptq_codes(w, s, z, -7, 7, h, block_size=3, act_order=True)
    assert torch.equal(codes, torch.clamp(torch.round(w / s), -7, 7))


def test_fake_quant_reproduces_gptq_weights_exactly(linear_graph):
    """fake_quant uses gptq's stored QParams (not recomputed ones): fake_quant(W_gptq) == W_gptq bit for bit."""
    x = _correlated(256, 48)
    w0 = linear_graph.attr(_layer(linear_graph, aten.linear).args[1])
    g, _ = _run(linear_graph.copy(), ["annotate", "calibrate", "gptq", "fake_quant"], x,
                w_bits=3, w_granularity="group", w_group_size=16)
    node = _layer(g, aten.linear)
    fq = node.args[1]
    assert fq.target is torch.ops.qc.fake_quant.default
    w = g.attr(fq.args[0])
    out = fq.target(w, g.attr(fq.args[1]), g.attr(fq.args[2]), *fq.args[3:])
    assert torch.equal(out, w)
    stored = node.meta[QMETA]["inputs"][1]["qparams"]
    assert torch.equal(g.attr(fq.args[1]), weight_qparams(w0, stored.spec).scale)
    assert not torch.equal(weight_qparams(w, stored.spec).scale, stored.scale)  # recomputing would move the grid


def test_matmul_with_constant_weight_and_left_constant():
    """x @ W (constant W [in, out]) is rounded through its transpose; W @ x is declined with a reason."""

    class MM(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 8))
            self.v = nn.Parameter(torch.randn(4, 2))

        def forward(self, x):
            y = x @ self.w
            return y, self.v @ y[:, :2].t()

    torch.manual_seed(0)
    g = qcompiler.trace(MM().eval(), (torch.randn(4, 16),))
    g, rec = _run(g, ["annotate", "gptq"], _correlated(64, 16), name="x", batch=8, w_bits=4)
    st = rec[-1]
    assert st["stats"]["layers"] == 1 and any("left operand" in d for d in st["declined"])
    node = next(n for n in g.nodes if QMETA in n.meta and "gptq" in n.meta[QMETA])
    w = g.attr(node.args[1])
    assert torch.equal(fake_quantize(w, node.meta[QMETA]["inputs"][1]["qparams"]), w)


def test_declines_shared_weight_and_embedding():
    """A weight used by two ops and an embedding table are left alone, each with a reason; changed is False."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.emb = nn.Embedding(10, 8)

        def forward(self, x, ids):
            return self.fc(self.fc(x)) + self.emb(ids).sum(1)

    torch.manual_seed(0)
    g = qcompiler.trace(Shared().eval(), (torch.randn(2, 8), torch.tensor([[1, 2], [3, 4]])))
    calib = CalibData({"x": np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32),
                       "ids": np.arange(16).reshape(8, 2) % 10}, batch_size=4)
    pm = PassManager(["annotate", "gptq"], verify_each=True)
    pm.run(g, PassContext(config=Config(w_bits=4), calib=calib))
    r = pm.record[-1]
    assert r["changed"] is False and r["stats"] == {"layers": 0, "kept_rtn": 0, "declined": 3}
    assert sum("shared" in d for d in r["declined"]) == 2 and any("embedding" in d for d in r["declined"])


def test_no_calibration_rows_and_no_candidates(linear_graph):
    """No calibration rows (max_batches 0): declined; activation-only matmul: unchanged, no reasons."""
    _, rec = _run(linear_graph.copy(), ["annotate", "gptq"], _correlated(16, 48), w_bits=4,
                  extra={"gptq": {"max_batches": 0}})
    assert rec[-1]["changed"] is False and "no calibration rows" in rec[-1]["declined"][0]

    class Attn(nn.Module):
        def forward(self, x):
            return x @ x.transpose(-1, -2)

    g = qcompiler.trace(Attn(), (torch.randn(2, 4, 8),))
    _, rec = _run(g, ["annotate", "gptq"], torch.randn(4, 4, 8), name="x", w_bits=4)
    assert rec[-1]["changed"] is False and rec[-1]["declined"] == [] and rec[-1]["stats"]["layers"] == 0


def test_rejects_unknown_option_and_late_position(linear_graph):
    """An unknown gptq option and running after fake_quant are errors naming the problem."""
    with pytest.raises(PassError, match="unknown gptq options"):
        _run(linear_graph.copy(), ["annotate", "gptq"], _correlated(16, 48), extra={"gptq": {"blocksize": 4}})
    with pytest.raises(PassError, match="before fake_quant"):
        _run(linear_graph.copy(), ["annotate", "calibrate", "fake_quant", "gptq"], _correlated(16, 48))


def test_verifies_after_gptq(conv_graph):
    """The rewritten graph passes the verifier and keeps the float graph's output shape."""
    x = torch.randn(8, 8, 10, 10)
    g, _ = _run(conv_graph.copy(), ["annotate", "gptq"], x, batch=4, w_bits=4)
    verify(g)
    assert g(x[:2])[0].shape == conv_graph(x[:2])[0].shape
