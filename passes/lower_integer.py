"""Integer-only lowering (HAWQ-V3 dyadic arithmetic, I-BERT / I-ViT integer nonlinears).

Two passes:

AnnotateIntegerTensors ("annotate_integer", after "annotate", before "calibrate") makes every
activation tensor a quantization point, so that the fake-quant graph rounds exactly where
the integer graph will: the float inputs, and the output of every op that is not
scale-preserving (linear / conv / matmul outputs, residual adds, LayerNorm, GELU, Softmax,
means, ...). Scale-preserving ops (reshape/permute/slice family, ReLU, max-pool, and
multiplication by a positive constant, which only rescales) carry their input's grid. The
per-input activation quantizers of "annotate" are dropped: their values are now quantized
at their producers.

LowerToInteger ("lower_integer", after "fake_quant") rewrites that fake-quant graph into an
integer graph of qc:: integer ops (qcompiler.int_ops), defined bit for bit by their
reference kernels. With s the scales and z the zero points of the quantizers:
    qc::fake_quant(x) of a float input        -> qc::quantize
    linear / conv / matmul of quantized values -> qc::int_linear / int_conv / int_matmul: int32
                                                  accumulators at scale s_x s_w (per channel),
                                                  bias as int32 round(b / (s_x s_w))
    qc::fake_quant(acc or q)                   -> qc::requant by the dyadic s_in / s_out
    add / sub                                  -> qc::int_add (two dyadic rescales, one shift)
    cat of differently scaled inputs           -> qc::requant of each to the output grid, cat
    mean                                       -> qc::int_sum, then requant by s_x / (n s_y)
    elementwise f (GELU, sigmoid, hardswish..) -> qc::int_lut: the table q -> Q(f(DQ(q))),
                                                  built with the fake-quant graph's own float32
                                                  arithmetic, so it is bit-exact with it
    softmax                                    -> qc::int_softmax (exp table of 2^16 fixed point,
                                                  row sum, one division per element)
    layer_norm                                 -> qc::int_layer_norm (exact integer mean and
                                                  variance, integer square root)
    graph outputs                              -> qc::dequantize
An op that has no integer form fails compilation with its node named, unless it is listed
in `allow_float` (Config.allow_float): then it runs in float between a dequantize and the
next quantize (a "float island"), and graph.meta["integer"]["float_islands"] lists it.
`verify_integer` proves that no float value remains between the input quantize and the
output dequantize outside the listed islands.
"""
from __future__ import annotations

import fnmatch
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompiler import int_ops as I
from qcompiler.errors import QCError
from qcompiler.ir import QMETA, Graph, is_op, op_name
from qcompiler.ops import fake_quant, quantize_ref
from qcompiler.pipeline import NUMERICS, Pass, PassContext, PassResult, register

from .quantize import layers

aten = torch.ops.aten

# ops whose output lies on its (first) input's grid: integer code applies the same ATen op
SHAPE_OPS = (aten.view, aten.reshape, aten._unsafe_view, aten.permute, aten.transpose, aten.t, aten.flatten,
             aten.unsqueeze, aten.squeeze, aten.expand, aten.contiguous, aten.clone, aten.select, aten.slice,
             aten.unbind, aten.split, aten.split_with_sizes, aten.chunk, aten.alias, aten.detach, aten.unflatten,
             aten.dropout, aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices,
             aten.repeat, aten.flip, aten.roll, aten.narrow, aten.movedim, aten.expand_as, aten.view_as,
             aten.reshape_as)
MONOTONE_CLAMPS = (aten.relu, aten.clamp, aten.hardtanh, aten.clamp_min, aten.clamp_max)
RESCALES = (aten.mul, aten.div)  # by a positive python scalar: only the scale changes
MATMULS = (aten.linear, aten.conv1d, aten.conv2d, aten.conv3d, aten.matmul, aten.mm, aten.bmm, aten.addmm)
ADDS = (aten.add, aten.sub, aten.rsub)
# elementwise unary functions lowered to a table lookup (extra args are constants of the op)
LUT_OPS = (aten.gelu, aten.sigmoid, aten.tanh, aten.hardswish, aten.hardsigmoid, aten.silu, aten.erf, aten.exp,
           aten.elu, aten.leaky_relu, aten.softplus, aten.mish, aten.sqrt, aten.rsqrt, aten.abs, aten.neg,
           aten.log, aten.reciprocal, aten.relu6)
MAX_LUT_LEVELS = 1 << 16


