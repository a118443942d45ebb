"""Config: every option of a compilation, nameable from the CLI and recorded in the manifest."""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, replace
from typing import Mapping

from .errors import QCError
from .qspec import OBSERVERS, QuantSpec

DEFAULT_OPS = ("linear", "conv1d", "conv2d", "conv3d", "matmul", "bmm", "mm", "addmm", "embedding")
TARGETS = ("onnx", "reference", "tvm-llvm", "tvm-cuda")  # the tvm targets take ":MCPU" / ":ARCH"
BASE_PRE_PASSES = ("remove_identities", "fold_bn", "fold_constants", "fold_additive_mask")


@dataclass
class Config:
    target: str = "onnx"
    w_bits: int = 8
    a_bits: int = 8
    w_granularity: str = "channel"  # channel | tensor | group
    w_group_size: int = 0
    a_symmetric: bool = True  # int8 symmetric activations: what TensorRT's explicit quantization expects
    a_unsigned_nonneg: bool = False  # activations calibrated >= 0 (post-ReLU, post-Softmax) on [0, 2^b-1], zero point 0
    observer: str = "minmax"  # activations; weights always use min-max of the exact tensor
    percentile: float = 99.99
    op_types: tuple[str, ...] = DEFAULT_OPS
    include: tuple[str, ...] = ()  # node-name glob patterns; empty = all
    exclude: tuple[str, ...] = ()  # node-name glob patterns kept in float
    passes: tuple[str, ...] = ()  # extra passes (names or module:Class) run before quantization
    # float-exact passes before quantization; SmoothQuant is on by default: measured neutral on the
    # Fashion-MNIST CNN/ViT and 0.982 -> 0.997 embedding cosine on MiniLM (bench/accuracy.py)
    pre_passes: tuple[str, ...] = (*BASE_PRE_PASSES, "smooth")
    gptq: bool = False  # GPTQ weight rounding on calibration data (passes/gptq.py); else round to nearest
    bias_correction: bool = False  # subtract the expected output shift of weight quantization (passes/bias_correction.py)
    reparam: tuple[str, ...] = ()  # RepQ-ViT reparameterization parts: "layernorm", "softmax" (passes/reparam.py)
    log_act: tuple[str, ...] = ()  # log quantizers for post-"softmax" / post-"gelu" activations (passes/log_act.py)
    log_act_base: str = "sqrt2"  # their base: "2" (shift-only levels) or "sqrt2"
    integer: bool = False  # lower to an integer-only graph (qc:: integer ops; see passes/lower_integer.py)
    allow_float: tuple[str, ...] = ()  # node names (globs) allowed to stay float islands in an integer graph
    int_internal_bits: int = 16  # integer mode: bits of tensors that do not only feed matmuls (residuals, LN inputs)
    recipe: str = "auto"  # auto | none | a name in RECIPES: the pass combination per architecture (see with_recipe)
    calib_batch_size: int = 8
    verify_each: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.target.partition(":")[0] not in TARGETS or (":" in self.target and not self.target.startswith("tvm-")):
            raise QCError(f"unknown target '{self.target}' (choose from {', '.join(TARGETS)})")
        if self.observer not in OBSERVERS:
            raise QCError(f"unknown observer '{self.observer}' (choose from {', '.join(OBSERVERS)})")
        self.weight_spec(), self.act_spec()  # validates bits and granularity
        bad = [p for p in self.reparam if p not in ("layernorm", "softmax")]
        if bad:
            raise QCError(f"unknown reparam part(s) {bad} (choose from layernorm, softmax)")
        bad = [p for p in self.log_act if p not in ("softmax", "gelu")]
        if bad:
            raise QCError(f"unknown log_act kind(s) {bad} (choose from softmax, gelu)")
        if self.log_act_base not in ("2", "sqrt2"):
            raise QCError(f"unknown log_act_base '{self.log_act_base}' (choose from 2, sqrt2)")
        if self.log_act and self.integer:
            raise QCError("log_act and integer lowering do not combine: integer kernels have no log quantizer")
        if self.recipe not in ("auto", "none", *RECIPES):
            raise QCError(f"unknown recipe '{self.recipe}' (choose from auto, none, {', '.join(RECIPES)})")
        if self.a_unsigned_nonneg and self.integer:
            raise QCError("a_unsigned_nonneg and integer lowering do not combine yet: integer lowering expects "
                          "signed activation grids")
        if self.reparam and self.integer:
            raise QCError("reparam and integer lowering do not combine yet: integer mode already quantizes every "
                          "LayerNorm output at its producer")

    def quantize_passes(self) -> list[str]:
        """The quantization pipeline, in order: annotate, [annotate_integer], [sensitivity,
        mixed_precision], [reparam_prepare], calibrate, [reparam], [gptq], [bias_correction], fake_quant."""
        mixed = ["sensitivity", "mixed_precision"] if self.extra.get("mixed_precision") else []
        return ["annotate", *(["annotate_integer"] if self.integer else []), *mixed,
                *(["log_act"] if self.log_act else []), *(["reparam_prepare"] if self.reparam else []), "calibrate", *(["reparam"] if self.reparam else []),
                *(["gptq"] if self.gptq else []), *(["bias_correction"] if self.bias_correction else []), "fake_quant"]

    def weight_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.w_bits, signed=True, symmetric=True, granularity=self.w_granularity, axis=0,
                         group_size=self.w_group_size, narrow_range=True, observer="minmax")

    def act_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.a_bits, signed=True, symmetric=self.a_symmetric, granularity="tensor",
                         observer=self.observer, percentile=self.percentile, unsigned_if_nonneg=self.a_unsigned_nonneg)

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def explicit_passes(self) -> list[str]:
        """The recipe-controlled fields this Config sets itself (differing from the defaults)."""
        default = Config.__dataclass_fields__
        return [f for f in RECIPE_FIELDS if getattr(self, f) != (default[f].default if default[f].default_factory
                                                                is MISSING else default[f].default_factory())]

    def with_recipe(self, ops: Mapping[str, int]) -> tuple["Config", dict]:
        """This Config with its recipe applied, and the record of the choice for the manifest.

        `ops` counts the graph's op kinds (short ATen names, e.g. {"conv2d": 4, "relu": 5}).
        recipe "auto": the recipe of the detected pattern (detect_pattern), unless the Config
        names passes itself (explicit_passes): then none runs, and the record says which
        fields overrode it. A named recipe runs whatever the graph is, and the fields the
        Config sets itself win over the recipe's. "none": the Config as given. Applying a
        recipe twice gives the same Config."""
        pattern, evidence = detect_pattern(ops)
        rec = {"requested": self.recipe, "pattern": pattern, "evidence": evidence}
        explicit = self.explicit_passes()
        if self.recipe == "none":
            return self, {**rec, "name": "none", "reason": "recipe 'none' asked for", "settings": {}, "notes": []}
        if self.recipe == "auto" and explicit:
            return self, {**rec, "name": "none", "settings": {}, "notes": [],
                          "reason": f"explicit pass settings override the recipe: {', '.join(explicit)}"}
        name = pattern if self.recipe == "auto" else self.recipe
        settings, notes = RECIPES[name](self)
        settings = {k: v for k, v in settings.items() if k not in explicit or self.recipe == "auto"}
        if "exclude" in settings:  # added to the Config's own float patterns
            settings["exclude"] = tuple(dict.fromkeys((*self.exclude, *settings["exclude"])))
        cfg = replace(self, **settings, recipe=name, extra=dict(self.extra))
        rec.update(name=name, reason="detected pattern" if self.recipe == "auto" else "recipe named in the config",
                   settings={k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}, notes=notes)
        return cfg, rec


