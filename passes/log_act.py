"""Log quantizers for power-law activations, as an observer choice (`Config.log_act`,
`qcompiler compile --log-act softmax,gelu [--log-base 2|sqrt2]`).

Post-Softmax and post-GELU inputs of quantized ops get the log quantizer of qcompiler.qspec
instead of the uniform grid:

    q = clamp(round(-k log2(X / s)), 0, 2^b - 1),   X^ = s 2^(-q/k)   (0 at the top code 2^b - 1),

k = 1 (base 2: every level a shift) or k = 2 (base sqrt2, RepQ-ViT's choice: twice the levels per
octave), s the calibrated maximum. Its levels are dense near 0 and sparse near s, as the values
of such tensors are: attention probabilities spread over many decades, and a uniform 4-bit grid
puts 15 of its 16 levels above 1/16 of the maximum.

Softmax outputs lie in [0, 1]: only the quantizer's spec changes, the graph does not.

GELU outputs are not non-negative: gelu(x) = x Phi(x) >= G_MIN = -0.16997 (at x = -0.7518; the
tanh approximation's minimum is the same to 4 digits). AdaLog's bias reparameterization (Wu et
al. 2024) shifts them: with  c = C m,  C = 0.17 > -G_MIN,  and m = 1 or the positive constant
factor of a SmoothQuant `mul` between the GELU and its consumers (X = gelu(h) * m, so
X >= G_MIN m), the shifted tensor X' = X + c is > 0 for every input, and each consumer

    linear(X, W, b) = W X + b = W X' + (b - W c) = linear(X', W, b - W c)

keeps its function (exact in real arithmetic; float32 rounds X + c and the folded bias, within
float32 tolerance). The log quantizer then applies to X'. One add is inserted and shared by the
folded consumers; other users of X keep reading X.

Declined, with the reason in the pass result: a consumer that is not a linear with a constant
weight (an activation x activation matmul has no bias to take -W c), a weight or bias shared
with other ops, a multiplier that is not a positive constant, and an input whose quantizer is
already not uniform per-tensor (RepQ-ViT's per-channel calibration, an earlier log quantizer).
Integer lowering has no log quantizer: Config rejects log_act with integer=True.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from qcompiler.errors import QCError
from qcompiler.ir import QMETA, Graph, eliminate_dead_code, is_op, is_private_const, op_name
from qcompiler.pipeline import NUMERICS, Pass, PassContext, PassResult, register
from qcompiler.qspec import QuantSpec

from .quantize import layers

aten = torch.ops.aten
SOFTMAX, GELU = "softmax", "gelu"
KINDS = (SOFTMAX, GELU)
G_SHIFT = 0.17  # > -min_x gelu(x) = 0.169971...


def _act(node: fx.Node, i: int) -> dict | None:
    q = node.meta.get(QMETA, {}).get("inputs", {}).get(i)
    return q if q is not None and q["role"] == "act" else None


def _source(x: fx.Node, graph: Graph) -> tuple[str | None, torch.Tensor | None, str | None]:
    """(kind, multiplier m, None) when x is a softmax output or a GELU output (optionally times a
    positive constant m); (None, None, reason) when it is a GELU product it cannot shift."""
    if is_op(x, aten.softmax, aten._softmax):
        return SOFTMAX, None, None
    if is_op(x, aten.gelu):
        return GELU, torch.ones(()), None
    if is_op(x, aten.mul) and isinstance(x.args[0], fx.Node) and is_op(x.args[0], aten.gelu):
        m = x.args[1]
        if not (isinstance(m, fx.Node) and m.op == "get_attr"):
            return None, None, f"{x.name}: GELU times a non-constant ({op_name(x)}); its lower bound is unknown"
        mv = graph.attr(m).detach().double()
        c = x.meta["val"].shape[-1] if isinstance(x.meta.get("val"), torch.Tensor) else mv.numel()
        if mv.numel() not in (1, c) or (mv.dim() > 0 and mv.shape[-1] != mv.numel()):
            return None, None, f"{x.name}: GELU times a constant of shape {list(mv.shape)}, not per last-dim channel"
        if not bool((mv > 0).all()):
            return None, None, f"{x.name}: GELU times a constant that is not positive everywhere"
        return GELU, mv, None
    return None, None, None


@register
class LogActivationQuantizers(Pass):
    """Give post-Softmax / post-GELU activations a log2 or log-sqrt2 quantizer (GELU outputs
    shifted non-negative with the shift folded into the consumers' biases). See the module doc."""

    name = "log_act"
    numerics = NUMERICS
    requires = ("annotated",)
    provides = ("log_act",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if "calibrated" in graph.meta.get("facts", []):
            raise QCError("log_act must run before calibrate (it changes what is observed)")
        cfg = ctx.config
        kinds = tuple(cfg.log_act) if cfg is not None else KINDS
        base = cfg.log_act_base if cfg is not None else "sqrt2"
        stats: Counter = Counter()
        declined: list[str] = []
        gelu_groups: dict[fx.Node, tuple[torch.Tensor, list[fx.Node]]] = {}  # GELU value -> (m, consumers)
        for n in layers(graph):
            for i, q in sorted(n.meta[QMETA]["inputs"].items()):
                x = n.args[i]
                if q["role"] != "act" or not isinstance(x, fx.Node):
                    continue
                kind, m, why = _source(x, graph)
                if why and GELU in kinds:
                    declined.append(why)
                if kind is None or kind not in kinds:
                    continue
                spec = q["spec"]
                if spec.log_base or spec.granularity != "tensor" or "reparam" in q:
                    declined.append(f"{n.name}: input {i} already has the quantizer {spec.describe()}")
                    continue
                if kind == SOFTMAX:
                    q["spec"], q["qparams"] = self._log_spec(spec, base), None
                    stats["softmax"] += 1
                    continue
                w = n.args[1] if len(n.args) > 1 else None
                b = n.args[2] if len(n.args) > 2 else None
                if not is_op(n, aten.linear) or i != 0:
                    declined.append(f"{n.name}: reads GELU output {x.name} but is {op_name(n)}, not a linear's "
                                    "input: no bias to take the shift")
                elif not is_private_const(w) or not (b is None or is_private_const(b)):
                    declined.append(f"{n.name}: weight or bias shared with other ops or not a constant")
                else:
                    gelu_groups.setdefault(x, (m, []))[1].append(n)
        for x, (m, consumers) in gelu_groups.items():
            self._shift(graph, x, consumers, m)
            for n in consumers:
                q = n.meta[QMETA]["inputs"][0]
                q["spec"], q["qparams"] = self._log_spec(q["spec"], base), None
                stats["gelu"] += 1
            stats["gelu_shifts"] += 1
        if gelu_groups:
            graph.recompile()
        return PassResult(graph, bool(stats), dict(stats), declined)

    @staticmethod
    def _log_spec(spec: QuantSpec, base: str) -> QuantSpec:
        return QuantSpec(bits=spec.bits, signed=False, symmetric=True, log_base=base)

    @staticmethod
    def _shift(graph: Graph, x: fx.Node, consumers: list[fx.Node], m: torch.Tensor) -> None:
        """X' = X + C m once, before the first consumer; each consumer's bias b -> b - W (C m)."""
        val = x.meta.get("val")
        dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
        c = G_SHIFT * m
        first = min(consumers, key=list(graph.nodes).index)
        cnode = graph.add_constant(c.to(dtype), f"{x.name}_log_shift", before=first)
        with graph.graph.inserting_before(first):
            add = graph.graph.call_function(aten.add.Tensor, (x, cnode))
        if isinstance(val, torch.Tensor):
            add.meta["val"] = val
        for n in consumers:
            w = graph.attr(n.args[1]).detach()
            cv = c.expand(w.shape[1]) if c.dim() == 0 else c.reshape(-1).expand(w.shape[1])
            shift = w.double() @ cv.double()
            old = n.args[2] if len(n.args) > 2 else None
            bias = (graph.attr(old).detach().double() if old is not None else torch.zeros(w.shape[0], dtype=torch.float64))
            new = graph.add_constant((bias - shift).to(w.dtype), f"{n.name}_bias_log_shift", before=n)
            args = list(n.args) + [None] * (3 - len(n.args))
            args[0], args[2] = add, new
            n.args = tuple(args)
        eliminate_dead_code(graph)  # the replaced biases