def _is_float(n) -> bool:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def _is_positive_scalar(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and a > 0


def _reduction(n: fx.Node, at: int) -> tuple[list[int], bool, object]:
    """(dims, keepdim, element count) of a reduction whose dims are args[at] and keepdim args[at + 1]
    (all dims when absent; the count is symbolic over a dynamic dim)."""
    shape = n.args[0].meta["val"].shape
    dims = list(n.args[at]) if len(n.args) > at and n.args[at] is not None else list(range(len(shape)))
    keep = bool(n.args[at + 1]) if len(n.args) > at + 1 else bool(n.kwargs.get("keepdim", False))
    return dims, keep, math.prod(shape[d] for d in dims)


def _clamp_bounds(n: fx.Node) -> tuple[float | None, float | None]:
    """(min, max) of a relu / clamp / hardtanh node (None: unbounded)."""
    if is_op(n, aten.relu):
        return 0.0, None
    if is_op(n, aten.clamp_min):
        return float(n.args[1]), None
    if is_op(n, aten.clamp_max):
        return None, float(n.args[1])
    default = (-1.0, 1.0) if is_op(n, aten.hardtanh) else (None, None)
    keys = ("min_val", "max_val") if is_op(n, aten.hardtanh) else ("min", "max")
    out = []
    for i, (k, d) in enumerate(zip(keys, default)):
        v = n.args[i + 1] if len(n.args) > i + 1 else n.kwargs.get(k, d)
        out.append(None if v is None else float(v))
    return out[0], out[1]


def _allowed(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_masked_logits(n: fx.Node) -> bool:
    """where(mask, x, -inf) whose users are softmaxes (from fold_additive_mask)."""
    return is_op(n, aten.where) and len(n.args) == 3 and n.args[2] == float("-inf") and \
        all(is_op(u, aten.softmax, aten._softmax) for u in n.users)


def _is_int_to_float(n: fx.Node) -> bool:
    if not is_op(n, aten.to, aten._to_copy) or not isinstance(n.args[0], fx.Node):
        return False
    src = n.args[0].meta.get("val")
    return isinstance(src, torch.Tensor) and not src.dtype.is_floating_point and src.dtype != torch.bool and _is_float(n)


def _int_derived(n) -> bool:
    """A float value that is an exact integer computed from integer inputs only (a mask cast to
    float, its reshapes, sums and clamps at a positive epsilon: token counts). It is carried as
    an integer at scale 1, never quantized."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or not _is_float(n):
        return False
    if _is_int_to_float(n):
        return True
    if not (is_op(n, aten.sum, aten.clamp, aten.clamp_min) or is_op(n, *SHAPE_OPS)):
        return False
    if is_op(n, aten.clamp, aten.clamp_min):
        lo, hi = _clamp_bounds(n)
        if hi is not None or lo is None or not 0 < lo <= 1:
            return False
    ins = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    return bool(ins) and all(_int_derived(a) for a in ins)


def _preserves_grid(n: fx.Node) -> bool:
    if is_op(n, *SHAPE_OPS, *MONOTONE_CLAMPS) or n.target is operator.getitem:
        return True
    if _is_masked_logits(n) or _is_int_to_float(n):
        return True
    return is_op(n, *RESCALES) and len(n.args) == 2 and _is_positive_scalar(n.args[1])


def _matmul_uses(n: fx.Node, fused: set, partial: bool = False):
    """The (matmul, arg index) pairs that read n as an activation through grid-preserving ops.
    Unless `partial`, None when n has any other reader (an add, a LayerNorm, ...) than those
    and the graph outputs."""
    out, stack = [], [n]
    while stack:
        v = stack.pop()
        for u in v.users:
            if u.op == "call_function" and _preserves_grid(u) and u not in fused and u.target is not fake_quant:
                stack.append(u)
            elif u.op == "call_function" and is_op(u, *MATMULS) and QMETA in u.meta:
                idx = [i for i, a in enumerate(u.args) if a is v]
                w = {i for i, q in u.meta[QMETA]["inputs"].items() if q["role"] == "weight"}
                if any(i in w for i in idx) or not idx:
                    if not partial:
                        return None
                    continue
                out += [(u, i) for i in idx]
            elif u.op == "output":
                continue  # graph outputs are read at the narrow (activation) precision
            elif not partial:
                return None
    return out


@register
class AnnotateIntegerTensors(Pass):
    """Quantize every activation tensor at its producer (see the module docstring). A tensor
    that only feeds matmul-like ops or graph outputs gets the activation spec (8-bit by default); any other
    (residual stream, LayerNorm / GELU / Softmax inputs, outputs) gets the wider internal spec
    (Config.int_internal_bits, 16 by default, as I-BERT keeps those in wide integers), and
    its matmul readers re-quantize it to the narrow spec at their inputs."""

    name = "annotate_integer"
    numerics = "numerics"
    requires = ("annotated",)
    provides = ("integer_annotated",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        spec = cfg.act_spec()
        wide = spec.with_(bits=cfg.int_internal_bits, observer="minmax")
        stats = {"points": 0, "wide_points": 0, "narrow_matmul_inputs": 0, "input_quantizers_dropped": 0}
        for n in graph.nodes:
            info = n.meta.get(QMETA)
            if info:  # drop per-consumer activation quantizers: the value is quantized where it is made
                for i in [i for i, q in info["inputs"].items() if q["role"] == "act"]:
                    del info["inputs"][i]
                    stats["input_quantizers_dropped"] += 1
        fused: set[fx.Node] = set()
        allow = tuple(getattr(cfg, "allow_float", ()) or ())
        for n in graph.nodes:
            if _allowed(n.name, allow) and all(u.op == "output" or _allowed(u.name, allow) for u in n.users):
                continue  # inside a float island: quantized only where it feeds integer code
            if not _is_float(n) or n.op not in ("placeholder", "call_function"):
                continue
            if n.op == "call_function" and (_preserves_grid(n) and n not in fused or n.target is fake_quant
                                            or _int_derived(n)):
                continue
            if not n.users or all(u.op == "output" for u in n.users) and n.op == "placeholder":
                continue
            if n.op == "call_function" and is_op(n, *MATMULS) and len(n.users) == 1:
                (u,) = n.users
                if is_op(u, aten.relu):  # quantize after the ReLU: the grid spends no codes below 0
                    fused.add(u)
                    continue
            info = n.meta.setdefault(QMETA, {"layer": n.name, "op": op_name(n), "inputs": {}})
            narrow = _matmul_uses(n, fused) is not None
            info["output"] = {"role": "act", "spec": spec if narrow else wide, "qparams": None}
            stats["points"] += 1
            if not narrow:  # a wide tensor read by matmuls too: each matmul input gets its own narrow quantizer
                stats["wide_points"] += 1
                for mm, i in _matmul_uses(n, fused, partial=True):
                    mm.meta[QMETA]["inputs"][i] = {"role": "act", "spec": spec, "qparams": None}
                    stats["narrow_matmul_inputs"] += 1
        return PassResult(graph, stats["points"] > 0, stats)


# -- lowering -------------------------------------------------------------------------------

@dataclass
class IntVal:
    """An integer tensor in the new graph and the real numbers it stands for: (q - zp) * scale.
    `acc`: an int32 accumulator (zp 0, no clamp range); scale is per tensor or per channel
    along `axis`."""

    node: fx.Node
    scale: torch.Tensor  # float64
    zp: int
    qmin: int
    qmax: int
    axis: int = 0
    acc: bool = False

    @property
    def per_tensor(self) -> bool:
        return self.scale.numel() == 1

    def s(self) -> float:
        if not self.per_tensor:
            raise QCError("expected a per-tensor scale")
        return float(self.scale.reshape(()))


@dataclass
class FloatVal:
    node: fx.Node


@dataclass
class Const:
    tensor: torch.Tensor
    old: fx.Node


@dataclass
class Masked:
    """where(mask, x, -inf) feeding a softmax: the integer softmax takes the mask."""

    value: IntVal
    mask: fx.Node


@dataclass
class ConstExpr:
    """A float value computed from constants only (e.g. a class token expanded to the batch):
    quantized onto the grid of the op that consumes it, then recomputed in integers."""

    old: fx.Node


class _Lowering:
    def __init__(self, graph: Graph, allow_float: tuple[str, ...]):
        self.g = graph
        self.allow = allow_float
        self.new = fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[fx.Node, object] = {}
        self.islands: list[str] = []
        self.choices: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self._names: set[str] = set()
        self._const_vals: dict[fx.Node, torch.Tensor] = {}

    # helpers -------------------------------------------------------------------------------
    def const(self, t: torch.Tensor, hint: str) -> fx.Node:
        base = "".join(c if c.isalnum() else "_" for c in hint) or "c"
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        self.root.register_buffer(name, t.detach().clone().contiguous())
        node = self.new.get_attr(name)
        node.meta["val"] = t
        self._const_vals[node] = t
        return node

    def call(self, target, args, kwargs=None, name: str | None = None) -> fx.Node:
        node = self.new.call_function(target, tuple(args), kwargs or {})
        if name:
            node.name = name
        self.counts[op_name(node)] = self.counts.get(op_name(node), 0) + 1
        return node

    def fail(self, n: fx.Node, why: str):
        raise QCError(f"{why}; it cannot be lowered to integer ops (allow a float island with --allow-float "
                      f"{n.name})", node=n.name, op=op_name(n))

    def qp_of(self, fq: fx.Node):
        _, s, z, qmin, qmax, axis, group = fq.args
        if group:
            raise QCError("per-group quantization is not lowered to integer ops (use per-channel weights)",
                          node=fq.name, op="qc.fake_quant")
        return self.g.attr(s).double(), self.g.attr(z), qmin, qmax, axis

    def requant(self, v: IntVal, scale: torch.Tensor, zp: int, qmin: int, qmax: int, hint: str) -> IntVal:
        """v onto the grid (scale, zp, [qmin, qmax]); a no-op when v already is on it."""
        if (not v.acc and v.per_tensor and scale.numel() == 1 and v.zp == zp and v.qmin == qmin and v.qmax == qmax
                and float(v.scale.reshape(())) == float(scale.reshape(()))):
            return v
        if scale.numel() != 1:
            raise QCError("an activation quantizer must be per tensor", node=hint)
        b, c = I.dyadic(v.scale / scale.reshape(()))
        node = self.call(I.requant, (v.node, v.zp, self.const(b, f"{hint}_mult"), self.const(c, f"{hint}_shift"),
                                     zp, qmin, qmax, v.axis if not v.per_tensor else 0), name=f"{hint}_rq")
        return IntVal(node, scale.reshape(()).clone(), zp, qmin, qmax)

    def int_of(self, n: fx.Node, a) -> IntVal:
        v = self.env.get(a) if isinstance(a, fx.Node) else None
        if not isinstance(v, IntVal):
            self.fail(n, f"input {getattr(a, 'name', a)!r} is not a quantized value")
        return v

    def float_of(self, a):
        """A float value in the new graph for an old argument (dequantizing integers): islands."""
        if not isinstance(a, fx.Node):
            return a
        v = self.env[a]
        if isinstance(v, FloatVal):
            return v.node
        if isinstance(v, Const):
            return self.const(v.tensor, v.old.name)
        if isinstance(v, IntVal):
            return self.call(I.dequantize, (v.node, self.const(v.scale.float(), f"{v.node.name}_s"),
                                            self.const(torch.tensor(v.zp, dtype=torch.int32), f"{v.node.name}_z"),
                                            v.axis))
        if isinstance(v, (tuple, list)):
            raise QCError("a tuple value cannot enter a float island", node=a.name)
        return v  # a SymInt / python value node

    def out_fq(self, n: fx.Node) -> fx.Node | None:
        users = list(n.users)
        if len(users) == 1 and users[0].target is fake_quant:
            return users[0]
        return None

    # the walk ------------------------------------------------------------------------------
    def run(self) -> Graph:
        out_node = None
        for n in self.g.nodes:
            if n in self.env:
                continue
            if n.op == "placeholder":
                p = self.new.placeholder(n.name)
                p.meta = dict(n.meta)
                p.meta.pop(QMETA, None)
                self.env[n] = FloatVal(p)
            elif n.op == "get_attr":
                self.env[n] = Const(self.g.attr(n), n)
            elif n.op == "output":
                out_node = n
            elif n.target is fake_quant:
                self.lower_fake_quant(n)
            elif _allowed(n.name, self.allow):
                self.island(n)
            else:
                self.lower(n)
        outs = out_node.args[0]
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        results = []
        for o, spec in zip(outs, self.g.outputs):
            v = self.env[o]
            if isinstance(v, IntVal):
                results.append(self.call(I.dequantize, (v.node, self.const(v.scale.float(), f"{spec.name}_scale"),
                                                        self.const(torch.tensor(v.zp, dtype=torch.int32),
                                                                   f"{spec.name}_zero_point"), v.axis),
                                         name=f"{spec.name}_dq"))
            else:
                results.append(self.float_of(o))
        self.new.output(tuple(results))
        gm = fx.GraphModule(self.root, self.new)
        g = Graph(gm, list(self.g.inputs), list(self.g.outputs), self.g.source, dict(self.g.meta))
        g.meta["integer"] = {"float_islands": list(self.islands), "nonlinear": dict(sorted(self.choices.items())),
                             "ops": dict(sorted(self.counts.items()))}
        return g

    def island(self, n: fx.Node) -> None:
        args = fx.node.map_arg(n.args, self.float_of)
        kwargs = fx.node.map_arg(n.kwargs, self.float_of)
        node = self.new.call_function(n.target, args, kwargs)
        node.name = n.name
        self.env[n] = FloatVal(node)
        self.islands.append(n.name)

    def lower_fake_quant(self, n: fx.Node) -> None:
        src = n.args[0]
        scale, zp, qmin, qmax, axis = self.qp_of(n)
        v = self.env[src]
        if isinstance(v, Const):  # a weight: integers stored as a constant
            q = quantize_ref(v.tensor, scale.float(), zp, qmin, qmax, axis, 0).to(I.int_dtype(qmin, qmax))
            if bool((zp != 0).any()):
                raise QCError("weights must be quantized symmetrically (zero point 0) for integer lowering",
                              node=n.name)
            self.env[n] = IntVal(self.const(q, f"{src.name}_int"), scale.flatten() if scale.numel() > 1 else
                                 scale.reshape(()), 0, qmin, qmax, axis)
        elif isinstance(v, FloatVal):
            if scale.numel() != 1:
                raise QCError("an activation quantizer must be per tensor", node=n.name)
            node = self.call(I.quantize, (v.node, self.const(scale.float().reshape(()), f"{src.name}_scale"),
                                          self.const(zp.reshape(()), f"{src.name}_zero_point"), qmin, qmax, 0),
                             name=f"{src.name}_q")
            self.env[n] = IntVal(node, scale.reshape(()), int(zp.reshape(())), qmin, qmax)
        elif isinstance(v, IntVal):
            self.env[n] = self.requant(v, scale, int(zp.reshape(())), qmin, qmax, src.name)
        else:
            self.fail(n, "quantizes a value that is neither a tensor constant nor an activation")

    def lower(self, n: fx.Node) -> None:
        if n.op != "call_function":
            self.fail(n, f"{n.op} node")
        val = n.meta.get("val")
        if not isinstance(val, (torch.Tensor, tuple, list)) or (
                isinstance(val, torch.Tensor) and not val.dtype.is_floating_point
                and not any(isinstance(self.env.get(a), IntVal) for a in n.all_input_nodes)):
            # index / shape arithmetic (sym_size) and integer / boolean tensor arithmetic on integer
            # inputs (masks, indices): copied as is
            node = self.new.call_function(n.target, fx.node.map_arg(n.args, self._arg),
                                          fx.node.map_arg(n.kwargs, self._arg))
            node.meta = {k: v for k, v in n.meta.items() if k != QMETA}
            self.env[n] = FloatVal(node)
            return
        tensor_inputs = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)
                         or isinstance(self.env.get(a), (IntVal, Const, ConstExpr, tuple))]
        if _is_float(n) and tensor_inputs and all(isinstance(self.env.get(a), (Const, ConstExpr)) for a in tensor_inputs):
            self.env[n] = ConstExpr(n)
            return
        if _is_masked_logits(n):
            x = self.int_of(n, n.args[1])
            self.env[n] = Masked(x, self._arg(n.args[0]))
            return
        if _is_int_to_float(n):  # integer values as floats: the same integers at scale 1
            src = self._arg(n.args[0])
            info = torch.iinfo(n.args[0].meta["val"].dtype)
            self.env[n] = IntVal(src, torch.tensor(1.0, dtype=torch.float64), 0, info.min, info.max)
            return
        if n.target is operator.getitem:
            v = self.env[n.args[0]]
            if isinstance(v, (tuple, list)):
                self.env[n] = v[n.args[1]]
                return
            self.fail(n, "indexes a value that is not a tuple")
        if is_op(n, *MATMULS):
            return self.lower_matmul(n)
        if _int_derived(n) and not _is_int_to_float(n):
            return self.lower_int_derived(n)
        if _preserves_grid(n):
            return self.lower_grid_op(n)
        if is_op(n, aten.mul, aten.div) and isinstance(self.env.get(n.args[1]), (Const, ConstExpr)):
            return self.lower_mul_const(n)
        if is_op(n, aten.mul) and all(isinstance(self.env.get(a), IntVal) for a in n.args[:2]):
            return self.lower_mul(n)
        if is_op(n, aten.sum):
            return self.lower_sum(n)
        if is_op(n, aten.linalg_vector_norm):
            return self.lower_l2_norm(n)
        fq = self.out_fq(n)
        if fq is None:
            self.fail(n, "its output has no quantizer")
        scale, zp, qmin, qmax, _ = self.qp_of(fq)
        zp = int(zp.reshape(()))
        if is_op(n, *ADDS):
            out = self.lower_add(n, scale, zp, qmin, qmax)
        elif is_op(n, *LUT_OPS):
            out = self.lower_lut(n, fq, scale, zp, qmin, qmax)
        elif is_op(n, aten.softmax, aten._softmax):
            out = self.lower_softmax(n, scale, zp, qmin, qmax)
        elif is_op(n, aten.layer_norm):
            out = self.lower_layer_norm(n, scale, zp, qmin, qmax)
        elif is_op(n, aten.mean):
            out = self.lower_mean(n, scale, zp, qmin, qmax)
        elif is_op(n, aten.cat):
            out = self.lower_cat(n, scale, zp, qmin, qmax)
        elif is_op(n, aten.embedding):
            out = self.lower_embedding(n, scale, zp, qmin, qmax)
        elif is_op(n, aten.div) and isinstance(self.env.get(n.args[1]), IntVal):
            out = self.lower_div(n, scale, zp, qmin, qmax)
        else:
            self.fail(n, "no integer kernel for this op")
        self.env[n] = out
        self.env[fq] = out

    def _plain(self, a):
        v = self.env.get(a)
        if isinstance(v, FloatVal):
            return v.node
        if isinstance(v, Const):
            return self.const(v.tensor, a.name)
        raise QCError("expected a shape value", node=a.name)

    # op families ---------------------------------------------------------------------------
    def lower_grid_op(self, n: fx.Node) -> None:
        x = self.int_of(n, n.args[0])
        if is_op(n, *RESCALES):
            c = float(n.args[1])
            self.env[n] = IntVal(x.node, x.scale * c if is_op(n, aten.mul) else x.scale / c, x.zp, x.qmin, x.qmax,
                                 x.axis, x.acc)
            return
        if (x.acc or not x.per_tensor) and not is_op(n, *MONOTONE_CLAMPS):
            self.fail(n, "a shape op on an accumulator or a per-channel value")
        if is_op(n, *MONOTONE_CLAMPS):
            lo, hi = _clamp_bounds(n)
            if x.acc:  # relu of an accumulator (conv/linear + relu, quantized after the relu)
                if lo != 0.0 or hi is not None:
                    self.fail(n, "only a ReLU (clamp at 0) can act on an accumulator")
                node = self.call(aten.clamp_min.default, (x.node, 0), name=n.name)
                self.env[n] = IntVal(node, x.scale, 0, 0, x.qmax, x.axis, acc=True)
                return
            s = x.s()
            for bound in (lo, hi):
                if bound is not None and abs(bound / s - round(bound / s)) > 1e-6:
                    self.fail(n, f"clamp bound {bound} does not lie on the input grid (scale {s:.6g})")
            qlo = x.qmin if lo is None else max(x.qmin, min(x.qmax, int(round(lo / s)) + x.zp))
            qhi = x.qmax if hi is None else max(x.qmin, min(x.qmax, int(round(hi / s)) + x.zp))
            node = self.call(aten.clamp.default, (x.node, qlo, qhi), name=n.name)
            self.env[n] = IntVal(node, x.scale, x.zp, qlo, qhi)
            return
        if is_op(n, aten.max_pool2d_with_indices):
            node = self.call(n.target, fx.node.map_arg(n.args, self._arg), fx.node.map_arg(n.kwargs, self._arg))
            vals = self.call(operator.getitem, (node, 0))
            self.env[n] = (IntVal(vals, x.scale, x.zp, x.qmin, x.qmax), FloatVal(self.call(operator.getitem, (node, 1))))
            return
        node = self.call(n.target, fx.node.map_arg(n.args, self._arg), fx.node.map_arg(n.kwargs, self._arg),
                         name=n.name)
        if is_op(n, aten.unbind, aten.split, aten.split_with_sizes, aten.chunk):
            k = len(n.meta["val"])
            self.env[n] = tuple(IntVal(self.call(operator.getitem, (node, i)), x.scale, x.zp, x.qmin, x.qmax)
                                for i in range(k))
        else:
            self.env[n] = IntVal(node, x.scale, x.zp, x.qmin, x.qmax)

    def _arg(self, a):
        v = self.env.get(a)
        if isinstance(v, IntVal):
            return v.node
        return self._plain(a)

    def lower_matmul(self, n: fx.Node) -> None:
        if is_op(n, aten.addmm):
            bias_arg, a_arg, b_arg = n.args[0], n.args[1], n.args[2]
        else:
            a_arg, b_arg = n.args[0], n.args[1]
            bias_arg = n.args[2] if is_op(n, aten.linear, aten.conv1d, aten.conv2d, aten.conv3d) and len(n.args) > 2 \
                else None
        a, b = self.int_of(n, a_arg), self.int_of(n, b_arg)
        if a.acc or b.acc or not a.per_tensor:
            self.fail(n, "operands must be quantized activations (per tensor) and weights")
        if not b.per_tensor and b.zp != 0:
            self.fail(n, "per-channel operand with a zero point")
        s_acc = a.s() * b.scale  # per output channel when b is per channel
        kind = op_name(n).split(".")[-1]
        if kind == "linear" or kind.startswith("conv"):
            if not b.per_tensor and b.axis % b_arg.meta["val"].dim() != 0:
                self.fail(n, "weight scales must be per output channel")
            out_axis = -1 if kind == "linear" else 1
        else:
            bd = b_arg.meta["val"].dim()
            if not b.per_tensor and b.axis % bd != bd - 1:
                self.fail(n, "matmul weight scales must be per output column")
            out_axis = -1
        w_t = b_arg.meta["val"]
        k = w_t.shape[1] * math.prod(w_t.shape[2:]) if kind.startswith("conv") else \
            (w_t.shape[-1] if kind == "linear" else w_t.shape[-2])
        bias = None
        bias_max = 0
        if bias_arg is not None:
            bv = self.env.get(bias_arg)
            if not isinstance(bv, Const):
                self.fail(n, "bias is not a constant")
            bq = torch.round(bv.tensor.double() / s_acc).to(torch.int64)
            bias_max = int(bq.abs().max()) if bq.numel() else 0
            bias = self.const(bq.to(torch.int32), f"{n.name}_bias_int")
        x_range = max(a.qmax - a.zp, a.zp - a.qmin)
        w_max = max(abs(b.qmax - b.zp), abs(b.qmin - b.zp))
        if isinstance(k, int):
            I.check_accumulator(k, x_range, w_max, bias_max, where=n.name)
        if kind == "linear":
            node = self.call(I.int_linear, (a.node, a.zp, b.node, bias), name=n.name)
        elif kind.startswith("conv"):
            groups = n.args[6] if len(n.args) > 6 else 1
            d = w_t.dim() - 2
            stride = list(n.args[3]) if len(n.args) > 3 else [1] * d
            padding = n.args[4] if len(n.args) > 4 else [0] * d
            if isinstance(padding, str):
                self.fail(n, f"string padding '{padding}'")
            padding = list(padding)
            dilation = list(n.args[5]) if len(n.args) > 5 else [1] * d
            node = self.call(I.int_conv, (a.node, a.zp, b.node, bias, stride, padding, dilation, groups), name=n.name)
        else:
            node = self.call(I.int_matmul, (a.node, a.zp, b.node, b.zp), name=n.name)
            if bias is not None:
                node = self.call(aten.add.Tensor, (node, bias))
        self.env[n] = IntVal(node, s_acc.reshape(()) if s_acc.numel() == 1 else s_acc.flatten(), 0,
                             -(2**31), 2**31 - 1, out_axis, acc=True)

    def lower_mul_const(self, n) -> None:
        """x * c (or x / c) for a constant c along at most one axis: no arithmetic, only the
        scale changes, to s_x * c per channel (a signed multiplier of the next requant)."""
        x = self.int_of(n, n.args[0])
        c = self.const_value(n.args[1]).double()
        c = 1.0 / c if is_op(n, aten.div) else c
        out_rank = n.meta["val"].dim()
        if c.dim() > out_rank:
            self.fail(n, "constant has more dims than the product")
        shape = [1] * (out_rank - c.dim()) + list(c.shape)
        axes = [i for i, d in enumerate(shape) if d != 1]
        if x.acc or not x.per_tensor or len(axes) > 1 or list(n.meta["val"].shape) != list(
                n.args[0].meta["val"].shape):
            self.fail(n, "multiplies by a constant that varies along more than one axis (or broadcasts the input)")
        if bool((c == 0).any()):
            self.fail(n, "multiplies by a constant with zeros")
        scale = x.s() * c.flatten()
        self.env[n] = IntVal(x.node, scale.reshape(()) if scale.numel() == 1 else scale, x.zp, x.qmin, x.qmax,
                             axes[0] if axes else 0, acc=True)

    def lower_add(self, n, scale, zp, qmin, qmax) -> IntVal:
        s_y = float(scale.reshape(()))
        sign = -1 if is_op(n, aten.sub) else 1
        alpha = n.kwargs.get("alpha", n.args[2] if len(n.args) > 2 else 1)
        a_arg, b_arg = n.args[0], n.args[1]
        if is_op(n, aten.rsub):
            a_arg, b_arg, sign = b_arg, a_arg, -1
        terms = []
        for arg, coef in ((a_arg, 1.0), (b_arg, sign * float(alpha))):
            v = self.env.get(arg) if isinstance(arg, fx.Node) else None
            if isinstance(v, IntVal):
                if not v.per_tensor:
                    self.fail(n, "adds a per-channel value")
                terms.append(("int", v, coef * v.s() / s_y))
            elif isinstance(v, (Const, ConstExpr)) or not isinstance(arg, fx.Node):
                terms.append(("const", arg, coef))
            else:
                self.fail(n, "adds a value that is not quantized")
        mults = [abs(m) for kind, _, m in terms if kind == "int"]
        if not mults:
            self.fail(n, "adds two constants")
        # one shift for both rescales: the larger multiplier gets 31 bits
        _, c = I.dyadic(torch.tensor(max(mults)))
        shift = int(c)
        ints, consts = [], []
        for kind, v, m in terms:
            if kind == "int":
                ints.append((v, int(round(m * 2.0**shift))))
            else:  # a constant term, as an int64 on the grid s_y / 2^shift (with its sign)
                consts.append((v, m))
        if len(ints) == 2:
            (va, ma), (vb, mb) = ints
            bnode, bzp = vb.node, vb.zp
        else:
            (va, ma), mb, bzp = ints[0], 1, 0
            arg, coef = consts[0]
            fine = torch.tensor(s_y / 2.0**shift / abs(coef), dtype=torch.float64)
            if isinstance(arg, fx.Node):
                bnode = self.materialize(arg, fine, 0, None, None)
            else:
                bnode = self.const(torch.tensor(round(float(arg) / float(fine)), dtype=torch.int64), f"{n.name}_const")
            mb = 1 if coef > 0 else -1
        node = self.call(I.int_add, (va.node, va.zp, ma, bnode, bzp, mb, shift, zp, qmin, qmax), name=n.name)
        return IntVal(node, scale.reshape(()).clone(), zp, qmin, qmax)

    def lower_lut(self, n, fq, scale, zp, qmin, qmax) -> IntVal:
        x = self.int_of(n, n.args[0])
        if x.acc or not x.per_tensor:
            self.fail(n, "elementwise op on an accumulator")
        levels = x.qmax - x.qmin + 1
        if levels > MAX_LUT_LEVELS:
            self.fail(n, f"input has {levels} levels (a table lookup needs at most {MAX_LUT_LEVELS})")
        q = torch.arange(x.qmin, x.qmax + 1, dtype=torch.float32)
        xin = (q - float(x.zp)) * torch.tensor(x.s(), dtype=torch.float32)  # as qc::fake_quant computes it
        rest = [self.g.attr(a) if isinstance(a, fx.Node) else a for a in n.args[1:]]
        y = n.target(xin, *rest, **n.kwargs)
        table = quantize_ref(y, scale.float().reshape(()), torch.tensor(zp), qmin, qmax, 0, 0).to(
            I.int_dtype(qmin, qmax))
        self.choices[n.name] = f"{op_name(n)}: table lookup ({levels} entries)"
        node = self.call(I.int_lut, (x.node, self.const(table, f"{n.name}_table"), x.qmin), name=n.name)
        return IntVal(node, scale.reshape(()).clone(), zp, qmin, qmax)

    def lower_softmax(self, n, scale, zp, qmin, qmax) -> IntVal:
        v, mask = self.env.get(n.args[0]), None
        if isinstance(v, Masked):
            v, mask = v.value, v.mask
        x = v if isinstance(v, IntVal) else self.int_of(n, n.args[0])
        if x.acc or not x.per_tensor:
            self.fail(n, "softmax of an accumulator")
        dim = n.args[1]
        table = I.exp_table(x.s(), x.qmax - x.qmin + 1)
        b, c = I.dyadic(torch.tensor(1.0 / float(scale.reshape(())), dtype=torch.float64))
        self.choices[n.name] = f"{op_name(n)}: exp table (2^-{I.EXP_BITS}) and row sum"
        node = self.call(I.int_softmax, (x.node, mask, self.const(table, f"{n.name}_exp"), dim, int(b), int(c), zp, qmin,
                                         qmax), name=n.name)
        return IntVal(node, scale.reshape(()).clone(), zp, qmin, qmax)

    def lower_layer_norm(self, n, scale, zp, qmin, qmax) -> IntVal:
        x = self.int_of(n, n.args[0])
        shape = list(n.args[1])
        if len(shape) != 1:
            self.fail(n, "LayerNorm over more than the last dim")
        w = self.env.get(n.args[2]) if len(n.args) > 2 and n.args[2] is not None else None
        b = self.env.get(n.args[3]) if len(n.args) > 3 and n.args[3] is not None else None
        for v in (w, b):
            if v is not None and not isinstance(v, Const):
                self.fail(n, "LayerNorm affine parameters must be constants")
        eps = float(n.args[4]) if len(n.args) > 4 else 1e-5
        eps_i, k, gamma, beta, shift = I.layer_norm_consts(w.tensor if w else None, b.tensor if b else None, shape[0],
                                                           eps, x.s(), float(scale.reshape(())), x.qmax - x.qmin + 1)
        self.choices[n.name] = f"{op_name(n)}: integer mean/variance, integer square root"
        node = self.call(I.int_layer_norm, (x.node, x.zp, eps_i, k, self.const(gamma, f"{n.name}_gamma"),
                                            self.const(beta, f"{n.name}_beta"), shift, zp, qmin, qmax), name=n.name)
        return IntVal(node, scale.reshape(()).clone(), zp, qmin, qmax)

    def lower_mean(self, n, scale, zp, qmin, qmax) -> IntVal:
        x = self.int_of(n, n.args[0])
        if x.acc or not x.per_tensor:
            self.fail(n, "mean of an accumulator")
        dims, keep, count = _reduction(n, 1)
        if not isinstance(count, int):
            self.fail(n, "mean over a dynamic dimension")
        s = self.call(I.int_sum, (x.node, x.zp, dims, keep), name=f"{n.name}_sum")
        acc = IntVal(s, torch.tensor(x.s() / count, dtype=torch.float64), 0, -(2**31), 2**31 - 1, acc=True)
        return self.requant(acc, scale, zp, qmin, qmax, n.name)

    def const_value(self, a) -> torch.Tensor:
        """The value of a constant expression, evaluated now (fails on shape-dependent ones)."""
        if not isinstance(a, fx.Node):
            return a
        v = self.env.get(a)
        if isinstance(v, Const):
            return v.tensor
        if isinstance(v, ConstExpr):
            n = v.old
            return n.target(*fx.node.map_arg(n.args, self.const_value), **fx.node.map_arg(n.kwargs, self.const_value))
        self.fail(a, "depends on the input's shape; expected a constant")

    def materialize(self, a: fx.Node, scale, zp, qmin, qmax) -> fx.Node:
        """A constant (or a grid op of one) as integers on the grid (scale, zp, [qmin, qmax])."""
        v = self.env[a]
        if isinstance(v, Const):
            if qmin is None:  # int64, unclamped, in float64: the fine grid of an int_add constant
                return self.const(torch.round(v.tensor.double() / scale.reshape(())).to(torch.int64), f"{a.name}_int")
            q = quantize_ref(v.tensor, scale.float().reshape(()), torch.tensor(zp), qmin, qmax, 0, 0)
            return self.const(q.to(I.int_dtype(qmin, qmax)), f"{a.name}_int")
        n = v.old
        if not (_preserves_grid(n) and not is_op(n, *RESCALES, *MONOTONE_CLAMPS)):
            self.fail(n, "a computed constant that is not a reshape of a constant")
        src = n.args[0]
        inner = self.materialize(src, scale, zp, qmin, qmax)
        args = (inner, *fx.node.map_arg(n.args[1:], self._arg))
        return self.call(n.target, args, fx.node.map_arg(n.kwargs, self._arg))

    def lower_int_derived(self, n) -> None:
        """Integer-valued floats (masks, token counts) stay integers at scale 1."""
        x = self.int_of(n, n.args[0])
        if is_op(n, aten.sum):
            dims, keep, _ = _reduction(n, 1)
            node = self.call(I.int_sum, (x.node, x.zp, dims, keep), name=n.name)
            self.env[n] = IntVal(node, torch.tensor(1.0, dtype=torch.float64), 0, -(2**31), 2**31 - 1, acc=True)
        elif is_op(n, aten.clamp, aten.clamp_min):
            # an integer x >= 0: max(x, eps) with 0 < eps <= 1 equals max(x, 1) except at x = 0, where it only
            # divides a sum over nothing (0 / eps = 0 / 1 = 0; int_div of 0 gives 0 either way)
            node = self.call(aten.clamp_min.default, (x.node, 1), name=n.name)
            self.env[n] = IntVal(node, x.scale, 0, 1, x.qmax, acc=True)
        else:
            self.lower_grid_op(n)

    def lower_mul(self, n) -> None:
        """a * b of two quantized values: (a - z_a)(b - z_b), an int64 accumulator at s_a s_b."""
        a, b = self.int_of(n, n.args[0]), self.int_of(n, n.args[1])
        if not (a.per_tensor and b.per_tensor):
            self.fail(n, "multiplies per-channel values")
        node = self.call(I.int_mul, (a.node, a.zp, b.node, b.zp), name=n.name)
        self.env[n] = IntVal(node, torch.tensor(a.s() * b.s(), dtype=torch.float64), 0, -(2**62), 2**62, acc=True)

    def lower_sum(self, n) -> None:
        x = self.int_of(n, n.args[0])
        if not x.per_tensor:
            self.fail(n, "sum of a per-channel value")
        dims, keep, _ = _reduction(n, 1)
        node = self.call(I.int_sum, (x.node, x.zp, dims, keep), name=n.name)
        self.env[n] = IntVal(node, x.scale.clone(), 0, -(2**31), 2**31 - 1, acc=True)

    def lower_l2_norm(self, n) -> None:
        x = self.int_of(n, n.args[0])
        order = n.args[1] if len(n.args) > 1 else n.kwargs.get("ord", 2)
        if order != 2 or not x.per_tensor:
            self.fail(n, "only the per-tensor-scaled L2 norm has an integer kernel")
        dims, keep, count = _reduction(n, 2)
        if not isinstance(count, int):
            self.fail(n, "L2 norm over a dynamic dimension")
        k = I.l2_frac_bits(count, max(x.qmax - x.zp, x.zp - x.qmin) + 1)
        node = self.call(I.int_l2_norm, (x.node, x.zp, dims, keep, k), name=n.name)
        self.choices[n.name] = f"{op_name(n)}: integer square root of the sum of squares ({k} fractional bits)"
        self.env[n] = IntVal(node, torch.tensor(x.s() / 2.0**k, dtype=torch.float64), 0, 0, 2**62, acc=True)

    def lower_div(self, n, scale, zp, qmin, qmax) -> IntVal:
        """a / b for an integer divisor b >= 0 (a count, a norm) -> qc::int_div onto the output grid."""
        a, b = self.int_of(n, n.args[0]), self.int_of(n, n.args[1])
        if not (a.per_tensor and b.per_tensor) or b.zp != 0 or b.qmin < 0:
            self.fail(n, "divides by a value that is not a non-negative integer quantity")
        m, c = I.dyadic(torch.tensor(a.s() / (b.s() * float(scale.reshape(()))), dtype=torch.float64))
        node = self.call(I.int_div, (a.node, a.zp, b.node, int(m), int(c), zp, qmin, qmax), name=n.name)
        return IntVal(node, scale.reshape(()).clone(), zp, qmin, qmax)

    def lower_embedding(self, n, scale, zp, qmin, qmax) -> IntVal:
        """embedding(table, ids) with a per-row quantized table: the table is requantized onto
        the output grid at compile time (the same qc::requant arithmetic, done ahead), so the
        graph only gathers rows."""
        t = self.int_of(n, n.args[0])
        if t.node not in self._const_vals or t.zp != 0:
            self.fail(n, "the embedding table is not a symmetric quantized constant")
        rows = self._const_vals[t.node]
        b, c = I.dyadic(t.scale / float(scale.reshape(())))
        table = I.requant(rows, 0, b, c, zp, qmin, qmax, 0)
        self.choices[n.name] = f"{op_name(n)}: table requantized to the output grid at compile time"
        node = self.call(aten.embedding.default, (self.const(table, f"{n.name}_table"), self._arg(n.args[1]),
                                                  *n.args[2:]), name=n.name)
        return IntVal(node, scale.reshape(()).clone(), zp, qmin, qmax)

    def lower_cat(self, n, scale, zp, qmin, qmax) -> IntVal:
        parts = []
        for a in n.args[0]:
            v = self.env.get(a)
            if isinstance(v, IntVal):
                parts.append(self.requant(v, scale, zp, qmin, qmax, f"{n.name}_{a.name}").node)
            elif isinstance(v, (Const, ConstExpr)):
                parts.append(self.materialize(a, scale, zp, qmin, qmax))
            else:
                self.fail(n, f"concatenates {a.name}, which is not quantized")
        node = self.call(aten.cat.default, (parts, *n.args[1:]), name=n.name)
        return IntVal(node, scale.reshape(()).clone(), zp, qmin, qmax)


def _fix_vals(g: Graph) -> None:
    """Drop unused nodes; record meta['val'] on the new nodes by re-propagating fake tensors
    from the inputs (ir.verify does it)."""
    from qcompiler.ir import eliminate_dead_code
    for n in g.nodes:
        if n.op == "call_function":
            n.meta.pop("val", None)
    eliminate_dead_code(g)
    g.recompile()


@register
class LowerToInteger(Pass):
    """The fake-quant graph (from annotate_integer) -> an integer-only graph of qc:: ops."""

    name = "lower_integer"
    numerics = NUMERICS
    requires = ("integer_annotated", "quantized")
    provides = ("integer",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        allow = tuple(getattr(ctx.config, "allow_float", ()) or ())
        low = _Lowering(graph, allow)
        g = low.run()
        _fix_vals(g)
        from qcompiler.ir import verify
        verify(g)
        verify_integer(g)
        g.meta["facts"] = sorted(set(graph.meta.get("facts", [])) | {"integer"})
        stats = {"integer_ops": sum(v for k, v in low.counts.items() if k.startswith("qc.")),
                 "float_islands": len(low.islands)}
        return PassResult(g, True, stats, [f"{i}: kept in float (allowed)" for i in low.islands])


def verify_integer(g: Graph) -> None:
    """Raise a QCError naming the first float value between the input quantize and the output
    dequantize that is not an allowed float island."""
    islands = set(g.meta.get("integer", {}).get("float_islands", []))
    boundary = (I.quantize, I.dequantize)
    for n in g.nodes:
        v = n.meta.get("val")
        if not (isinstance(v, torch.Tensor) and v.dtype.is_floating_point) or n.op == "placeholder":
            continue
        if n.name in islands:
            continue
        users = list(n.users)
        if n.op == "get_attr" and all(u.target in boundary for u in users):
            continue  # scales of the boundary ops
        if n.target is I.dequantize and all(u.op == "output" or u.name in islands for u in users):
            continue
        if n.target is I.dequantize and all(u.target is I.quantize for u in users):
            continue
        raise QCError("float value inside the integer graph (not an allowed float island)", node=n.name,
                      op=op_name(n))


def agreement(fq_graph: Graph, int_graph: Graph, batches) -> dict:
    """How closely the integer graph reproduces its fake-quant graph, per output, in units of
    the output quantizer's step (LSB): fraction of elements equal, within 1 LSB, and the
    largest difference, over the given input batches."""
    out = {}
    outs = list(int_graph.graph.output_node().args[0])
    steps = {}
    for spec, o in zip(int_graph.outputs, outs):
        if isinstance(o, fx.Node) and o.target is I.dequantize:
            steps[spec.name] = int_graph.attr(o.args[1]).double()
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for args in batches:
            a, b = fq_graph(*args), int_graph(*args)
            for spec, x, y in zip(int_graph.outputs, a, b):
                if spec.name not in steps:
                    continue
                lsb = (x.double() - y.double()).abs() / steps[spec.name]
                acc = sums.setdefault(spec.name, [0, 0, 0, 0.0])
                acc[0] += lsb.numel()
                acc[1] += int((lsb < 1e-3).sum())
                acc[2] += int((lsb <= 1 + 1e-3).sum())
                acc[3] = max(acc[3], float(lsb.max()) if lsb.numel() else 0.0)
    for name, (n, eq, one, mx) in sums.items():
        out[name] = {"elements": n, "equal": round(eq / max(n, 1), 6), "within_1_lsb": round(one / max(n, 1), 6),
                     "max_lsb": round(mx, 3)}
    return out
