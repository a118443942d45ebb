"""How a tensor is quantized (QuantSpec), its parameters (QParams), and the observers that
pick those parameters from calibration data.

Conventions (TensorFlow quantization whitepaper / ONNX):
    q = clamp(round(x / s) + z, qmin, qmax),   x_hat = (q - z) * s
Symmetric specs have z = 0 and, for signed types, a restricted range [-(2^(b-1)-1), 2^(b-1)-1]
for weights (so -128 never appears in int8 weights, as TensorRT expects).

`unsigned_if_nonneg` (activations, per-tensor): a tensor whose calibrated minimum is >= 0
(post-ReLU, post-Softmax, an image in [0, 1]) is quantized on [0, 2^b - 1] with zero point 0
instead of the signed grid, whose negative half such a tensor never uses: int4 symmetric
keeps 8 levels for it, uint4 16. The observer returns QParams whose spec says unsigned.

Log specs (`log_base` "2" or "sqrt2", RepQ-ViT) quantize non-negative power-law activations
(post-Softmax) instead: q = clamp(round(-k log2(x / s)), 0, 2^b - 1), x_hat = s 2^(-q/k),
k = 1 or 2, with the top code 2^b - 1 meaning 0 (qcompiler.ops.fake_quant_log2). Their scale
is the observed maximum, their zero point 0, and they are always per-tensor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import torch

from .errors import QCError
from .ops import fake_quant, fake_quant_log2

Granularity = Literal["tensor", "channel", "group"]
OBSERVERS = ("minmax", "percentile", "mse", "kl")
LOG_BASES = {"": 0, "2": 1, "sqrt2": 2}  # log_base -> root k of base 2^(1/k) (0: uniform)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = "tensor"
    axis: int = 0  # channel axis (per-channel) or grouped axis (per-group)
    group_size: int = 0
    observer: str = "minmax"
    narrow_range: bool = False  # symmetric signed: use [-(2^(b-1)-1), 2^(b-1)-1]
    percentile: float = 99.99
    log_base: str = ""  # "" uniform; "2" / "sqrt2": log quantizer of non-negative values (see module doc)
    unsigned_if_nonneg: bool = False  # per-tensor: a tensor calibrated >= 0 gets the unsigned grid, zero point 0

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise QCError(f"bits must be between 2 and 16, got {self.bits}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise QCError(f"granularity must be tensor, channel or group, got '{self.granularity}'")
        if self.granularity == "group" and self.group_size <= 0:
            raise QCError("per-group quantization needs group_size > 0")
        if self.observer not in OBSERVERS:
            raise QCError(f"unknown observer '{self.observer}' (choose from {', '.join(OBSERVERS)})")
        if self.log_base not in LOG_BASES:
            raise QCError(f"unknown log_base '{self.log_base}' (choose from '', '2', 'sqrt2')")
        if self.log_base and self.granularity != "tensor":
            raise QCError("log quantizers are per-tensor (granularity 'tensor')")

    @property
    def log_root(self) -> int:
        """k of the log quantizer's base 2^(1/k): 1 for log2, 2 for log-sqrt2, 0 for uniform specs."""
        return LOG_BASES[self.log_base]

    @property
    def qmin(self) -> int:
        if self.log_base:
            return 0
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)
        return 0

    @property
    def qmax(self) -> int:
        if self.log_base:
            return 2**self.bits - 1  # the zero code (x_hat = 0)
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def axis_and_group(self) -> tuple[int, int]:
        """(axis, group_size) as qc::fake_quant takes them (0, 0 for per-tensor)."""
        return (self.axis if self.granularity != "tensor" else 0, self.group_size if self.granularity == "group" else 0)

    def to_json(self) -> dict:
        return asdict(self)

    def with_(self, **kw) -> "QuantSpec":
        return replace(self, **kw)

    def describe(self) -> str:
        g = {"tensor": "per-tensor", "channel": f"per-channel(axis={self.axis})",
             "group": f"per-group({self.group_size}, axis={self.axis})"}[self.granularity]
        if self.log_base:
            return f"log{'√2' if self.log_base == 'sqrt2' else '2'} {self.bits}-bit {g}"
        return f"{'int' if self.signed else 'uint'}{self.bits} {'sym' if self.symmetric else 'asym'} {g}"