# -- recipes --------------------------------------------------------------------------------
# The fields a recipe chooses; a Config that sets any of them itself gets no "auto" recipe.
RECIPE_FIELDS = ("pre_passes", "passes", "gptq", "bias_correction", "reparam", "a_unsigned_nonneg", "log_act")


def detect_pattern(ops: Mapping[str, int]) -> tuple[str, str]:
    """(pattern, evidence) from the op kinds present in a graph:
    transformer: LayerNorm and Softmax (attention) and no convolution - a text encoder (MiniLM);
    vit: LayerNorm, Softmax and a convolution (the patch embedding);
    cnn: convolutions without LayerNorm or Softmax;
    generic: anything else."""
    has = {k for k, v in ops.items() if v}
    conv = sorted(has & {"conv1d", "conv2d", "conv3d"})
    seen = ", ".join(f"{k} x{ops[k]}" for k in sorted(has & {"layer_norm", "softmax", "_softmax", "gelu", "relu",
                                                               "conv1d", "conv2d", "conv3d", "embedding",
                                                               "linear", "batch_norm", "_native_batch_norm_legit_no_training"}))
    attention = "layer_norm" in has and has & {"softmax", "_softmax"}
    if attention and not conv:
        return "transformer", f"LayerNorm and Softmax, no convolution ({seen})"
    if attention:
        return "vit", f"LayerNorm, Softmax and a convolution patch embedding ({seen})"
    if conv and "layer_norm" not in has:
        return "cnn", f"convolutions without LayerNorm or attention ({seen})"
    return "generic", f"no transformer or CNN pattern ({seen or 'no conv/linear/norm ops'})"


