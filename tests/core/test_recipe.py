"""Recipes: the pass combination compile() picks per architecture pattern, and when it does not."""
import numpy as np
import pytest
import torch

import qcompiler
from qcompiler.calib import CalibData
from qcompiler.compiler import op_counts
from qcompiler.config import BASE_PRE_PASSES, detect_pattern

MINILM_OPS = {"embedding": 3, "layer_norm": 13, "linear": 36, "matmul": 12, "softmax": 6, "gelu": 6, "add": 20}
VIT_OPS = {"conv2d": 1, "layer_norm": 9, "linear": 17, "matmul": 8, "softmax": 4, "gelu": 4}
CNN_OPS = {"conv2d": 4, "relu": 5, "max_pool2d": 2, "linear": 2}


@pytest.mark.parametrize("ops, pattern", [(MINILM_OPS, "transformer"), (VIT_OPS, "vit"), (CNN_OPS, "cnn"),
                                          ({"linear": 2, "relu": 1}, "generic"), ({}, "generic")])
def test_pattern_is_detected_from_the_ops_present(ops, pattern):
    """LayerNorm + Softmax without conv is a transformer, with a conv a ViT; conv without LayerNorm a CNN; else generic."""
    name, evidence = detect_pattern(ops)
    assert name == pattern and isinstance(evidence, str) and evidence


def test_cnn_recipe_depends_on_the_widths():
    """CNN: CLE always; GPTQ and bias correction at <= 4-bit weights; the unsigned grid below 8-bit activations."""
    cfg, rec = qcompiler.Config(w_bits=4, a_bits=4).with_recipe(CNN_OPS)
    assert rec["name"] == "cnn" and rec["reason"] == "detected pattern"
    assert cfg.pre_passes == (*BASE_PRE_PASSES, "cle") and cfg.gptq and cfg.bias_correction and cfg.a_unsigned_nonneg
    cfg8, _ = qcompiler.Config().with_recipe(CNN_OPS)
    assert not cfg8.gptq and not cfg8.bias_correction and not cfg8.a_unsigned_nonneg and "cle" in cfg8.pre_passes
    cfg48, _ = qcompiler.Config(w_bits=4).with_recipe(CNN_OPS)
    assert cfg48.gptq and not cfg48.a_unsigned_nonneg


def test_transformer_and_vit_recipes():
    """Transformer: smooth then rotate at W8A8, rotate then smooth below, hadamard_* listed in float;
    ViT: reparam, both parts."""
    cfg, rec = qcompiler.Config(exclude=("pooler*",)).with_recipe(MINILM_OPS)
    assert cfg.pre_passes[-2:] == ("smooth", "rotate") and cfg.exclude == ("pooler*", "hadamard_*")
    assert rec["settings"]["exclude"] == ["pooler*", "hadamard_*"]
    for w, a in ((6, 6), (4, 8), (4, 4)):
        low, _ = qcompiler.Config(w_bits=w, a_bits=a).with_recipe(MINILM_OPS)
        assert low.pre_passes[-2:] == ("rotate", "smooth"), (w, a)
    for target in ("onnx", "reference"):  # the ONNX backend exports the log-sqrt2 softmax split
        cfg, _ = qcompiler.Config(target=target).with_recipe(VIT_OPS)
        assert cfg.reparam == ("layernorm", "softmax") and cfg.log_act == ()
    cfg, _ = qcompiler.Config(w_bits=4, a_bits=4).with_recipe(VIT_OPS)  # below 8-bit activations: post-GELU log
    assert cfg.log_act == ("gelu",) and cfg.quantize_passes().index("log_act") < cfg.quantize_passes().index("calibrate")


def test_integer_mode_gets_only_what_lowering_supports():
    """With integer lowering: no rotate (float Hadamard), no reparam, no unsigned grid; the notes say why."""
    for ops in (MINILM_OPS, VIT_OPS):
        cfg, rec = qcompiler.Config(integer=True, target="reference").with_recipe(ops)
        assert cfg.pre_passes == qcompiler.Config().pre_passes and not cfg.reparam and rec["notes"]
    cfg, _ = qcompiler.Config(integer=True, target="reference", a_bits=6).with_recipe(VIT_OPS)
    assert cfg.log_act == ()  # Config(log_act=..., integer=True) is an error
    cfg, rec = qcompiler.Config(integer=True, target="reference", a_bits=6).with_recipe(CNN_OPS)
    assert not cfg.a_unsigned_nonneg and "cle" in cfg.pre_passes and rec["notes"]


