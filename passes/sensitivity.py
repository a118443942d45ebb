"""Hessian-trace sensitivity of each quantized layer (HAWQ-V2/V3), and the perturbation
Omega that the mixed-precision ILP minimizes.

For a layer with weight W_i (n_i entries) and loss L over the calibration set:
    Tr(H_i) = E_v[v^T H_i v],  v ~ Rademacher (Hutchinson),  H_i = d^2 L / dW_i^2,
    H_i v   = d/dW_i (g_i . v),  g_i = dL/dW_i   (double backprop through the float graph),
    Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2     (HAWQ-V3, eq. 2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qcompiler.calib import CalibData
from qcompiler.errors import QCError
from qcompiler.ir import QMETA, Graph
from qcompiler.pipeline import EXACT, Pass, PassContext, PassResult, register
from qcompiler.qspec import QuantSpec, fake_quantize, weight_qparams

from .quantize import layers

LOSSES = ("auto", "ce", "kl", "mse")


def weight_input(node) -> int | None:
    """The arg index of a layer's weight input, or None for activation-only layers."""
    return next((i for i, q in sorted(node.meta[QMETA]["inputs"].items()) if q["role"] == "weight"), None)


def _loss_fn(kind: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ce: cross entropy to integer labels; kl: KL(softmax(target) || softmax(out)), batch mean;
    mse: mean squared error to target (labels or the float outputs)."""
    if kind == "ce":
        return F.cross_entropy(out, target.long())
    if kind == "kl":
        return F.kl_div(F.log_softmax(out, -1), F.log_softmax(target, -1), reduction="batchmean", log_target=True)
    return F.mse_loss(out, target.to(out.dtype))


def _pick_loss(loss: str, labels, out: torch.Tensor) -> str:
    if loss not in LOSSES:
        raise QCError(f"unknown sensitivity loss '{loss}' (choose from {', '.join(LOSSES)})")
    if loss != "auto":
        return loss
    if labels is not None:
        return "ce"
    return "kl" if out.dim() == 2 and out.shape[-1] > 1 else "mse"  # 2-D: classifier logits


def hutchinson_traces(graph: Graph, calib: CalibData, *, loss: str = "auto", labels=None, max_iters: int = 50,
                      tol: float = 1e-2, seed: int = 0, progress: bool = True, max_batches: int | None = None,
                      min_iters: int = 4) -> dict[str, dict]:
    """Per annotated layer with a weight: {"trace", "n_params", "iters", "rel_std"}.

    The loss is taken on the graph's first output: with `labels` (one per calibration sample)
    cross entropy ("ce", default) or MSE; without, a distillation loss to the graph's own
    float outputs, KL for 2-D logits and MSE otherwise. The full-set loss is
    L = sum_b (n_b / N) L_b, so Tr(H) = sum_b (n_b / N) Tr(H_b); each batch's trace is the mean
    of v^T H_b v over iterations (one gradient graph per batch, reused), stopping once the
    standard error of the mean is below `tol` times |mean| for every layer, or at `max_iters`.
    rel_std is the resulting standard error of the total, relative to it.
    """
    nodes = [n for n in layers(graph) if weight_input(n) is not None]
    if not nodes:
        return {}
    calib.validate(graph.inputs)
    gm = graph.gm
    wnodes = [n.args[weight_input(n)] for n in nodes]
    originals = {w.target: graph.attr(w) for w in wnodes}
    params = {t: v.detach().clone().float().requires_grad_(True) for t, v in originals.items()}
    gen = torch.Generator().manual_seed(seed)
    batches = list(calib.batches(graph.inputs, max_batches))
    total = sum(b[0].shape[0] for b in batches)
    tr = {n.name: 0.0 for n in nodes}
    var = {n.name: 0.0 for n in nodes}
    iters = 0
    kind = None
    try:
        for t, p in params.items():
            _set(gm, t, p)
        bar = tqdm(total=len(batches), desc="sensitivity", unit="batch", leave=False, disable=None if progress else True)
        start = 0
        for args in batches:
            nb = args[0].shape[0]
            with torch.enable_grad():
                out = _first(gm(*args))
                kind = kind or _pick_loss(loss, labels, out.detach())
                # without labels: distil to the float outputs, i.e. this same forward pass, detached
                target = out.detach() if labels is None else torch.as_tensor(labels[start:start + nb])
                start += nb
                ws = [params[w.target] for w in wnodes]
                grads = torch.autograd.grad(_loss_fn(kind, out, target), ws, create_graph=True)
                samples: list[list[float]] = [[] for _ in nodes]
                for k in range(max_iters):
                    vs = [torch.randint(0, 2, w.shape, generator=gen).to(w.dtype) * 2 - 1 for w in ws]
                    hvs = torch.autograd.grad(grads, ws, grad_outputs=vs, retain_graph=True, allow_unused=True)
                    for s, v, hv in zip(samples, vs, hvs):
                        s.append(0.0 if hv is None else float((v * hv).sum()))
                    if k + 1 >= min_iters and all(_sem(s) <= tol * abs(_mean(s)) for s in samples):
                        break
            iters = max(iters, k + 1)
            wb = nb / total
            for n, s in zip(nodes, samples):
                tr[n.name] += wb * _mean(s)
                var[n.name] += wb * wb * _sem(s) ** 2
            bar.update(1)
        bar.close()
    finally:
        for t, v in originals.items():
            _set(gm, t, v)
    return {n.name: {"trace": tr[n.name], "n_params": int(originals[w.target].numel()), "iters": iters,
                     "rel_std": math.sqrt(var[n.name]) / abs(tr[n.name]) if tr[n.name] else 0.0, "loss": kind}
            for n, w in zip(nodes, wnodes)}


def _set(gm, target: str, value: torch.Tensor) -> None:
    *path, leaf = target.split(".")
    mod = gm
    for p in path:
        mod = getattr(mod, p)
    setattr(mod, leaf, value)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _mean(s: list[float]) -> float:
    return sum(s) / len(s)


def _sem(s: list[float]) -> float:
    """Standard error of the mean (0 for a single sample)."""
    if len(s) < 2:
        return 0.0
    m = _mean(s)
    return math.sqrt(sum((x - m) ** 2 for x in s) / (len(s) - 1) / len(s))


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Q_b(W): the fake-quantized weight exactly as InsertFakeQuant will compute it."""
    return fake_quantize(weight.detach().float(), weight_qparams(weight, spec))


def perturbation(weight: torch.Tensor, spec: QuantSpec) -> float:
    """||Q(W) - W||^2 with the recipe's own quantizer (weight_qparams + qc::fake_quant)."""
    return float(((quantize_weight(weight, spec) - weight.detach().float()) ** 2).sum())


def omega(trace: float, n: int, weight: torch.Tensor, spec: QuantSpec) -> float:
    """Omega(b) = Tr(H) / n * ||Q_b(W) - W||^2."""
    return trace / max(n, 1) * perturbation(weight, spec)


@register
class EstimateSensitivity(Pass):
    """Store Hutchinson Hessian traces in each weighted layer's meta["qc"]["sensitivity"].

    Settings from ctx.config.extra["sensitivity"]: loss, labels, max_iters, tol, seed,
    max_batches. The graph itself is not changed."""

    name = "sensitivity"
    numerics = EXACT
    requires = ("annotated",)
    provides = ("sensitivity",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if ctx.calib is None:
            raise QCError("sensitivity estimation needs calibration data")
        opts = dict((getattr(ctx.config, "extra", None) or {}).get("sensitivity", {}))
        res = hutchinson_traces(graph, ctx.calib, **opts)
        for n in layers(graph):
            if n.name in res:
                n.meta[QMETA]["sensitivity"] = res[n.name]
        graph.meta["sensitivity"] = {k: dict(v) for k, v in res.items()}
        return PassResult(graph, False, {"layers": len(res), "iters": max((r["iters"] for r in res.values()), default=0)})
