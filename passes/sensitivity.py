"""Hessian-trace sensitivity of each quantized layer (HAWQ-V2/V3), and the perturbation
Omega that the mixed-precision ILP minimizes.

For a layer with weight W_i (n_i entries) and loss L over the calibration set:
    Tr(H_i) = E_v[v^T H_i v],  v ~ Rademacher (Hutchinson),  H_i = d^2 L / dW_i^2,
    H_i v   = d/dW_i (g_i . v),  g_i = dL/dW_i   (double backprop through the float graph),
    Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2     (HAWQ-V3, eq. 2).

Activations in the HAWQ-V2 manner: the input a of layer i is fed to that layer alone as
a + d with a zero leaf d, so dL/dd and H_a = d^2 L / dd^2 are the gradient and Hessian w.r.t.
the activation as this layer sees it (upstream weights keep their gradients). Per batch,
    Omega_act(b) = Tr(H_a) / n_a * ||Q_b(a) - a||^2,   averaged over calibration batches,
with Q_b the activation quantizer the recipe uses (its observer over the whole calibration set).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm import tqdm

from qcompiler.calib import CalibData
from qcompiler.errors import QCError
from qcompiler.ir import QMETA, Graph
from qcompiler.pipeline import EXACT, Pass, PassContext, PassResult, register
from qcompiler.qspec import Observer, QParams, QuantSpec, fake_quantize, weight_qparams

from .quantize import layers

LOSSES = ("auto", "ce", "kl", "mse")
# Omega_w(b), a layer's weight perturbation at b bits: "quadratic" is dW^T H dW along the actual
# rounding error dW = Q_b(W) - W (one HVP per layer and width); "trace" is HAWQ-V3's
# Tr(H)/n ||dW||^2, which assumes dW isotropic in H's eigenbasis. The default is "quadratic":
# 2-bit RTN rounds most of a row to 0 (dW ~ -W, far from isotropic) and the trace form then
# under-rates the damage ~20x (fashion_cnn's fc1; bench/pareto.py, README "Mixed precision").
OMEGAS = ("quadratic", "trace")
DEFAULT_OMEGA = "quadratic"


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


def act_inputs(node) -> list[int]:
    """The arg indices of a layer's annotated activation inputs."""
    return [i for i, q in sorted(node.meta[QMETA]["inputs"].items()) if q["role"] == "act"]


class _Tap(fx.Interpreter):
    """Runs the graph; each tapped layer input is replaced, for that layer only, by
    fn(layer name, arg index, value)."""

    def __init__(self, gm, taps: dict[str, list[int]], fn):
        super().__init__(gm)
        self.taps, self.fn = taps, fn

    def run_node(self, n):
        if n.op != "call_function" or not self.taps.get(n.name):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args = list(args)
        for i in self.taps[n.name]:
            args[i] = self.fn(n.name, i, args[i])
        return self.call_function(n.target, tuple(args), kwargs)


def activation_qparams(graph: Graph, calib: CalibData, nodes, a_bits) -> dict[tuple[str, int], dict[int, QParams]]:
    """QParams of each (layer, activation input) at each width in a_bits, from the input's own
    spec and observer over the whole calibration set, as the calibrate pass computes them."""
    obs: dict[tuple[str, int], dict[int, Observer]] = {}
    for n in nodes:
        for i in act_inputs(n):
            spec = n.meta[QMETA]["inputs"][i]["spec"]
            obs[(n.name, i)] = {b: Observer(spec.with_(bits=b)) for b in a_bits}

    def watch(layer, i, v):
        for o in obs[(layer, i)].values():
            o.observe(v)
        return v

    tap = _Tap(graph.gm, {n.name: act_inputs(n) for n in nodes}, watch)
    with torch.no_grad():
        for args in calib.batches(graph.inputs):
            tap.run(*args)
    return {k: {b: o.qparams() for b, o in v.items()} for k, v in obs.items()}


