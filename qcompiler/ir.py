"""The IR: a torch.fx GraphModule at ATen level, plus the model's named inputs and outputs.

Weights are `get_attr` nodes on the GraphModule (not lifted placeholders), so passes read
and replace them directly. Quantization state lives in `node.meta[QMETA]` and nowhere else.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .errors import QCError

QMETA = "qc"  # the one node.meta key that carries quantization state


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: its name, shape (a str names a dynamic dim) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # torch dtype name without the prefix, e.g. "float32", "int64"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: dict) -> "TensorSpec":
        return TensorSpec(d["name"], tuple(d["shape"]), d["dtype"])

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def check(self, value: Any, where: str = "input") -> None:
        """Raise a QCError unless `value` has this spec's rank, static dims and dtype."""
        shape = tuple(getattr(value, "shape", ()))
        if len(shape) != len(self.shape) or any(
            isinstance(d, int) and d != s for d, s in zip(self.shape, shape)
        ):
            raise QCError(f"{where} '{self.name}' has shape {list(shape)}, the model expects {list(self.shape)}")
        dt = str(getattr(value, "dtype", "")).replace("torch.", "")
        if dt != self.dtype and not (_is_int(dt) and _is_int(self.dtype)) and not (_is_float(dt) and _is_float(self.dtype)):
            raise QCError(f"{where} '{self.name}' has dtype {dt}, the model expects {self.dtype}")


def _is_int(dt: str) -> bool:
    return dt.startswith("int") or dt.startswith("uint")


def _is_float(dt: str) -> bool:
    return dt.startswith("float") or dt.startswith("bfloat")


