"""RoundWeightsGPTQ: GPTQ weight rounding (Frantar et al. 2023), onto each layer's own grid.

Every weight layer is a product y = X W^T with W viewed as [rows, cols] (rows: output
channels, cols: the inputs one output sums over):
    linear(x, W)        W [out, in],                X = x.reshape(-1, in)
    convNd(x, W)        W[O/g block].reshape(O/g, C/g * prod(k)) for each conv group,
                        X = im2col(x) of that group's input channels (same stride, padding,
                        dilation; column order (c, k1, k2, ...) as in W.reshape)
    matmul / mm(x, W)   W^T, X = x.reshape(-1, in);   addmm(b, x, W) likewise.
With X the rows of the layer's input over the calibration set (float graph), the rounding
Q of W onto the grid minimises
    ||X Q^T - X W^T||_F^2 = (n / 2) tr((Q - W) H (Q - W)^T),   H = 2 X^T X / n,
column by column (optimal brain surgeon): quantize column j, then spread its error over
the columns not yet quantized,
    e = (w_j - q(w_j)) / U_jj,    W[:, j:] -= e U_{j, j:},
with U the upper Cholesky factor of H^-1 (H^-1 = U^T U; row j of U holds the inverse Hessian
of the columns left after eliminating 0..j-1), computed as U = R^-1 from H = R R^T, R upper
(the Cholesky factor of H with rows and columns reversed). Columns go in blocks of
`block_size`: inside a block the update touches only the block, and the block's errors E
then update the rest at once, W[:, i2:] -= E U[i1:i2, i2:]. H is dampened, H += percdamp * mean(diag H) * I (x10
until the Cholesky factorisation succeeds); a column whose input is always zero
(H_jj = 0) gets H_jj = 1, so it is rounded to nearest and spreads no error. With `act_order`
the columns go in decreasing H_jj (the grid stays the one fixed below, so groups are static).

The grid q(w) = clamp(round(w / s) + z, qmin, qmax) is the layer's own weight QuantSpec
(per-tensor, per-channel or per-group, 2..8 bits) with s, z from the ORIGINAL weight
(qcompiler.qspec.weight_qparams; per group, from the group's original values). The layer's
weight becomes (q - z) * s in float32, which is what qc::fake_quant computes, so
fake_quant(W_gptq) == W_gptq bit for bit; the QParams are stored in the weight's
meta["qc"]["inputs"][i]["qparams"], and fake_quant uses them as they are (recomputing from
W_gptq could move the grid: its min/max need not be the original's).

GPTQ is greedy: where its calibration loss tr(D H D^T) (D = Q - W) is not below
round-to-nearest's, round-to-nearest is kept (stats "kept_rtn"). meta["qc"]["gptq"] records
the original weight ("float_weight", what bias correction measures against) and both losses.
Declined, with a reason: embedding tables, shared weights, log-quantized or non-float32
weights, layers whose input gets no calibration rows.

Options: Config.extra["gptq"] = {"act_order": False, "block_size": 128, "percdamp": 0.01,
"max_batches": 64}. Runs after "annotate" (and mixed precision), before "fake_quant".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from qcompiler.errors import QCError
from qcompiler.ir import QMETA, Graph, eliminate_dead_code
from qcompiler.ops import expand_qparam
from qcompiler.pipeline import NUMERICS, Pass, PassContext, PassResult, register
from qcompiler.qspec import QParams, QuantSpec, fake_quantize, weight_qparams

from .calibrate import _Recorder
from .quantize import layers

OPTIONS = {"act_order": False, "block_size": 128, "percdamp": 0.01, "max_batches": 64}
_CONVS = ("conv1d", "conv2d", "conv3d")
_MATMULS = ("matmul", "mm", "addmm")


def _arg(node: fx.Node, i: int, name: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _ntuple(v, n: int) -> tuple[int, ...]:
    v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
    return v * n if len(v) == 1 else v


@dataclass
class LayerView:
    """How a layer's weight is a [rows, cols] matrix and its input a set of rows, per conv group."""

    kind: str  # "linear" | "conv" | "matmul"
    x_idx: int
    w_shape: tuple[int, ...]
    groups: int = 1
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    dilation: tuple[int, ...] = ()

    @property
    def key(self) -> tuple:
        """Layers reading the same value with equal keys have the same input rows (and H)."""
        return (self.kind, self.groups, self.kernel, self.stride, self.padding, self.dilation,
                self.w_shape[-1] if self.kind == "linear" else self.w_shape[0] if self.kind == "matmul" else None)

    def blocks(self, t: torch.Tensor) -> list[torch.Tensor]:
        """A weight-shaped tensor as [rows, cols] matrices, one per conv group."""
        if self.kind == "matmul":
            return [t.t()]
        og = t.shape[0] // self.groups
        return [t[g * og:(g + 1) * og].reshape(og, -1) for g in range(self.groups)]

    def assemble(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == "matmul":
            return blocks[0].t().contiguous()
        return torch.cat(blocks).reshape(self.w_shape).contiguous()

    def rows(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The layer input as rows [M, cols] (float32), one matrix per conv group."""
        x = x.detach().float()
        if self.kind != "conv":
            return [x.reshape(-1, x.shape[-1])]
        nd = len(self.kernel)
        if x.dim() == nd + 1:  # unbatched conv input
            x = x.unsqueeze(0)
        x = F.pad(x, [p for lr in reversed(self.padding) for p in lr])
        for d in range(nd):
            x = x.unfold(2 + d, self.dilation[d] * (self.kernel[d] - 1) + 1, self.stride[d])
        x = x[(Ellipsis, *(slice(None, None, s) for s in self.dilation))]
        c = x.shape[1]
        x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))  # [N, L..., C, k...]
        x = x.reshape(-1, self.groups, c // self.groups * math.prod(self.kernel))
        return [x[:, g] for g in range(self.groups)]


def layer_view(graph: Graph, node: fx.Node, w_idx: int) -> tuple[LayerView | None, str | None]:
    """The view of a weight layer, or a reason it has none."""
    kind = node.meta[QMETA]["op"].split(".")[-1]
    w = graph.attr(node.args[w_idx])
    shape = tuple(w.shape)
    if kind == "linear":
        return LayerView("linear", 0, shape), None
    if kind in _CONVS:
        nd = w.dim() - 2
        k = shape[2:]
        stride = _ntuple(_arg(node, 3, "stride", 1), nd)
        pad = _arg(node, 4, "padding", 0)
        dilation = _ntuple(_arg(node, 5, "dilation", 1), nd)
        if pad == "same":
            tot = [d * (kk - 1) for d, kk in zip(dilation, k)]
            padding = tuple((t // 2, t - t // 2) for t in tot)
        elif pad == "valid":
            padding = ((0, 0),) * nd
        else:
            padding = tuple((p, p) for p in _ntuple(pad, nd))
        return LayerView("conv", 0, shape, int(_arg(node, 6, "groups", 1)), k, stride, padding, dilation), None
    if kind in _MATMULS:
        x_idx, want_w = (1, 2) if kind == "addmm" else (0, 1)
        if w_idx != want_w:
            return None, "the constant is the left operand (not x @ W)"
        if w.dim() != 2:
            return None, f"constant operand has rank {w.dim()} (GPTQ takes a 2-D weight)"
        x = node.args[x_idx]
        if not isinstance(x, fx.Node) or x.op == "get_attr":
            return None, "no activation operand"
        return LayerView("matmul", x_idx, shape), None
    return None, f"{kind} has no GPTQ view"


def gptq_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
               h: torch.Tensor, block_size: int = 128, percdamp: float = 0.01,
               act_order: bool = False) -> torch.Tensor:
    """Integer codes [rows, cols] (float64) of w [rows, cols] on the elementwise grid (scale,
    zero), minimising tr((Q - W) H (Q - W)^T) column by column (see the module docstring)."""
    w = w.double().clone()
    scale, zero, h = scale.double(), zero.double(), h.double().clone()
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols)
    w, scale, zero, h = w[:, perm], scale[:, perm], zero[:, perm], h[perm][:, perm]
    damp = percdamp * float(torch.diagonal(h).mean())
    eye = torch.eye(cols, dtype=h.dtype)
    for _ in range(8):  # H = R R^T with R upper: R = J chol(J H J) J, J the index reversal
        r, info = torch.linalg.cholesky_ex((h + damp * eye).flip(0, 1))
        if int(info) == 0:
            break
        damp = damp * 10 if damp > 0 else 1e-8 * float(torch.diagonal(h).abs().mean() + 1)
    else:
        raise QCError("the Hessian is not positive definite even after dampening")
    u = torch.linalg.solve_triangular(r.flip(0, 1), eye, upper=True)  # H^-1 = R^-T R^-1: U = R^-1
    codes = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            c = i1 + i
            q = torch.clamp(torch.round(w1[:, i] / scale[:, c]) + zero[:, c], qmin, qmax)
            codes[:, c] = q
            e = (w1[:, i] - (q - zero[:, c]) * scale[:, c]) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return codes[:, torch.argsort(perm)]


def _options(ctx: PassContext) -> dict:
    extra = getattr(ctx.config, "extra", None) or {}
    opts = dict(extra.get("gptq", {}) or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise QCError(f"unknown gptq options {unknown} (known: {', '.join(OPTIONS)})")
    opts = {**OPTIONS, **opts}
    if int(opts["block_size"]) < 1:
        raise QCError(f"gptq block_size must be >= 1, got {opts['block_size']}")
    if float(opts["percdamp"]) < 0:
        raise QCError(f"gptq percdamp must be >= 0, got {opts['percdamp']}")
    return opts


def _weight_input(node: fx.Node) -> int | None:
    return next((i for i, q in sorted(node.meta[QMETA]["inputs"].items()) if q["role"] == "weight"), None)


def _shared(graph: Graph, w: fx.Node) -> bool:
    return len(w.users) > 1 or any(n is not w and n.op == "get_attr" and n.target == w.target for n in graph.nodes)


def _grid(w: torch.Tensor, qp: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every weight element (float32, w's shape)."""
    axis, group = qp.spec.axis_and_group
    s = expand_qparam(qp.scale.float(), w, axis, group)
    z = expand_qparam(qp.zero_point.float(), w, axis, group)
    return torch.broadcast_to(s, w.shape), torch.broadcast_to(z, w.shape)


def _loss(codes, w, s, z, h) -> float:
    """tr(D H D^T), D = (codes - z) * s - w: the calibration output error of this rounding."""
    d = (codes - z.double()) * s.double() - w.double()
    return float(((d @ h) * d).sum())


@register
class RoundWeightsGPTQ(Pass):
    """Round every annotated weight onto its quantizer grid with GPTQ error compensation."""

    name = "gptq"
    numerics = NUMERICS
    requires = ("annotated",)
    provides = ("weights_rounded",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if "quantized" in graph.meta.get("facts", ()):
            raise QCError("gptq runs before fake_quant (the graph already has fake-quant nodes)")
        opts = _options(ctx)
        declined: list[str] = []
        todo: list[tuple[fx.Node, int, LayerView]] = []
        for node in layers(graph):
            w_idx = _weight_input(node)
            if w_idx is None:
                continue  # activation x activation product: nothing to round
            q = node.meta[QMETA]["inputs"][w_idx]
            w_node = node.args[w_idx]
            kind = node.meta[QMETA]["op"].split(".")[-1]
            if kind == "embedding":
                why = "embedding table: a lookup has no input rows to weigh the rounding"
            elif _shared(graph, w_node):
                why = "weight is shared with other ops"
            elif q["spec"].log_base:
                why = "weight has a log quantizer"
            elif graph.attr(w_node).dtype != torch.float32:
                why = f"weight is {graph.attr(w_node).dtype}, not float32"
            else:
                view, why = layer_view(graph, node, w_idx)
                if view is not None:
                    todo.append((node, w_idx, view))
                    continue
            declined.append(f"{node.name}: {why}")
        stats = {"layers": 0, "kept_rtn": 0, "declined": len(declined)}
        if not todo:
            return PassResult(graph, False, stats, declined)
        if ctx.calib is None:
            raise QCError("gptq needs calibration data (ctx.calib)")
        ctx.calib.validate(graph.inputs)

        # one H per (input value, view key): q/k/v projections of one x share theirs
        hess: dict[tuple, list] = {}
        watch: dict[str, list[tuple[tuple, LayerView]]] = {}
        for node, _, view in todo:
            x = node.args[view.x_idx]
            key = (x.name, view.key)
            if key not in hess:
                hess[key] = [None, 0]
                watch.setdefault(x.name, []).append((key, view))

        def record(n, v):
            for key, view in watch[n.name]:
                rows = view.rows(v)
                acc = hess[key]
                xtx = [(r.t() @ r).double() for r in rows]  # per batch in float32, summed in float64
                acc[0] = xtx if acc[0] is None else [a + b for a, b in zip(acc[0], xtx)]
                acc[1] += rows[0].shape[0]

        rec = _Recorder(graph.gm, set(watch), record)
        max_batches = opts["max_batches"]
        with torch.no_grad():
            for batch in ctx.calib.batches(graph.inputs, None if max_batches is None else int(max_batches)):
                rec.run(*batch)

        for node, w_idx, view in todo:
            x = node.args[view.x_idx]
            xtx, n = hess[(x.name, view.key)]
            if n == 0:
                declined.append(f"{node.name}: no calibration rows reached this layer")
                continue
            q = node.meta[QMETA]["inputs"][w_idx]
            w_node = node.args[w_idx]
            w = graph.attr(w_node).detach()
            qp = weight_qparams(w, q["spec"])
            s, z = _grid(w, qp)
            spec: QuantSpec = qp.spec
            code_blocks, loss, loss_rtn = [], 0.0, 0.0
            for wb, sb, zb, xb in zip(view.blocks(w), view.blocks(s), view.blocks(z), xtx):
                h = 2.0 * xb / n
                codes = gptq_codes(wb, sb, zb, spec.qmin, spec.qmax, h, int(opts["block_size"]),
                                   float(opts["percdamp"]), bool(opts["act_order"]))
                rtn = torch.clamp(torch.round(wb.double() / sb.double()) + zb.double(), spec.qmin, spec.qmax)
                code_blocks.append((codes, rtn))
                loss += _loss(codes, wb, sb, zb, h)
                loss_rtn += _loss(rtn, wb, sb, zb, h)
            use_rtn = not loss < loss_rtn
            codes = view.assemble([(r if use_rtn else c).float() for c, r in code_blocks])
            w_hat = ((codes - z) * s).to(w.dtype)
            if not torch.equal(fake_quantize(w_hat, qp), w_hat):
                raise QCError("GPTQ weights do not lie on their grid", node=node.name, op=node.meta[QMETA]["op"])
            new = graph.add_constant(w_hat, f"{node.name}_weight_gptq", before=node)
            node.replace_input_with(w_node, new)
            q["qparams"] = qp
            node.meta[QMETA]["gptq"] = {"float_weight": w.clone(), "loss_gptq": loss, "loss_rtn": loss_rtn,
                                        "kept": "rtn" if use_rtn else "gptq"}
            stats["layers"] += 1
            stats["kept_rtn"] += int(use_rtn)
        stats["declined"] = len(declined)
        if stats["layers"]:
            eliminate_dead_code(graph)
            graph.recompile()
        return PassResult(graph, stats["layers"] > 0, stats, declined)