def hutchinson_traces(graph: Graph, calib: CalibData, *, loss: str = "auto", labels=None, max_iters: int = 50,
                      tol: float = 1e-2, seed: int = 0, progress: bool = True, max_batches: int | None = None,
                      min_iters: int = 4, a_bits=None, blockwise: bool = False, w_bits=None) -> dict[str, dict]:
    """Per annotated layer with a weight: {"trace", "n_params", "iters", "rel_std", "loss"}, and
    with `a_bits` (activation widths, e.g. [8, 16]) also "act": {arg index: {"trace", "numel",
    "rel_std", "omega": {bits: Omega_act(bits)}}} for each activation input.

    The loss is taken on the graph's first output: with `labels` (one per calibration sample)
    cross entropy ("ce", default) or MSE; without, a distillation loss to the graph's own
    float outputs, KL for 2-D logits and MSE otherwise. The full-set loss is
    L = sum_b (n_b / N) L_b, so Tr(H) = sum_b (n_b / N) Tr(H_b); each batch's trace is the mean
    of v^T H_b v over iterations (one gradient graph per batch, reused), stopping once the
    standard error of the mean is below `tol` times |mean| for every layer and activation,
    or at `max_iters`. rel_std is the resulting standard error of the total, relative to it.
    An activation's "trace" is sum_b (n_b / N) Tr(H_a,b) (H w.r.t. the batch's activation
    tensor), "numel" its size per sample; weight and activation Hessian-vector products are
    separate backward passes, so neither estimate carries the other's cross terms.

    By default one Rademacher vector spans all layers' weights and one HVP serves them all:
    layer i's sample v_i^T (H v)_i = v_i^T H_ii v_i + sum_{j != i} v_i^T H_ij v_j is unbiased, but
    the cross terms add variance that swamps layers whose own block is small (fashion_cnn's
    fc1: per-sample sd 2.4 joint vs 0.19 per block, mean 0.41). blockwise=True takes one HVP
    per layer with v on that layer's weight only (v_i^T H_ii v_i, no cross terms): as many
    backward passes per iteration as weighted layers, for that much less noise.

    With `w_bits` (weight widths) also "quad": {bits: dW^T H_ii dW}, dW = Q_b(W_i) - W_i with the
    layer's own weight quantizer, one HVP per layer and width per batch, no Hutchinson noise.
    Omega_i(b) = Tr(H_i)/n_i ||dW||^2 is this quadratic form's expectation for an error
    isotropic in H_i's eigenbasis; at 2 bits the RTN error is not (most weights of a row round
    to 0, dW ~ -W): on fashion_cnn's fc1 the trace form is 20x below the quadratic one.
    """
    nodes = [n for n in layers(graph) if weight_input(n) is not None]
    if not nodes:
        return {}
    calib.validate(graph.inputs)
    gm = graph.gm
    wnodes = [n.args[weight_input(n)] for n in nodes]
    originals = {w.target: graph.attr(w) for w in wnodes}
    params = {t: v.detach().clone().float().requires_grad_(True) for t, v in originals.items()}
    a_bits = sorted({int(b) for b in a_bits}) if a_bits else []
    taps = {n.name: act_inputs(n) for n in nodes} if a_bits else {}
    akeys = [(n.name, i) for n in nodes for i in taps.get(n.name, [])]
    w_bits = sorted({int(b) for b in w_bits}) if w_bits else []
    wspecs = {n.name: n.meta[QMETA]["inputs"][weight_input(n)]["spec"] for n in nodes}
    quad = {n.name: {b: 0.0 for b in w_bits} for n in nodes}
    qps = activation_qparams(graph, calib, nodes, a_bits) if akeys else {}
    gen = torch.Generator().manual_seed(seed)
    batches = list(calib.batches(graph.inputs, max_batches))
    total = sum(b[0].shape[0] for b in batches)
    tr = {n.name: 0.0 for n in nodes}
    var = {n.name: 0.0 for n in nodes}
    atr = {k: 0.0 for k in akeys}
    avar = {k: 0.0 for k in akeys}
    aom = {k: {b: 0.0 for b in a_bits} for k in akeys}
    numel = {}
    iters = 0
    kind = None
    deltas: dict[tuple[str, int], torch.Tensor] = {}
    errs: dict[tuple[str, int], dict[int, float]] = {}

    def leaf(layer, i, a):  # a + d, d a zero leaf: dL/dd is the gradient w.r.t. this layer's input
        d = torch.zeros_like(a, requires_grad=True)
        deltas[(layer, i)] = d
        with torch.no_grad():
            x = a.detach().float()
            errs[(layer, i)] = {b: float(((fake_quantize(x, qp) - x) ** 2).sum()) for b, qp in qps[(layer, i)].items()}
        return a + d

    forward = _Tap(gm, taps, leaf).run if akeys else gm
    try:
        for t, p in params.items():
            _set(gm, t, p)
        bar = tqdm(total=len(batches), desc="sensitivity", unit="batch", leave=False, disable=None if progress else True)
        start = 0
        for args in batches:
            nb = args[0].shape[0]
            deltas.clear(), errs.clear()
            with torch.enable_grad():
                out = _first(forward(*args))
                kind = kind or _pick_loss(loss, labels, out.detach())
                # without labels: distil to the float outputs, i.e. this same forward pass, detached
                target = out.detach() if labels is None else torch.as_tensor(labels[start:start + nb])
                start += nb
                ws = [params[w.target] for w in wnodes]
                ds = [deltas[k] for k in akeys]
                grads = torch.autograd.grad(_loss_fn(kind, out, target), ws + ds, create_graph=True)
                gw, gd = grads[:len(ws)], grads[len(ws):]
                for n, g, w, wt in zip(nodes, gw, ws, wnodes):
                    for b in w_bits:
                        dw = quantize_weight(originals[wt.target], wspecs[n.name].with_(bits=b)) - w.detach()
                        hv = _hvp([g], [w], [dw])[0]
                        quad[n.name][b] += nb / total * (0.0 if hv is None else float((dw * hv).sum()))
                samples: list[list[float]] = [[] for _ in nodes]
                asamples: list[list[float]] = [[] for _ in akeys]
                for k in range(max_iters):
                    vs = [torch.randint(0, 2, w.shape, generator=gen).to(w.dtype) * 2 - 1 for w in ws]
                    if blockwise:
                        hvs = [_hvp([g], [w], [v])[0] for g, w, v in zip(gw, ws, vs)]
                    else:
                        hvs = torch.autograd.grad(gw, ws, grad_outputs=vs, retain_graph=True, allow_unused=True)
                    for s, v, hv in zip(samples, vs, hvs):
                        s.append(0.0 if hv is None else float((v * hv).sum()))
                    if ds:
                        vd = [torch.randint(0, 2, d.shape, generator=gen).to(d.dtype) * 2 - 1 for d in ds]
                        for s, hv, v in zip(asamples, _hvp(gd, ds, vd), vd):
                            s.append(0.0 if hv is None else float((v * hv).sum()))
                    if k + 1 >= min_iters and all(_sem(s) <= tol * abs(_mean(s)) for s in samples + asamples):
                        break
            iters = max(iters, k + 1)
            wb = nb / total
            for n, s in zip(nodes, samples):
                tr[n.name] += wb * _mean(s)
                var[n.name] += wb * wb * _sem(s) ** 2
            for key, s in zip(akeys, asamples):
                t, size = _mean(s), deltas[key].numel()
                numel[key] = size // nb
                atr[key] += wb * t
                avar[key] += wb * wb * _sem(s) ** 2
                for b in a_bits:
                    aom[key][b] += wb * t / size * errs[key][b]
            bar.update(1)
        bar.close()
    finally:
        deltas.clear()
        for t, v in originals.items():
            _set(gm, t, v)
    res = {n.name: {"trace": tr[n.name], "n_params": int(originals[w.target].numel()), "iters": iters,
                    "rel_std": math.sqrt(var[n.name]) / abs(tr[n.name]) if tr[n.name] else 0.0, "loss": kind}
           for n, w in zip(nodes, wnodes)}
    for name, q in quad.items():
        if q:
            res[name]["quad"] = {b: max(v, 0.0) for b, v in q.items()}
    for (name, i) in akeys:
        res[name].setdefault("act", {})[i] = {
            "trace": atr[(name, i)], "numel": numel[(name, i)], "omega": {b: max(v, 0.0) for b, v in aom[(name, i)].items()},
            "rel_std": math.sqrt(avar[(name, i)]) / abs(atr[(name, i)]) if atr[(name, i)] else 0.0}
    return res


