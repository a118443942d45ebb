import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qcompiler
from qcompiler.calib import CalibData
from qcompiler.config import Config
from qcompiler.errors import PassError
from qcompiler.ir import QMETA, is_op
from qcompiler.pipeline import PassContext, PassManager
from qcompiler.qspec import fake_quantize, weight_qparams

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from conftest import make_small_cnn  # noqa: E402

aten = torch.ops.aten
nn = torch.nn


class LinConv(nn.Module):
    """A linear with a bias and a padded strided conv without one (so a bias is added)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 6 * 6)
        self.conv = nn.Conv2d(1, 5, 3, stride=2, padding=1, bias=False)

    def forward(self, x):
        return self.conv(torch.relu(self.fc(x)).reshape(-1, 1, 6, 6))


@pytest.fixture(scope="module")
def lin_conv():
    torch.manual_seed(0)
    m = LinConv().eval()
    g = qcompiler.trace(m, (torch.rand(2, 12),))
    x = torch.rand(96, 12, generator=torch.Generator().manual_seed(1)) + 0.5  # non-zero mean: a visible shift
    return m, g, x


def _run(g, passes, x, name="x", **cfg):
    pm = PassManager(passes, verify_each=True)
    out = pm.run(g, PassContext(config=Config(**cfg), calib=CalibData({name: x.numpy()}, batch_size=16)))
    return out, pm.record


def _nodes(g):
    return next(n for n in g.nodes if is_op(n, aten.linear)), next(n for n in g.nodes if is_op(n, aten.conv2d))


def _rtn(w, spec):
    return fake_quantize(w, weight_qparams(w, spec))


def _channel_mean_error(m, x, wq_fc, b_fc, wq_conv, b_conv):
    """Per output channel mean of (quantized-weight layer - float layer) on the float layer inputs."""
    with torch.no_grad():
        err_fc = (F.linear(x, wq_fc, b_fc) - m.fc(x)).mean(0)
        h = torch.relu(m.fc(x)).reshape(-1, 1, 6, 6)
        err_conv = (F.conv2d(h, wq_conv, b_conv, 2, 1) - m.conv(h)).mean((0, 2, 3))
    return err_fc, err_conv


def test_corrects_linear_bias_and_adds_conv_bias(lin_conv):
    """Both layers corrected (the bias-free conv gets a bias), weights untouched, counts reported."""
    m, g, x = lin_conv
    out, rec = _run(g.copy(), ["annotate", "bias_correction"], x, w_bits=4)
    assert rec[-1]["changed"] and rec[-1]["stats"] == {"layers": 2, "biases_added": 1, "declined": 0}
    fc, conv = _nodes(out)
    assert len(conv.args) > 2 and conv.args[2] is not None
    assert not torch.equal(out.attr(fc.args[2]), m.fc.bias.detach())
    assert torch.equal(out.attr(fc.args[1]), m.fc.weight.detach())


def test_mean_output_error_per_channel_is_zero(lin_conv):
    """W4: per-channel mean output error on calibration data is ~0 after (padded borders too), far below before."""
    m, g, x = lin_conv
    out, _ = _run(g.copy(), ["annotate", "bias_correction"], x, w_bits=4)
    fc, conv = _nodes(out)
    spec_fc, spec_conv = fc.meta[QMETA]["inputs"][1]["spec"], conv.meta[QMETA]["inputs"][1]["spec"]
    wq_fc, wq_conv = _rtn(m.fc.weight.detach(), spec_fc), _rtn(m.conv.weight.detach(), spec_conv)
    before = _channel_mean_error(m, x, wq_fc, m.fc.bias.detach(), wq_conv, None)
    after = _channel_mean_error(m, x, wq_fc, out.attr(fc.args[2]), wq_conv, out.attr(conv.args[2]))
    for b, a in zip(before, after):
        assert float(a.abs().max()) < 1e-5 and float(b.abs().max()) > 1e-3
        assert float(a.abs().max()) < 1e-2 * float(b.abs().max())


def test_corrects_gptq_residual_shift(lin_conv):
    """After gptq the shift is measured against the ORIGINAL weight: mean error ~0 with the GPTQ weights."""
    m, g, x = lin_conv
    only, _ = _run(g.copy(), ["annotate", "gptq"], x, w_bits=3)
    both, rec = _run(g.copy(), ["annotate", "gptq", "bias_correction"], x, w_bits=3)
    assert rec[-1]["stats"]["layers"] == 2
    fc, conv = _nodes(both)
    fc0, conv0 = _nodes(only)
    assert torch.equal(both.attr(fc.args[1]), only.attr(fc0.args[1]))  # weights are gptq's, untouched
    before = _channel_mean_error(m, x, only.attr(fc0.args[1]), m.fc.bias.detach(), only.attr(conv0.args[1]), None)
    after = _channel_mean_error(m, x, both.attr(fc.args[1]), both.attr(fc.args[2]), both.attr(conv.args[1]),
                                both.attr(conv.args[2]))
    for b, a in zip(before, after):
        assert float(a.abs().max()) < 1e-5 < float(b.abs().max())


def test_declines_layers_without_bias_input_and_without_rows(lin_conv):
    """x @ W has no bias input: declined, changed False; no calibration rows: every layer declined."""

    class MM(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            return x @ self.w

    g = qcompiler.trace(MM().eval(), (torch.randn(2, 8),))
    _, rec = _run(g, ["annotate", "bias_correction"], torch.randn(16, 8), w_bits=4)
    assert rec[-1]["changed"] is False and "no bias input" in rec[-1]["declined"][0]
    m, g2, x = lin_conv
    _, rec = _run(g2.copy(), ["annotate", "bias_correction"], x, w_bits=4,
                  extra={"bias_correction": {"max_batches": 0}})
    assert rec[-1]["changed"] is False and rec[-1]["stats"]["declined"] == 2
    assert all("no calibration rows" in d for d in rec[-1]["declined"])


def test_no_candidates_and_late_position(lin_conv):
    """An activation-only product: unchanged, no reasons; running after fake_quant is an error."""

    class Attn(nn.Module):
        def forward(self, x):
            return x @ x.transpose(-1, -2)

    g = qcompiler.trace(Attn(), (torch.randn(2, 3, 4),))
    _, rec = _run(g, ["annotate", "bias_correction"], torch.randn(4, 3, 4), w_bits=4)
    assert rec[-1]["changed"] is False and rec[-1]["declined"] == []
    m, g2, x = lin_conv
    with pytest.raises(PassError, match="before fake_quant"):
        _run(g2.copy(), ["annotate", "calibrate", "fake_quant", "bias_correction"], x)


def test_end_to_end_small_cnn_gptq_and_bias_correction_beat_rtn():
    """Small CNN W4A8, gptq + bias_correction: held-out output error under half of RTN's, weights on their grid."""
    m = make_small_cnn()
    g = qcompiler.trace(m, (torch.randn(2, 3, 16, 16),))
    rng = np.random.default_rng(0)
    calib = CalibData({"x": rng.standard_normal((48, 3, 16, 16)).astype(np.float32)}, batch_size=8)
    held = torch.from_numpy(rng.standard_normal((32, 3, 16, 16)).astype(np.float32))
    with torch.no_grad():
        ref = m(held)

    def rel_err(passes):
        pm = PassManager(passes, verify_each=True)
        q = pm.run(g.copy(), PassContext(config=Config(w_bits=4), calib=calib))
        for n in q.nodes:
            if QMETA in n.meta and "gptq" in passes:
                fq = n.args[1]
                w = q.attr(fq.args[0])
                assert torch.equal(fq.target(w, q.attr(fq.args[1]), q.attr(fq.args[2]), *fq.args[3:]), w)
        return float((q(held)[0] - ref).pow(2).mean() / ref.pow(2).mean()), pm.record

    rtn, _ = rel_err(["annotate", "calibrate", "fake_quant"])
    both, rec = rel_err(["annotate", "calibrate", "gptq", "bias_correction", "fake_quant"])
    assert rec[2]["stats"]["layers"] == 3 and rec[3]["stats"]["layers"] == 3
    assert both < 0.5 * rtn, (both, rtn)
