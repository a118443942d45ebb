"""A plain serialization of the IR: the fx graph as JSON, its constants as one binary blob.

Nothing is pickled. Targets are named by qualified op name ("aten::reshape.default",
"qc::int_linear.default") or python operator ("operator.getitem"), arguments by value or
by node name, constants by (dtype, shape, offset) into the blob. Same graph, same bytes.
"""
from __future__ import annotations

import json
import operator

import numpy as np
import torch
import torch.fx as fx

from .errors import QCError
from .ir import Graph, TensorSpec

GRAPH_FORMAT = "qcompiler-graph"
GRAPH_VERSION = 1


def _target_name(t) -> str:
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}::{t._opname}.{t._overloadname}"
    if getattr(operator, getattr(t, "__name__", ""), None) is t:
        return f"operator.{t.__name__}"
    if getattr(t, "__module__", "").startswith("torch") and hasattr(torch, getattr(t, "__name__", "")) and \
            getattr(torch, t.__name__) is t:
        return f"torch.{t.__name__}"
    raise QCError(f"cannot serialize call target {t!r}")


def _resolve(name: str):
    if name.startswith("operator."):
        return getattr(operator, name[len("operator."):])
    if name.startswith("torch."):
        return getattr(torch, name[len("torch."):])
    ns, _, rest = name.partition("::")
    op, _, overload = rest.rpartition(".")
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except AttributeError:
        raise QCError(f"unknown op '{name}' in the serialized graph (is qcompiler's op library loaded?)") from None


def _enc(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, (list, tuple)):
        return {"list": [_enc(x) for x in a], "tuple": isinstance(a, tuple)}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).replace("torch.", "")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).replace("torch.", "")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).replace("torch.", "")}
    if isinstance(a, float):
        return {"float": a.hex()}  # exact round trip
    if a is None or isinstance(a, (bool, int, str)):
        return a
    raise QCError(f"cannot serialize argument {a!r} ({type(a).__name__})")


def _dec(a, env):
    if isinstance(a, dict):
        if "node" in a:
            return env[a["node"]]
        if "list" in a:
            xs = [_dec(x, env) for x in a["list"]]
            return tuple(xs) if a["tuple"] else xs
        if "dtype" in a:
            return getattr(torch, a["dtype"])
        if "memory_format" in a:
            return getattr(torch, a["memory_format"])
        if "device" in a:
            return torch.device(a["device"])
        if "layout" in a:
            return getattr(torch, a["layout"])
        if "float" in a:
            return float.fromhex(a["float"])
    return a


def dump(g: Graph) -> tuple[bytes, bytes]:
    """(graph JSON, constants blob)."""
    nodes, consts, blob = [], {}, bytearray()
    for n in g.nodes:
        d = {"name": n.name, "op": n.op}
        if n.op == "get_attr":
            t = g.attr(n).detach().contiguous().cpu()
            if n.target not in consts:
                raw = t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()
                consts[n.target] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                                    "offset": len(blob), "nbytes": len(raw)}
                blob += raw
                blob += b"\0" * ((-len(blob)) % 64)
            d["target"] = n.target
        elif n.op == "call_function":
            d["target"] = _target_name(n.target)
            d["args"], d["kwargs"] = _enc(list(n.args)), {k: _enc(v) for k, v in n.kwargs.items()}
        elif n.op == "output":
            d["args"] = _enc(list(n.args))
        nodes.append(d)
    doc = {"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "inputs": [s.to_json() for s in g.inputs],
           "outputs": [s.to_json() for s in g.outputs], "constants": consts, "nodes": nodes,
           "meta": {k: v for k, v in g.meta.items() if k in ("integer", "facts")}}
    return (json.dumps(doc, indent=0, sort_keys=True) + "\n").encode(), bytes(blob)


def load(graph_json: bytes, blob: bytes) -> Graph:
    try:
        doc = json.loads(graph_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QCError(f"corrupt serialized graph ({e})") from None
    if doc.get("format") != GRAPH_FORMAT or doc.get("version", 0) > GRAPH_VERSION:
        raise QCError("not a qcompiler graph, or written by a newer qcompiler")
    root = torch.nn.Module()
    for name, c in doc["constants"].items():
        dt = getattr(torch, c["dtype"])
        np_dt = torch.empty((), dtype=dt).numpy().dtype if dt != torch.bfloat16 else np.int16
        arr = np.frombuffer(blob, dtype=np_dt, count=int(np.prod(c["shape"], dtype=np.int64)), offset=c["offset"])
        t = torch.from_numpy(arr.copy()).reshape(c["shape"])
        root.register_buffer(name, t.view(torch.bfloat16) if dt == torch.bfloat16 else t)
    graph, env = fx.Graph(), {}
    for d in doc["nodes"]:
        if d["op"] == "placeholder":
            env[d["name"]] = graph.placeholder(d["name"])
        elif d["op"] == "get_attr":
            env[d["name"]] = graph.get_attr(d["target"])
        elif d["op"] == "call_function":
            env[d["name"]] = graph.call_function(_resolve(d["target"]), tuple(_dec(d["args"], env)),
                                                 {k: _dec(v, env) for k, v in d["kwargs"].items()})
        elif d["op"] == "output":
            graph.output(*_dec(d["args"], env))
        else:
            raise QCError(f"unknown node kind '{d['op']}' in the serialized graph")
        if d["op"] != "output":
            env[d["name"]].name = d["name"]
    gm = fx.GraphModule(root, graph)
    return Graph(gm, [TensorSpec.from_json(s) for s in doc["inputs"]], [TensorSpec.from_json(s) for s in doc["outputs"]],
                 "artifact", dict(doc.get("meta", {})))
