"""Integer-only lowering: quantization points, the integer graph, its verifier and its agreement
with the fake-quant graph it comes from."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import qcompiler
from qcompiler import graph_io
from qcompiler import int_ops as I
from qcompiler.calib import CalibData
from qcompiler.errors import QCError
from qcompiler.ops import fake_quant
from qcompiler.passes.lower_integer import agreement, verify_integer
from qcompiler.pipeline import PassContext, PassManager


class TinyViT(nn.Module):
    """Pre-LN block with attention (softmax), GELU MLP, residual adds, cls-token cat and mean head."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(1, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
        return self.head(self.ln3(x).mean(1))


def _lower(module, example, calib, cfg=None):
    cfg = cfg or qcompiler.Config(integer=True)
    g = qcompiler.trace(module, (example,), input_names=["x"], dynamic="batch")
    ctx = PassContext(config=cfg, calib=CalibData(calib))
    g = PassManager(list(cfg.pre_passes), verify_each=True).run(g, ctx)
    q = PassManager(["annotate", "annotate_integer", "calibrate", "fake_quant"], verify_each=True).run(g, ctx)
    return q, PassManager(["lower_integer"]).run(q.copy(), ctx)


@pytest.fixture(scope="module")
def vit_case():
    torch.manual_seed(0)
    m = TinyViT().eval()
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((32, 1, 16, 16)).astype(np.float32)}
    q, ig = _lower(m, torch.randn(2, 1, 16, 16), calib)
    return m, q, ig


def test_cnn_lowers_to_integer_ops_only(small_cnn):
    """conv-BN-ReLU / max-pool / mean / linear lower to qc integer ops; ReLU is fused before the requant."""
    calib = {"x": np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32)}
    q, ig = _lower(small_cnn, torch.randn(2, 3, 16, 16), calib)
    ops = ig.meta["integer"]["ops"]
    assert ops["qc.int_conv"] == 2 and ops["qc.int_linear"] == 1 and ops["qc.quantize"] == 1
    assert ops["qc.dequantize"] == 1 and "qc.int_sum" in ops and ig.meta["integer"]["float_islands"] == []
    verify_integer(ig)
    x = torch.randn(9, 3, 16, 16)
    agree = agreement(q, ig, [(x,)])["output"]
    assert agree["within_1_lsb"] == 1.0 and agree["equal"] > 0.5


def test_vit_lowers_softmax_gelu_layernorm(vit_case):
    """Attention, GELU, LayerNorm, residual adds and the cls-token cat all become integer ops."""
    _, q, ig = vit_case
    ops = ig.meta["integer"]["ops"]
    for op in ("qc.int_softmax", "qc.int_layer_norm", "qc.int_lut", "qc.int_add", "qc.int_matmul", "qc.int_conv"):
        assert ops.get(op, 0) >= 1, op
    verify_integer(ig)
    nodes = [n for n in ig.nodes if n.op == "call_function"]
    floats = [n for n in nodes if n.meta["val"].dtype.is_floating_point] if all(
        isinstance(n.meta.get("val"), torch.Tensor) for n in nodes) else None
    assert floats is None or [n.target for n in floats] == [I.dequantize]


def test_vit_integer_graph_tracks_fake_quant(vit_case):
    """On seeded inputs the integer graph is within 1 output LSB of its fake-quant graph almost everywhere."""
    _, q, ig = vit_case
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((16, 1, 16, 16)).astype(np.float32))
    agree = agreement(q, ig, [(x,)])["output"]
    assert agree["within_1_lsb"] >= 0.97 and agree["max_lsb"] <= 4


def test_integer_graph_serializes_bit_exactly(vit_case, tmp_path):
    """graph_io round trip: same outputs bit for bit, same bytes on a second dump."""
    _, _, ig = vit_case
    doc, blob = graph_io.dump(ig)
    assert graph_io.dump(ig) == (doc, blob)
    back = graph_io.load(doc, blob)
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(ig(x)[0], back(x)[0])


class WithCumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(torch.cumsum(self.fc(x), -1))


def test_unsupported_op_names_node_and_float_island_is_listed():
    """An op with no integer kernel fails naming the node; --allow-float makes it a listed island."""
    torch.manual_seed(0)
    calib = {"x": np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32)}
    with pytest.raises(QCError, match=r"cumsum.*--allow-float cumsum"):
        _lower(WithCumsum().eval(), torch.randn(2, 8), calib)
    q, ig = _lower(WithCumsum().eval(), torch.randn(2, 8), calib,
                   qcompiler.Config(integer=True, allow_float=("cumsum",), pre_passes=()))
    assert ig.meta["integer"]["float_islands"] == ["cumsum"]
    verify_integer(ig)
    x = torch.randn(5, 8)
    assert agreement(q, ig, [(x,)])["output"]["within_1_lsb"] == 1.0


