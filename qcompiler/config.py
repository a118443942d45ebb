"""Config: every option of a compilation, nameable from the CLI and recorded in the manifest."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import QCError
from .qspec import OBSERVERS, QuantSpec

DEFAULT_OPS = ("linear", "conv1d", "conv2d", "conv3d", "matmul", "bmm", "mm", "addmm", "embedding")
TARGETS = ("onnx", "reference", "tvm-llvm", "tvm-cuda")  # the tvm targets take ":MCPU" / ":ARCH"


@dataclass
class Config:
    target: str = "onnx"
    w_bits: int = 8
    a_bits: int = 8
    w_granularity: str = "channel"  # channel | tensor | group
    w_group_size: int = 0
    a_symmetric: bool = True  # int8 symmetric activations: what TensorRT's explicit quantization expects
    observer: str = "minmax"  # activations; weights always use min-max of the exact tensor
    percentile: float = 99.99
    op_types: tuple[str, ...] = DEFAULT_OPS
    include: tuple[str, ...] = ()  # node-name glob patterns; empty = all
    exclude: tuple[str, ...] = ()  # node-name glob patterns kept in float
    passes: tuple[str, ...] = ()  # extra passes (names or module:Class) run before quantization
    # float-exact passes before quantization; SmoothQuant is on by default: measured neutral on the
    # Fashion-MNIST CNN/ViT and 0.982 -> 0.997 embedding cosine on MiniLM (bench/accuracy.py)
    pre_passes: tuple[str, ...] = ("remove_identities", "fold_bn", "fold_constants", "fold_additive_mask", "smooth")
    gptq: bool = False  # GPTQ weight rounding on calibration data (passes/gptq.py); else round to nearest
    bias_correction: bool = False  # subtract the expected output shift of weight quantization (passes/bias_correction.py)
    reparam: tuple[str, ...] = ()  # RepQ-ViT reparameterization parts: "layernorm", "softmax" (passes/reparam.py)
    integer: bool = False  # lower to an integer-only graph (qc:: integer ops; see passes/lower_integer.py)
    allow_float: tuple[str, ...] = ()  # node names (globs) allowed to stay float islands in an integer graph
    int_internal_bits: int = 16  # integer mode: bits of tensors that do not only feed matmuls (residuals, LN inputs)
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
        if self.reparam and self.integer:
            raise QCError("reparam and integer lowering do not combine yet: integer mode already quantizes every "
                          "LayerNorm output at its producer")

    def quantize_passes(self) -> list[str]:
        """The quantization pipeline, in order: annotate, [annotate_integer], [sensitivity,
        mixed_precision], [reparam_prepare], calibrate, [reparam], [gptq], [bias_correction], fake_quant."""
        mixed = ["sensitivity", "mixed_precision"] if self.extra.get("mixed_precision") else []
        return ["annotate", *(["annotate_integer"] if self.integer else []), *mixed,
                *(["reparam_prepare"] if self.reparam else []), "calibrate", *(["reparam"] if self.reparam else []),
                *(["gptq"] if self.gptq else []), *(["bias_correction"] if self.bias_correction else []), "fake_quant"]

    def weight_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.w_bits, signed=True, symmetric=True, granularity=self.w_granularity, axis=0,
                         group_size=self.w_group_size, narrow_range=True, observer="minmax")

    def act_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.a_bits, signed=True, symmetric=self.a_symmetric, granularity="tensor",
                         observer=self.observer, percentile=self.percentile)

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