def _low_bits(cfg: Config) -> tuple[dict, list[str]]:
    """What every recipe adds below 8 bits: GPTQ at <= 4-bit weights; the unsigned grid for
    non-negative activations below 8-bit activations (at 8 bits the signed grid TensorRT
    expects costs nothing measurable; at 4 bits a symmetric int4 grid leaves a post-ReLU
    tensor 8 of its 16 levels)."""
    s = {"gptq": cfg.w_bits <= 4, "a_unsigned_nonneg": cfg.a_bits < 8 and not cfg.integer}
    notes = ["unsigned activation grid declined: integer lowering expects signed grids"] \
        if cfg.integer and cfg.a_bits < 8 else []
    return s, notes


def _transformer(cfg: Config) -> tuple[dict, list[str]]:
    """smooth and rotate, with rotate's online Hadamard matmuls (hadamard_*) in float; below W8A8
    rotate runs first.

    Order: MiniLM (bench/accuracy.py's "transformer recipe, ..." rows: ORT, 64 calibration / 256
    evaluation sentences, cosine mean / min and nearest-neighbour agreement), rotate then smooth vs
    smooth then rotate, smooth's alpha searched
    at the run's widths, the same low-bit additions: W8A8 0.9988 / 0.9968 / 0.918 vs 0.9987 / 0.9964
    / 0.957 (equal cosines, the retrieval agreement better with smooth first), W6A6 0.9835 / 0.9644
    vs 0.9812 / 0.9503, W4A8 0.9582 / 0.9154 vs 0.9559 / 0.8707, W4A4 0.7103 / 0.4940 vs 0.5521 /
    0.2532 (the rotation first spreads the outlier channels, smoothing then balances what is left).
    Hadamard matmuls in float: measured more accurate than quantizing them (passes/rotate.py).
    An accuracy choice, not an ONNX export limit: quantized, the ONNX backend exports them as
    ordinary QDQ matmuls with a constant operand that match the fake-quant graph
    (tests/backends/test_onnx_backend.py)."""
    low, notes = _low_bits(cfg)
    if cfg.integer:
        return low, notes + ["rotate declined: integer lowering has no float islands for the online Hadamard "
                             "matmuls; smooth (the default) only"]
    order = ("smooth", "rotate") if min(cfg.w_bits, cfg.a_bits) >= 8 else ("rotate", "smooth")
    return ({"pre_passes": (*BASE_PRE_PASSES, *order), "exclude": ("hadamard_*",), **low},
            notes + ["the online Hadamard matmuls (hadamard_*) that rotate adds stay in float"])


def _vit(cfg: Config) -> tuple[dict, list[str]]:
    low, notes = _low_bits(cfg)
    if cfg.integer:
        return low, notes + ["reparam declined: it does not combine with integer lowering yet; smooth (the "
                             "default) only"]
    # both parts on every float-quantized target: the ONNX backend exports the log-sqrt2 softmax
    # split as standard ops, bit-exact to the torch kernels (fashion_vit on ORT, 2026-12-04: W4A4
    # 0.8588 -> 0.8669 top-1 with the softmax part, W6A6 0.8789 -> 0.8796; FP32 0.8805).
    # Below 8-bit activations, the log-sqrt2 quantizer for the post-GELU fc2 inputs too (W4A4 0.8669 ->
    # 0.8715; alone over the min-max baseline 0.8027 -> 0.8593); at W8A8 it measured neutral (0.8798
    # vs 0.8799), so 8-bit activations keep the uniform grid there.
    log = {"log_act": ("gelu",)} if cfg.a_bits < 8 else {}
    return {"pre_passes": BASE_PRE_PASSES, "reparam": ("layernorm", "softmax"), **log, **low}, notes


def _cnn(cfg: Config) -> tuple[dict, list[str]]:
    low, notes = _low_bits(cfg)
    return {"pre_passes": (*BASE_PRE_PASSES, "cle"), "bias_correction": cfg.w_bits <= 4, **low}, notes


def _generic(cfg: Config) -> tuple[dict, list[str]]:
    return {}, ["no recipe for this pattern: the default passes"]


RECIPES = {"transformer": _transformer, "vit": _vit, "cnn": _cnn, "generic": _generic}