def _hvp(grads, inputs, vs):
    """H v for each (gradient, input) pair; None where the gradient does not depend on its input."""
    live = [j for j, g in enumerate(grads) if g.requires_grad]
    out = [None] * len(inputs)
    if live:
        hv = torch.autograd.grad([grads[j] for j in live], [inputs[j] for j in live],
                                 grad_outputs=[vs[j] for j in live], retain_graph=True, allow_unused=True)
        for j, h in zip(live, hv):
            out[j] = h
    return out


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
    """Omega(b) = max(Tr(H), 0) / n * ||Q_b(W) - W||^2. A negative trace estimate is Hutchinson
    noise around a near-zero curvature (the loss is at a minimum in the float weights); taken at
    face value it would make the ILP prefer the coarsest width for that layer."""
    return max(trace, 0.0) / max(n, 1) * perturbation(weight, spec)


def activation_omega(sensitivity: dict, bits: int) -> float | None:
    """Omega_act(bits) summed over a layer's activation inputs; None where the sensitivity
    pass did not estimate it at that width (0.0 for a layer without activation inputs)."""
    acts = sensitivity.get("act", {})
    if any(bits not in {int(b) for b in a["omega"]} for a in acts.values()):
        return None
    return sum(float({int(b): v for b, v in a["omega"].items()}[bits]) for a in acts.values())


