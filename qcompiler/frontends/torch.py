"""torch frontend: nn.Module or saved torch.export program -> Graph (ATen level).

We keep torch.export's default ATen opset (aten.linear, aten.conv2d, aten.layer_norm, ...)
rather than decomposing to core ATen: passes match whole operators.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import QCError
from ..ir import Graph, TensorSpec, dtype_name


def trace(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic: Mapping[str, Mapping[int, str]] | str | None = "batch",
) -> Graph:
    """Export `module` with torch.export and return it as a Graph.

    `dynamic` says which dims may vary: "batch" (dim 0 of every input, the default),
    None (all static), or {input_name: {dim: "name"}}. Dims the model pins stay static.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    module = module.eval()
    names = list(input_names) if input_names else _forward_arg_names(module, len(example_inputs))
    dyn = _dynamic_map(names, example_inputs, dynamic)
    dynamic_shapes = None
    if any(dyn.values()):
        dynamic_shapes = tuple({d: Dim.AUTO for d in dyn[n]} or None for n in names)
    try:
        with torch.no_grad():
            ep = torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except QCError:
        raise
    except Exception as e:
        raise QCError(f"torch.export could not trace the model: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return from_exported_program(ep, input_names=names, output_names=output_names, dynamic=dyn)


def load_pt2(path: str | os.PathLike) -> Graph:
    """Load a program saved with `torch.export.save`."""
    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise QCError(f"{path}: not a readable torch.export program ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    g = from_exported_program(ep)
    g.source = os.path.basename(str(path))
    return g


def from_exported_program(
    ep: ExportedProgram,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic: Mapping[str, Mapping[int, str]] | None = None,
) -> Graph:
    """Turn an ExportedProgram into a Graph: parameters/buffers/constants become get_attr."""
    sig = ep.graph_signature
    src = ep.graph_module.graph
    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    state = {**ep.state_dict, **ep.constants}
    specs = {s.arg.name: s for s in sig.input_specs}
    user_phs = []
    attr_names: dict[str, str] = {}

    def attr_for(target: str) -> str:
        if target not in attr_names:
            safe = "w_" + "".join(c if c.isalnum() else "_" for c in target)
            name, i = safe, 0
            while hasattr(root, name):
                i += 1
                name = f"{safe}_{i}"
            t = state[target]
            if isinstance(t, torch.nn.Parameter):
                t = t.detach()
            if not isinstance(t, torch.Tensor):
                raise QCError(f"model constant '{target}' is not a tensor ({type(t).__name__})")
            root.register_buffer(name, t.contiguous())
            attr_names[target] = name
        return attr_names[target]

    for n in src.nodes:
        if n.op == "placeholder":
            spec = specs[n.name]
            if spec.kind == InputKind.USER_INPUT:
                new = graph.placeholder(n.name)
                user_phs.append(n)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                new = graph.get_attr(attr_for(spec.target))
            else:
                raise QCError(f"unsupported exported input kind {spec.kind}", node=n.name)
            new.meta = dict(n.meta)
            env[n] = new
        elif n.op == "output":
            outs = n.args[0]
            user_outs = [
                env[o] if isinstance(o, fx.Node) else o
                for o, s in zip(outs, sig.output_specs)
                if s.kind == OutputKind.USER_OUTPUT
            ]
            if any(s.kind not in (OutputKind.USER_OUTPUT,) for s in sig.output_specs):
                raise QCError("the model mutates buffers in forward (run it in eval mode, without in-place state updates)")
            graph.output(tuple(user_outs))
        else:
            new = graph.node_copy(n, lambda x: env[x])
            env[n] = new
    gm = fx.GraphModule(root, graph)
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    names = list(input_names) if input_names else [p.name for p in user_phs]
    for p, nm in zip([x for x in gm.graph.nodes if x.op == "placeholder"], names):
        p.name = p.target = _safe(nm)
    gm.recompile()
    dyn = dict(dynamic or {})
    symbols: dict[str, str] = {}
    for nm, p in zip(names, user_phs):
        v = p.meta.get("val")
        for i, d in enumerate(getattr(v, "shape", ())):
            if isinstance(d, torch.SymInt):
                label = dyn.get(nm, {}).get(i) or ("batch" if i == 0 else f"{_safe(nm)}_dim{i}")
                symbols.setdefault(str(d), label)
                dyn.setdefault(nm, {})[i] = symbols[str(d)]
    inputs = [_spec(nm, p.meta.get("val"), dyn.get(nm, {})) for nm, p in zip(names, user_phs)]
    out_nodes = list(gm.graph.output_node().args[0])
    onames = list(output_names) if output_names else (
        ["output"] if len(out_nodes) == 1 else [f"output_{i}" for i in range(len(out_nodes))]
    )
    outputs = [_spec(nm, o.meta.get("val") if isinstance(o, fx.Node) else None, {}, symbols)
               for nm, o in zip(onames, out_nodes)]
    return Graph(gm, inputs, outputs, source="module")


def _spec(name: str, val: Any, dyn: Mapping[int, str], symbols: Mapping[str, str] | None = None) -> TensorSpec:
    """A TensorSpec from an export value: symbolic dims become their names."""
    if not isinstance(val, torch.Tensor):
        return TensorSpec(name, (), "float32")
    shape: list[int | str] = []
    for i, d in enumerate(val.shape):
        if isinstance(d, torch.SymInt):
            shape.append(dyn.get(i) or (symbols or {}).get(str(d), str(d)))
        else:
            shape.append(int(d))
    return TensorSpec(name, tuple(shape), dtype_name(val.dtype))


def _safe(name: str) -> str:
    s = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return s if s and not s[0].isdigit() else f"x_{s}"


def _forward_arg_names(module: torch.nn.Module, k: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params][:k]
    except (TypeError, ValueError):
        names = []
    if len(names) < k:
        names += [f"input_{i}" for i in range(len(names), k)]
    return names


def _dynamic_map(names, example_inputs, dynamic) -> dict[str, dict[int, str]]:
    if dynamic is None:
        return {n: {} for n in names}
    if dynamic == "batch":
        return {n: ({0: "batch"} if x.dim() > 0 else {}) for n, x in zip(names, example_inputs)}
    if isinstance(dynamic, str):
        raise QCError(f"unknown dynamic mode '{dynamic}' (use 'batch', None or a mapping)")
    out = {n: {} for n in names}
    for k, v in dynamic.items():
        if k not in out:
            raise QCError(f"dynamic dims given for '{k}', which is not an input ({names})")
        out[k] = dict(v)
    return out