def test_verifier_rejects_float_inside(vit_case):
    """A float op slipped into the integer graph is caught, naming it."""
    _, _, ig = vit_case
    g = ig.copy()
    node = next(n for n in g.nodes if n.target is I.int_layer_norm)
    with g.graph.inserting_after(node):
        f = g.graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": torch.float32})
        back = g.graph.call_function(torch.ops.aten._to_copy.default, (f,), {"dtype": torch.int8})
    f.meta["val"] = node.meta["val"].to(torch.float32)
    back.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(back)
    f.args = (node,)
    with pytest.raises(QCError, match=f.name):
        verify_integer(g)


def test_compile_integer_artifact_round_trip(small_cnn, tmp_path):
    """compile(integer=True, target=reference) writes model.qgraph.*; load() reproduces the integer graph and
    the manifest records the ops, agreement and islands; the onnx target refuses integer graphs."""
    calib = {"x": np.random.default_rng(3).standard_normal((16, 3, 16, 16)).astype(np.float32)}
    g = qcompiler.trace(small_cnn, (torch.randn(2, 3, 16, 16),), input_names=["x"], dynamic="batch")
    art = qcompiler.compile(g.copy(), calib, config=qcompiler.Config(integer=True, target="reference"))
    assert {"model.qgraph.json", "model.qgraph.bin"} <= set(art.files)
    m = art.manifest["integer"]
    assert m["float_islands"] == [] and m["agreement_with_fake_quant"]["output"]["within_1_lsb"] == 1.0
    model = qcompiler.load(art.save(tmp_path / "a"))
    x = np.random.default_rng(4).standard_normal((4, 3, 16, 16)).astype(np.float32)
    ig = graph_io.load(art.files["model.qgraph.json"], art.files["model.qgraph.bin"])
    np.testing.assert_array_equal(model({"x": x})["output"], ig(torch.from_numpy(x))[0].numpy())
    with pytest.raises(QCError, match="integer-only"):
        qcompiler.compile(g.copy(), calib, config=qcompiler.Config(integer=True, target="onnx"))


def test_no_fake_quant_left_and_weights_are_integers(vit_case):
    """No qc.fake_quant survives lowering; every constant feeding an integer matmul is an integer tensor."""
    _, _, ig = vit_case
    assert not any(n.target is fake_quant for n in ig.nodes)
    for n in ig.nodes:
        if n.target in (I.int_linear, I.int_conv):
            assert not ig.attr(n.args[2]).dtype.is_floating_point


class MaskedMeanPool(nn.Module):
    """Sentence-encoder head: masked mean over tokens, then L2 normalisation."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, mask):
        h = self.fc(x)
        m = mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def test_masked_mean_pool_and_l2_normalize_are_integer():
    """Masked mean pooling and L2 normalisation lower to int_mul / int_sum / int_div / int_l2_norm, the token
    count stays an exact integer, and the output tracks the fake-quant graph."""
    torch.manual_seed(0)
    rng = np.random.default_rng(5)
    mask = (rng.random((32, 6)) > 0.3).astype(np.int64)
    mask[:, 0] = 1
    calib = {"x": rng.standard_normal((32, 6, 8)).astype(np.float32), "mask": mask}
    cfg = qcompiler.Config(integer=True)
    g = qcompiler.trace(MaskedMeanPool().eval(), (torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.long)),
                        input_names=["x", "mask"], dynamic="batch")
    ctx = PassContext(config=cfg, calib=CalibData(calib))
    q = PassManager(["annotate", "annotate_integer", "calibrate", "fake_quant"], verify_each=True).run(g, ctx)
    ig = PassManager(["lower_integer"]).run(q.copy(), ctx)
    ops = ig.meta["integer"]["ops"]
    for op in ("qc.int_mul", "qc.int_sum", "qc.int_div", "qc.int_l2_norm"):
        assert ops.get(op, 0) >= 1, op
    assert ig.meta["integer"]["float_islands"] == []
    verify_integer(ig)
    x = torch.from_numpy(calib["x"][:8])
    m = torch.from_numpy(calib["mask"][:8])
    fq_out, int_out = q(x, m)[0], ig(x, m)[0]
    cos = torch.nn.functional.cosine_similarity(fq_out, int_out, dim=1)
    assert float(cos.min()) > 0.999