@dataclass
class Graph:
    """A model in qcompiler's IR.

    `gm` is an ATen-level fx GraphModule whose placeholders are the model inputs in order
    and whose output node returns a tuple of the model outputs in order.
    """

    gm: fx.GraphModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: str = "module"
    meta: dict = field(default_factory=dict)  # model-level facts (e.g. ONNX opset, loader notes)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    @property
    def nodes(self):
        return self.gm.graph.nodes

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.gm(*args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def run_named(self, feeds: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Run with inputs keyed by name (numpy arrays or tensors); returns outputs by name."""
        args = []
        for spec in self.inputs:
            if spec.name not in feeds:
                raise QCError(f"missing input '{spec.name}' (the model's inputs are {[s.name for s in self.inputs]})")
            v = feeds[spec.name]
            t = v if isinstance(v, torch.Tensor) else torch.from_numpy(v)
            spec.check(t)
            args.append(t.to(spec.torch_dtype()))
        with torch.no_grad():
            outs = self(*args)
        return {spec.name: o for spec, o in zip(self.outputs, outs)}

    def copy(self) -> "Graph":
        """A deep copy: passes that must not touch their input work on one."""
        gm = copy.deepcopy(self.gm)
        return Graph(gm, list(self.inputs), list(self.outputs), self.source, copy.deepcopy(self.meta))

    def attr(self, node: fx.Node) -> torch.Tensor:
        """The tensor a `get_attr` node refers to."""
        obj: Any = self.gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj

    def add_constant(self, value: torch.Tensor, hint: str, before: fx.Node) -> fx.Node:
        """Register `value` as a buffer with a fresh name and insert a get_attr node for it."""
        base = "".join(c if c.isalnum() else "_" for c in hint) or "const"
        name, i = base, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        self.gm.register_buffer(name, value.detach().clone().contiguous())
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(name)
        node.meta["val"] = value
        return node

    def recompile(self) -> None:
        self.graph.lint()
        self.gm.recompile()

    def op_nodes(self) -> list[fx.Node]:
        return [n for n in self.nodes if n.op == "call_function"]

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.nodes if n.op == "placeholder"]

    def prune_attrs(self) -> None:
        """Drop buffers/parameters no get_attr node refers to any more."""
        used = {n.target for n in self.nodes if n.op == "get_attr"}
        for name in list(dict(self.gm.named_buffers()).keys()) + list(dict(self.gm.named_parameters()).keys()):
            if name not in used and "." not in name:
                if name in self.gm._buffers:
                    del self.gm._buffers[name]
                elif name in self.gm._parameters:
                    del self.gm._parameters[name]


def op_name(node: fx.Node) -> str:
    """A readable operator name: 'aten.linear', 'qc.fake_quant', 'getitem', ..."""
    t = node.target
    if node.op != "call_function":
        return node.op
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        return f"{t._qualified_op_name.replace('::', '.')}"
    return getattr(t, "__name__", str(t))


def is_op(node: fx.Node, *packets) -> bool:
    """True when `node` calls one of the given ATen/custom op packets (any overload)."""
    if node.op != "call_function":
        return False
    t = node.target
    pkt = t.overloadpacket if isinstance(t, torch._ops.OpOverload) else t
    return any(pkt is p for p in packets)


# -- verifier ---------------------------------------------------------------------------

_ALLOWED_FUNCS = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                  operator.truediv, operator.neg, operator.eq, operator.ne, operator.lt,
                  operator.le, operator.gt, operator.ge, operator.mod, operator.pow}


def is_const(node) -> bool:
    """A constant of the graph (a get_attr node: a weight, bias or folded tensor)."""
    return isinstance(node, fx.Node) and node.op == "get_attr"


def is_private_const(node) -> bool:
    """A constant used by one node only: a pass may rewrite it in place without changing any
    other consumer (shared weights are not private)."""
    return is_const(node) and len(node.users) == 1


def verify(g: Graph) -> None:
    """Check the graph is well formed; raise QCError naming the first bad node.

    - every call is an ATen op, a qc custom op, a SymInt helper or a python operator;
    - every get_attr resolves to a tensor; every argument is a node of this graph;
    - placeholders match the declared inputs; the output arity matches the declared outputs;
    - shapes and dtypes are consistent: fake tensors are propagated through the graph again
      (symbolic dims included) and must agree with every value's recorded meta["val"], so a
      rewrite that changes a shape or dtype without saying so is caught at the node that did it.
    """
    graph = g.graph
    try:
        graph.lint()
    except Exception as e:  # fx's own structural checks (use-before-def, dangling users)
        raise QCError(f"graph is malformed: {e}") from None
    known = set(graph.nodes)
    phs = g.placeholders()
    if len(phs) != len(g.inputs):
        raise QCError(f"graph has {len(phs)} placeholders but {len(g.inputs)} declared inputs")
    for n in graph.nodes:
        for a in n.all_input_nodes:
            if a not in known:
                raise QCError("argument is not a node of this graph", node=n.name, op=op_name(n))
        if n.op == "get_attr":
            try:
                v = g.attr(n)
            except AttributeError:
                raise QCError(f"get_attr target '{n.target}' does not exist", node=n.name) from None
            if not isinstance(v, torch.Tensor):
                raise QCError("get_attr target is not a tensor", node=n.name)
        elif n.op == "call_function":
            t = n.target
            ok = (
                isinstance(t, torch._ops.OpOverload) and t.namespace in ("aten", "qc", "prims")
            ) or t in _ALLOWED_FUNCS or getattr(t, "__module__", "").startswith(("torch.fx.experimental", "torch._refs"))
            if not ok and getattr(t, "__name__", "") in ("sym_size", "sym_sqrt", "sym_max", "sym_min", "sym_float", "sym_int", "sym_not", "sym_ite"):
                ok = True
            if not ok:
                raise QCError("operator is not in the IR (ATen, qc custom ops or SymInt helpers)", node=n.name, op=op_name(n))
        elif n.op == "call_module" or n.op == "call_method":
            raise QCError(f"{n.op} nodes are not allowed in the IR", node=n.name, op=str(n.target))
        elif n.op == "output":
            outs = n.args[0]
            k = len(outs) if isinstance(outs, (tuple, list)) else 1
            if k != len(g.outputs):
                raise QCError(f"graph returns {k} values but {len(g.outputs)} outputs are declared")
        if n.op in ("call_function", "get_attr") and not n.users and not _has_side_effect(n):
            raise QCError("value is computed but never used (run the cleanup pass)", node=n.name, op=op_name(n))
    _check_shapes(g)


def _same_dim(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(a == b)
    except Exception:  # undecidable symbolic relation: nothing to report
        return True


def _check_shapes(g: Graph) -> None:
    """Re-propagate fake tensors from the placeholders' recorded values and compare."""
    from torch._guards import detect_fake_mode

    vals = [p.meta.get("val") for p in g.placeholders()]
    mode = detect_fake_mode(vals) if all(isinstance(v, torch.Tensor) for v in vals) else None
    if mode is None:  # hand-built graph without recorded values: nothing to compare against
        return
    env: dict[fx.Node, object] = {}
    args_in = iter(vals)
    for n in g.nodes:
        if n.op == "placeholder":
            env[n] = next(args_in)
        elif n.op == "get_attr":
            env[n] = mode.from_tensor(g.attr(n), static_shapes=True)
        elif n.op == "call_function":
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            try:
                with mode:
                    out = n.target(*args, **kwargs)
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise QCError(f"shape/dtype propagation fails here: {type(e).__name__}: {msg}",
                              node=n.name, op=op_name(n)) from None
            rec = n.meta.get("val")
            if isinstance(rec, torch.Tensor) and isinstance(out, torch.Tensor):
                if rec.dtype != out.dtype or rec.dim() != out.dim() or not all(
                        _same_dim(a, b) for a, b in zip(rec.shape, out.shape)):
                    raise QCError(f"recorded value {dtype_name(rec.dtype)}{list(rec.shape)} disagrees with what the op "
                                  f"computes: {dtype_name(out.dtype)}{list(out.shape)}", node=n.name, op=op_name(n))
            elif rec is None and isinstance(out, torch.Tensor):
                n.meta["val"] = out  # a pass added this node without a value: record it
            env[n] = out


def _has_side_effect(n: fx.Node) -> bool:
    t = n.target
    return isinstance(t, torch._ops.OpOverload) and (t._schema.is_mutable or t.namespace == "aten" and "assert" in t._opname)


def eliminate_dead_code(g: Graph) -> int:
    """Erase call_function/get_attr nodes with no users (side-effecting ops stay); drop
    buffers nothing refers to. Returns how many nodes were erased."""
    erased = 0
    for n in reversed(list(g.nodes)):
        if n.op in ("call_function", "get_attr") and not n.users and not _has_side_effect(n):
            g.graph.erase_node(n)
            erased += 1
    if erased:
        g.prune_attrs()
    return erased


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")