@register
class EstimateSensitivity(Pass):
    """Store Hutchinson Hessian traces in each weighted layer's meta["qc"]["sensitivity"].

    Settings from ctx.config.extra["sensitivity"]: loss, labels, max_iters, tol, seed,
    max_batches, a_bits, blockwise, w_bits; a_bits defaults to the activation widths of the
    mixed-precision menu (extra["mixed_precision"]["a_bits"]), and without either only weights
    are estimated; w_bits to the menu's weight widths where its omega is "quadratic" (the
    default, DEFAULT_OMEGA).
    The graph itself is not changed."""

    name = "sensitivity"
    numerics = EXACT
    requires = ("annotated",)
    provides = ("sensitivity",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if ctx.calib is None:
            raise QCError("sensitivity estimation needs calibration data")
        extra = getattr(ctx.config, "extra", None) or {}
        opts = dict(extra.get("sensitivity", {}))
        mp = extra.get("mixed_precision", {})
        opts.setdefault("a_bits", mp.get("a_bits"))
        if mp.get("omega", DEFAULT_OMEGA) == "quadratic":
            opts.setdefault("w_bits", mp.get("bits", [4, 8]))
        res = hutchinson_traces(graph, ctx.calib, **opts)
        for n in layers(graph):
            if n.name in res:
                n.meta[QMETA]["sensitivity"] = res[n.name]
        graph.meta["sensitivity"] = {k: dict(v) for k, v in res.items()}
        return PassResult(graph, False, {"layers": len(res), "activations": sum(len(r.get("act", {})) for r in res.values()),
                                         "iters": max((r["iters"] for r in res.values()), default=0)})
