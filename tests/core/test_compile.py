import numpy as np
import pytest
import torch

import qcompiler
from qcompiler.calib import CalibData
from qcompiler.ir import QMETA
from qcompiler.ops import fake_quant


def _calib(n=32, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)}


def test_quantize_inserts_shared_quantizers(small_cnn):
    """Each conv/linear gets a weight and an input quantizer; annotations carry calibrated QParams."""
    g = qcompiler.trace(small_cnn, (torch.randn(2, 3, 16, 16),), input_names=["x"])
    _, q, record = qcompiler.compiler.quantize(g, CalibData(_calib()), qcompiler.Config())
    fq = [n for n in q.nodes if n.target is fake_quant]
    layers = [n for n in q.nodes if QMETA in n.meta]
    assert len(layers) == 3 and len(fq) == 6
    for n in layers:
        for i, info in n.meta[QMETA]["inputs"].items():
            assert n.args[i].target is fake_quant and info["qparams"] is not None
    assert [r["pass"] for r in record] == ["remove_identities", "fold_bn", "fold_constants", "fold_additive_mask",
                                           "smooth", "annotate", "calibrate", "fake_quant"]


def test_keep_float_by_name(small_cnn):
    """Layers matching an exclude glob stay float and the annotate pass says why."""
    g = qcompiler.trace(small_cnn, (torch.randn(2, 3, 16, 16),), input_names=["x"])
    cfg = qcompiler.Config(exclude=("linear*",))
    _, q, record = qcompiler.compiler.quantize(g, CalibData(_calib()), cfg)
    assert {n.name for n in q.nodes if QMETA in n.meta} == {"conv2d", "conv2d_1"}
    ann = next(r for r in record if r["pass"] == "annotate")
    assert ann["stats"]["excluded_by_name"] == 1 and any("linear" in d for d in ann["declined"])


@pytest.mark.parametrize("target", ["onnx", "reference"])
def test_artifact_matches_fake_quant_graph(small_cnn, tmp_path, target):
    """The saved artifact, loaded back, reproduces the fake-quant graph it was compiled from."""
    g = qcompiler.trace(small_cnn, (torch.randn(2, 3, 16, 16),), input_names=["x"])
    calib = CalibData(_calib())
    cfg, _ = qcompiler.Config(target=target).with_recipe(qcompiler.compiler.op_counts(g))  # what compile() runs
    _, q, _ = qcompiler.compiler.quantize(g.copy(), calib, cfg)
    art = qcompiler.compile(g, calib, target=target)
    out = art.save(tmp_path / "art")
    model = qcompiler.load(out)
    x = np.random.default_rng(5).standard_normal((7, 3, 16, 16)).astype(np.float32)
    got = model({"x": x})["output"]
    ref = q(torch.from_numpy(x))[0].numpy()
    if target == "reference":  # the same reference kernels in torch: identical
        np.testing.assert_array_equal(got, ref)
    else:  # ONNX Runtime: see tests/backends/test_onnx_backend.py for the tolerance argument
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_same_inputs_give_identical_bytes(small_cnn, tmp_path):
    """Two compilations of the same model, data and options produce byte-identical files."""
    g = qcompiler.trace(small_cnn, (torch.randn(2, 3, 16, 16),), input_names=["x"])
    a = qcompiler.compile(g.copy(), _calib())
    b = qcompiler.compile(g.copy(), _calib())
    pa, pb = a.save(tmp_path / "a"), b.save(tmp_path / "b")
    for name in ("manifest.json", "model.onnx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert pa != pb


def test_quality_report_is_in_manifest(small_cnn):
    """The manifest carries per-layer SQNR for weights, inputs and outputs, and a summary."""
    g = qcompiler.trace(small_cnn, (torch.randn(2, 3, 16, 16),), input_names=["x"])
    m = qcompiler.compile(g, _calib()).manifest
    rows = m["quality"]["layers"]
    assert len(rows) == 3
    for r in rows:
        assert 20 < r["weight_sqnr_db"] < 80 and 15 < r["input0_sqnr_db"] < 80 and r["output_sqnr_db"] > 10
    assert m["quality"]["summary"]["worst_layer"] in {r["layer"] for r in rows}


def test_calibration_from_a_loader(small_cnn):
    """Calibrating from an iterable of batches gives the same artifact as from the stacked arrays."""
    g = qcompiler.trace(small_cnn, (torch.randn(2, 3, 16, 16),), input_names=["x"])
    arrays = _calib()
    loader = ({"x": torch.from_numpy(arrays["x"][i:i + 5])} for i in range(0, 32, 5))
    a = qcompiler.compile(g.copy(), loader)
    b = qcompiler.compile(g.copy(), arrays)
    assert a.files == b.files
    with pytest.raises(qcompiler.QCError, match="empty calibration"):
        qcompiler.compile(g.copy(), iter([]))


def test_config_orders_the_quantization_passes():
    """Config flags place reparam around calibrate and gptq / bias correction before fake-quant; reparam + integer is refused."""
    cfg = qcompiler.Config(gptq=True, bias_correction=True, reparam=("layernorm",))
    assert cfg.quantize_passes() == ["annotate", "reparam_prepare", "calibrate", "reparam", "gptq", "bias_correction",
                                     "fake_quant"]
    assert qcompiler.Config(integer=True).quantize_passes() == ["annotate", "annotate_integer", "calibrate", "fake_quant"]
    with pytest.raises(qcompiler.QCError, match="do not combine"):
        qcompiler.Config(integer=True, reparam=("layernorm",))
    with pytest.raises(qcompiler.QCError, match="unknown reparam"):
        qcompiler.Config(reparam=("attention",))


def test_compile_with_gptq_and_bias_correction(small_cnn):
    """compile() runs GPTQ and bias correction when asked; the manifest's pass record shows them with counts."""
    g = qcompiler.trace(small_cnn, (torch.randn(2, 3, 16, 16),), input_names=["x"])
    art = qcompiler.compile(g, _calib(), config=qcompiler.Config(w_bits=4, gptq=True, bias_correction=True))
    rec = {r["pass"]: r for r in art.manifest["passes"]}
    assert rec["gptq"]["stats"]["layers"] == 3 and rec["bias_correction"]["stats"]["layers"] == 3