def test_explicit_passes_override_the_auto_recipe():
    """A Config that names passes itself gets no recipe; the record says which fields overrode it."""
    for kw, field in [({"gptq": True}, "gptq"), ({"passes": ("cle",)}, "passes"),
                      ({"pre_passes": BASE_PRE_PASSES}, "pre_passes"), ({"reparam": ("layernorm",)}, "reparam")]:
        cfg0 = qcompiler.Config(**kw)
        cfg, rec = cfg0.with_recipe(CNN_OPS)
        assert cfg is cfg0 and rec["name"] == "none" and field in rec["reason"]
    cfg0 = qcompiler.Config(recipe="none", w_bits=4)
    cfg, rec = cfg0.with_recipe(CNN_OPS)
    assert cfg is cfg0 and rec["name"] == "none" and rec["pattern"] == "cnn"


def test_named_recipe_keeps_explicit_fields_and_is_idempotent():
    """recipe=NAME applies whatever the graph is; fields the Config sets win; applying it again changes nothing."""
    mine = (*BASE_PRE_PASSES, "smooth", "rotate")
    cfg, rec = qcompiler.Config(recipe="cnn", w_bits=4, pre_passes=mine).with_recipe(MINILM_OPS)
    assert rec["name"] == "cnn" and rec["pattern"] == "transformer"
    assert cfg.pre_passes == mine and cfg.gptq and cfg.bias_correction and "pre_passes" not in rec["settings"]
    again, _ = cfg.with_recipe(MINILM_OPS)
    assert again == cfg
    with pytest.raises(qcompiler.QCError, match="unknown recipe"):
        qcompiler.Config(recipe="resnet")


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_manifest_records_recipe_what_ran_and_declines(small_cnn):
    """compile() records the recipe chosen, the passes of it that ran, and each pass's decline reasons."""
    torch.manual_seed(0)
    x = {"x": np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)}
    art = qcompiler.compile(_MLP().eval(), x, config=qcompiler.Config(recipe="cnn", w_bits=4, a_bits=4),
                            example_inputs=(torch.randn(2, 8),))
    r = art.manifest["recipe"]
    assert r["name"] == "cnn" and r["pattern"] == "generic" and r["ran"] == ["cle", "gptq", "bias_correction"]
    assert art.manifest["config"]["recipe"] == "cnn" and art.manifest["config"]["a_unsigned_nonneg"]
    ex = (torch.randn(2, 3, 16, 16),)
    calib = {"x": np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32)}
    r = qcompiler.compile(small_cnn, calib, example_inputs=ex).manifest["recipe"]
    assert r["name"] == "cnn" and r["requested"] == "auto" and "conv2d x2" in r["evidence"]
    assert r["declined"] == {"cle": ["no candidates in this graph"]}  # conv -> relu -> max-pool -> conv: no pair
    r = qcompiler.compile(small_cnn, calib, example_inputs=ex, config=qcompiler.Config(gptq=True)).manifest["recipe"]
    assert r["name"] == "none" and "gptq" in r["reason"]


def test_unsigned_grid_for_non_negative_activations(small_cnn):
    """a_unsigned_nonneg: an activation calibrated >= 0 is quantized on [0, 2^b - 1] with zero point 0; others stay signed."""
    g = qcompiler.trace(small_cnn, (torch.randn(2, 3, 16, 16),), input_names=["x"])
    calib = CalibData({"x": np.random.default_rng(2).standard_normal((16, 3, 16, 16)).astype(np.float32)})
    cfg = qcompiler.Config(a_bits=4, a_unsigned_nonneg=True, recipe="none")
    _, q, _ = qcompiler.compiler.quantize(g, calib, cfg)
    acts = {n.name: [v for v in n.meta["qc"]["inputs"].values() if v["role"] == "act"][0] for n in q.nodes
            if "qc" in n.meta}
    signed = {name: a["spec"].signed for name, a in acts.items()}
    assert list(signed.values()).count(True) == 1  # the network input has negative values; post-ReLU tensors do not
    for a in acts.values():
        qp = a["qparams"]
        assert qp.spec == a["spec"]
        if not a["spec"].signed:
            assert (a["spec"].qmin, a["spec"].qmax) == (0, 15) and int(qp.zero_point) == 0
    with pytest.raises(qcompiler.QCError, match="integer"):
        qcompiler.Config(a_unsigned_nonneg=True, integer=True, target="reference")


def test_op_counts_names_ops_without_namespace(small_cnn):
    """op_counts gives short ATen names, what detect_pattern reads."""
    g = qcompiler.trace(small_cnn, (torch.randn(2, 3, 16, 16),), input_names=["x"])
    ops = op_counts(g)
    assert ops["conv2d"] == 2 and ops["relu"] == 2 and detect_pattern(ops)[0] == "cnn"