def default_weight_spec(bits: int = 8) -> QuantSpec:
    return QuantSpec(bits=bits, signed=True, symmetric=True, granularity="channel", axis=0, narrow_range=True)


def default_act_spec(bits: int = 8, observer: str = "minmax") -> QuantSpec:
    return QuantSpec(bits=bits, signed=True, symmetric=False, granularity="tensor", observer=observer)


@dataclass
class QParams:
    scale: torch.Tensor  # float32; shape per QuantSpec granularity (see ops.expand_qparam)
    zero_point: torch.Tensor  # int32, same shape
    spec: QuantSpec

    def to_json(self) -> dict:
        return {"scale": [float(v) for v in self.scale.flatten()],
                "zero_point": [int(v) for v in self.zero_point.flatten()],
                "shape": list(self.scale.shape)}


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """x through qc::fake_quant (qc::fake_quant_log2 for log specs) with the given QParams."""
    if qp.spec.log_base:
        return fake_quant_log2(x, qp.scale, qp.spec.bits, qp.spec.log_root)
    return fake_quant(x, qp.scale, qp.zero_point, qp.spec.qmin, qp.spec.qmax, *qp.spec.axis_and_group)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [lo, hi] (widened to contain 0) onto [qmin, qmax]."""
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    qmin, qmax = spec.qmin, spec.qmax
    eps = torch.finfo(torch.float32).tiny * 2**10
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        if spec.signed:
            scale = amax / float(qmax)
            zp = torch.zeros_like(scale, dtype=torch.int32)
        else:  # symmetric unsigned: a zero point in the middle of the range
            scale = 2 * amax / float(qmax - qmin)
            zp = torch.full_like(scale, (qmax + qmin + 1) // 2, dtype=torch.int32)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        scale = torch.where(scale > eps, scale, torch.ones_like(scale))
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    scale = torch.where(scale > eps, scale, torch.ones_like(scale))
    return scale.to(torch.float32), zp


# -- observers ------------------------------------------------------------------------------

_SAMPLE_CAP = 1 << 18


class Observer:
    """Accumulates statistics over calibration batches and turns them into QParams.

    min/max are exact over all data; percentile, MSE and KL use a deterministic strided
    subsample of at most 2^18 values per tensor (plus the exact extremes).
    """

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.n_samples = 0
        self.batches = 0

    def _reduce_dims(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.granularity == "tensor":
            return x.reshape(1, -1)
        ax = s.axis % x.dim()
        xt = x.movedim(ax, 0)
        if s.granularity == "channel":
            return xt.reshape(xt.shape[0], -1)
        raise QCError("per-group quantization is for weights (use QParams from weights directly)")

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise QCError("calibration produced NaN or inf values")
        if x.numel() == 0:
            return
        rows = self._reduce_dims(x)
        lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.batches += 1
        if self.spec.observer != "minmax" and self.n_samples < _SAMPLE_CAP * 4:
            flat = rows.reshape(-1) if self.spec.granularity == "tensor" else rows
            step = max(1, flat.shape[-1] // 65536)
            sub = flat[..., ::step].clone()
            self.samples.append(sub)
            self.n_samples += sub.shape[-1]

    def qparams(self) -> QParams:
        if self.lo is None:
            raise QCError("no calibration data reached this tensor")
        spec = self.spec
        lo, hi = self.lo, self.hi
        if spec.log_base:  # scale = the observed maximum, whatever the observer
            eps = torch.finfo(torch.float32).tiny * 2**10
            scale = torch.where(hi > eps, hi, torch.ones_like(hi)).float().reshape(())
            return QParams(scale, torch.zeros((), dtype=torch.int32), spec)
        if spec.unsigned_if_nonneg and spec.granularity == "tensor" and float(lo.min()) >= 0.0:
            spec = spec.with_(signed=False, symmetric=False, unsigned_if_nonneg=False)  # lo = 0 -> zero point 0
        if spec.observer != "minmax" and self.samples:
            data = torch.cat(self.samples, dim=-1)
            if spec.granularity == "tensor":
                lo, hi = _search_range(data.reshape(1, -1), lo, hi, spec)
            else:
                lo, hi = _search_range(data, lo, hi, spec)
        scale, zp = qparams_from_range(lo, hi, spec)
        if spec.granularity == "tensor":
            scale, zp = scale.reshape(()), zp.reshape(())
        return QParams(scale, zp, spec)


def _search_range(data: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """Clipping range per row by percentile, MSE search or KL (histogram) search."""
    los, his = [], []
    for i in range(data.shape[0]):
        row = data[i]
        if spec.observer == "percentile":
            p = spec.percentile / 100.0
            a = torch.quantile(row.double()[: 1 << 24], torch.tensor([1 - p, p], dtype=torch.float64)).float()
            l, h = a[0], a[1]
        elif spec.observer == "mse":
            l, h = _mse_range(row, lo[i], hi[i], spec)
        else:
            l, h = _kl_range(row, lo[i], hi[i], spec)
        los.append(torch.minimum(l, torch.zeros(()))), his.append(torch.maximum(h, torch.zeros(())))
    return torch.stack(los), torch.stack(his)


def _fq(x, scale, zp, spec):
    q = torch.clamp(torch.round(x / scale) + zp, spec.qmin, spec.qmax)
    return (q - zp) * scale


def _mse_range(row, lo, hi, spec):
    """Shrink [lo, hi] by factors from 1 down to 0.01 (log-spaced) and keep the one with
    the least squared error on the sample."""
    best, best_err = (lo, hi), float("inf")
    for f in torch.logspace(0.0, -2.0, 121):
        l, h = lo * f, hi * f
        s, z = qparams_from_range(l.reshape(1), h.reshape(1), spec)
        err = float(((_fq(row, s, z.float(), spec) - row) ** 2).mean())
        if err < best_err * (1 - 1e-9):
            best, best_err = (l, h), err
    return best


def _kl_range(row, lo, hi, spec, bins: int = 2048):
    """TensorRT-style entropy calibration on |x|: the clip threshold whose quantized
    histogram has the least KL divergence from the reference (clipped) histogram."""
    amax = float(torch.maximum(-lo, hi))
    if amax == 0.0:
        return lo, hi
    hist = np.histogram(row.abs().numpy(), bins=bins, range=(0.0, amax))[0].astype(np.float64)
    nq = (spec.qmax - spec.qmin + 1) // 2 if spec.symmetric or spec.signed else spec.qmax - spec.qmin + 1
    nq = max(nq, 2)
    best_i, best_kl = bins, float("inf")
    for i in range(max(nq, bins // 16), bins + 1, max(1, bins // 256)):
        ref = hist[:i].copy()
        ref[i - 1] += hist[i:].sum()
        # quantize the first i bins into nq levels, spread back over the non-empty bins
        edges = np.linspace(0, i, nq + 1).astype(int)
        q = np.zeros(i)
        for a, b in zip(edges[:-1], edges[1:]):
            if b <= a:
                continue
            seg = hist[a:b]
            nz = seg > 0
            if nz.any():
                q[a:b][nz] = seg.sum() / nz.sum()
        p = ref / max(ref.sum(), 1e-12)
        qq = q / max(q.sum(), 1e-12)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(qq[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    thr = amax * best_i / bins
    scale = lambda v: torch.clamp(v, -thr, thr)  # noqa: E731
    return scale(lo), scale(hi)


def weight_qparams(w: torch.Tensor, spec: QuantSpec) -> QParams:
    """QParams for a constant weight: per-channel/tensor by the spec's observer, per-group by min-max."""
    if spec.granularity == "group":
        ax = spec.axis % w.dim()
        n = w.shape[ax]
        g = spec.group_size
        pad = (-n) % g
        wt = w.detach().float().movedim(ax, -1)
        if pad:
            wt = torch.nn.functional.pad(wt, (0, pad))
        blocks = wt.reshape(*wt.shape[:-1], -1, g)
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        scale, zp = qparams_from_range(lo, hi, spec)
        return QParams(scale.movedim(-1, ax).contiguous(), zp.movedim(-1, ax).contiguous(), spec)
    obs = Observer(spec)
    obs.observe(w)
    return obs.qparams()
