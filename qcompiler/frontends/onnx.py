"""ONNX frontend: .onnx file -> Graph, the same ATen-level IR as torch models.

`_OnnxModule.forward` interprets the ONNX graph node by node with the torch ops of `OPS`
(op_type -> handler(node, inputs, attrs, opset)); torch.export traces it, so the result is
ordinary ATen. Before that, nodes whose inputs are all constants are evaluated once (so
DequantizeLinear of an integer initializer becomes a float weight), and MatMul/Gemm with a
constant 2-D weight are rewritten to aten.linear with the weight stored as [out, in].

Small integer values (the output of Shape and whatever is computed from it) flow as `_Sh`:
python lists of ints / SymInts, so dynamic dims stay symbolic through Gather, Concat,
Reshape, Expand, ...; they become tensors only where a real tensor is needed.
A QuantizeLinear output flows as `_Q`, so the DequantizeLinear after it becomes one
`qc.fake_quant`.
"""
from __future__ import annotations

import itertools
import keyword
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto as P
from onnx import helper, numpy_helper
from torch.export import Dim

from ..errors import QCError, UnsupportedOpError
from ..ir import Graph, eliminate_dead_code, verify
from ..ops import expand_qparam, quantize_ref
from .torch import _safe, from_exported_program

_DTYPES = {P.FLOAT: torch.float32, P.DOUBLE: torch.float64, P.FLOAT16: torch.float16, P.BFLOAT16: torch.bfloat16,
           P.INT8: torch.int8, P.UINT8: torch.uint8, P.INT16: torch.int16, P.UINT16: torch.uint16,
           P.INT32: torch.int32, P.UINT32: torch.uint32, P.INT64: torch.int64, P.UINT64: torch.uint64,
           P.BOOL: torch.bool, P.INT4: torch.int8, P.UINT4: torch.uint8}  # 4-bit values are held unpacked
_QRANGE = {P.INT8: (-128, 127), P.UINT8: (0, 255), P.INT16: (-32768, 32767), P.UINT16: (0, 65535),
           P.INT4: (-8, 7), P.UINT4: (0, 15), P.INT32: (-2**31, 2**31 - 1)}


# -- values -----------------------------------------------------------------------------

@dataclass
class _Sh:
    """A 0-d or 1-d integer/bool tensor held as python values (ints, SymInts, bools)."""

    v: list
    dtype: torch.dtype = torch.int64
    scalar: bool = False
    t: torch.Tensor | None = None  # the tensor it came from (a constant), used by T()


@dataclass
class _Q:
    """A QuantizeLinear output not yet materialized: (x, scale, zero point, range, axis, block)."""

    x: torch.Tensor
    scale: torch.Tensor
    zp: torch.Tensor
    qmin: int
    qmax: int
    axis: int
    block: int
    dtype: torch.dtype


_SMALL = 64  # integer constants up to this many elements are kept as python values


def T(v: Any) -> torch.Tensor | None:
    """The tensor a value stands for."""
    if isinstance(v, _Sh):
        if v.t is not None:
            return v.t
        if all(isinstance(e, (int, bool)) for e in v.v):
            t = torch.tensor(v.v, dtype=v.dtype)
        else:
            t = torch.stack([torch.scalar_tensor(e, dtype=v.dtype) for e in v.v])
        return t.reshape(()) if v.scalar else t
    if isinstance(v, _Q):
        return quantize_ref(v.x, v.scale, v.zp, v.qmin, v.qmax, v.axis, v.block).to(v.dtype)
    return v


def _as_sh(t: torch.Tensor) -> _Sh | torch.Tensor:
    """A small integer constant becomes a _Sh (backed by the tensor); others stay tensors."""
    if t.dtype in (torch.int64, torch.int32, torch.bool) and t.dim() <= 1 and t.numel() <= _SMALL:
        return _Sh(t.reshape(-1).tolist(), t.dtype, t.dim() == 0, t)
    return t


def _sh_map(fn: Callable, *xs: _Sh, dtype: torch.dtype | None = None) -> _Sh:
    n = max(len(x.v) for x in xs)
    cols = [x.v * n if len(x.v) == 1 else x.v for x in xs]
    return _Sh([fn(*e) for e in zip(*cols)], dtype or xs[0].dtype, all(x.scalar for x in xs))


def _trunc_div(a, b):
    if isinstance(a, int) and isinstance(b, int):
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    return a // b


# -- nodes ------------------------------------------------------------------------------

class _Node:
    """One ONNX node as the handlers see it."""

    def __init__(self, proto, index: int, opset: int, model: "_OnnxModule"):
        self.name = proto.name or f"{proto.op_type}_{index}"
        self.op, self.domain = proto.op_type, proto.domain
        self.inputs, self.outputs = list(proto.input), list(proto.output)
        self.opset = opset
        self.fn = OPS.get(self.op)
        self._m = model
        self.attrs = {a.name: self._attr(a) for a in proto.attribute}
        self.value_type = next((a.t.data_type for a in proto.attribute  # a Constant's element type
                                if a.name == "value" and a.type == a.TENSOR), None)

    def _attr(self, a):
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            return v.decode()
        if a.type == a.TENSOR:
            return _to_torch(v, self)
        if a.type == a.STRINGS:
            return [s.decode() for s in v]
        return v

    def const(self, i: int) -> torch.Tensor | None:
        """The real value of input i when it is a constant, else None."""
        name = self.inputs[i] if i < len(self.inputs) else ""
        return self._m.consts.get(name) if name else None

    def value(self, i: int) -> list | None:
        """The flattened python values of constant input i, else None."""
        name = self.inputs[i] if i < len(self.inputs) else ""
        if name not in self._m.consts:
            return None
        if name not in self._m.values:  # filled before export: no tensor ops run under fake mode
            self._m.values[name] = self._m.consts[name].reshape(-1).tolist()
        return self._m.values[name]

    def type_of(self, i: int) -> int | None:
        """The ONNX element type of constant input i, when known."""
        return self._m.types.get(self.inputs[i]) if i < len(self.inputs) else None

    def error(self, msg: str) -> QCError:
        return QCError(msg, node=self.name, op=self.op)


def _to_torch(proto, node: _Node | None = None) -> torch.Tensor:
    if proto.data_type not in _DTYPES:
        name = P.DataType.Name(proto.data_type)
        raise (node.error(f"tensor of type {name} is not supported") if node
               else QCError(f"initializer '{proto.name}' has type {name}, which is not supported"))
    arr = numpy_helper.to_array(proto)
    if proto.data_type == P.BFLOAT16:
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16).copy()).view(torch.bfloat16)
    if proto.data_type in (P.INT4, P.UINT4):
        arr = arr.astype(np.int8 if proto.data_type == P.INT4 else np.uint8)
    return torch.from_numpy(np.array(arr, copy=True))


# -- helpers for handlers ---------------------------------------------------------------

def _opt(xs: list, i: int):
    return xs[i] if i < len(xs) else None


def _ints(n: _Node, xs: list, i: int) -> list | None:
    """Input i as a list of python ints / SymInts (a shape, axes, pads, ...), or None if absent."""
    v = _opt(xs, i)
    if v is None:
        return None
    if isinstance(v, _Sh):
        return list(v.v)
    c = n.value(i)
    if c is None:
        raise n.error(f"input {i} ('{n.inputs[i]}') must be a constant or computed from shapes")
    return [int(e) for e in c]


def _num(n: _Node, xs: list, i: int):
    """Input i as a python scalar (constant, or computed from shapes)."""
    v = _opt(xs, i)
    if isinstance(v, _Sh):
        return v.v[0]
    c = n.value(i)
    if c is None:
        raise n.error(f"input {i} ('{n.inputs[i]}') must be a constant or computed from shapes")
    return c[0]


def _axes(n: _Node, xs: list, a: dict, since: int) -> list | None:
    """Axes from the `axes` attribute (opset < since) or input 1 (opset >= since)."""
    return a.get("axes") if n.opset < since else _ints(n, xs, 1)


def _pads(n: _Node, x: torch.Tensor, k: list, strides: list, dil: list) -> tuple[list, list]:
    """Begin/end padding of the spatial dims from `pads` or `auto_pad`."""
    a, r = n.attrs, len(k)
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        p = list(a.get("pads", [0] * 2 * r))
        return p[:r], p[r:]
    if auto == "VALID":
        return [0] * r, [0] * r
    begin, end = [], []
    for i in range(r):
        d = x.shape[2 + i]
        total = max((-(-d // strides[i]) - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - d, 0)
        small = total // 2
        begin.append(total - small if auto == "SAME_LOWER" else small)
        end.append(total - begin[-1])
    return begin, end


def _pad_spatial(x: torch.Tensor, begin: list, end: list, value: float = 0.0) -> torch.Tensor:
    pairs = [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]
    return F.pad(x, pairs, value=value)


# -- handlers ---------------------------------------------------------------------------

def _unary(fn, py=None):
    return lambda n, xs, a, opset: (_sh_map(py, xs[0]) if py and isinstance(xs[0], _Sh) else fn(T(xs[0])))


def _binary(fn, py=None, dtype=None):
    def h(n, xs, a, opset):
        x, y = xs
        if py and isinstance(x, _Sh) and isinstance(y, _Sh):
            return _sh_map(py, x, y, dtype=dtype)
        return fn(T(x), T(y))
    return h


def _variadic(fn, py=None):
    def h(n, xs, a, opset):
        if py and all(isinstance(x, _Sh) for x in xs):
            return _sh_map(lambda *e: py(e), *xs)
        out = T(xs[0])
        for x in xs[1:]:
            out = fn(out, T(x))
        return out
    return h


def _div(x, y):
    return x / y if x.is_floating_point() else torch.div(x, y, rounding_mode="trunc")


def _pow(n, xs, a, opset):
    c = n.value(1)
    if c is not None and len(c) == 1:
        return torch.pow(T(xs[0]), c[0])
    return torch.pow(T(xs[0]), T(xs[1]))


def _mod(n, xs, a, opset):
    x, y = T(xs[0]), T(xs[1])
    return torch.fmod(x, y) if a.get("fmod", 0) else torch.remainder(x, y)


def _clip(n, xs, a, opset):
    x = T(xs[0])
    if opset < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo, hi = [None if _opt(xs, i) is None else (n.value(i)[0] if n.value(i) is not None else T(xs[i]))
                  for i in (1, 2)]
    if lo is None and hi is None:
        return x
    if isinstance(lo, torch.Tensor) != isinstance(hi, torch.Tensor) and lo is not None and hi is not None:
        return torch.clamp(torch.clamp(x, min=lo), max=hi)
    return torch.clamp(x, lo, hi)


def _hardsigmoid(n, xs, a, opset):
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    if abs(alpha - 1 / 6) < 1e-7 and beta == 0.5:
        return F.hardsigmoid(xs[0])
    return torch.clamp(xs[0] * alpha + beta, 0.0, 1.0)


def _softmax(fn):
    def h(n, xs, a, opset):
        x = xs[0]
        ax = a.get("axis", 1 if opset < 13 else -1) % max(x.dim(), 1)
        if opset >= 13 or ax == x.dim() - 1:
            return fn(x, ax)
        return fn(x.reshape(math.prod(x.shape[:ax]), -1), 1).reshape(x.shape)  # opset < 13: coerced to 2-D
    return h


def _gelu(n, xs, a, opset):
    return F.gelu(xs[0], approximate=a.get("approximate", "none"))


def _matmul(n, xs, a, opset):
    return torch.matmul(T(xs[0]), T(xs[1]))


def _linear(n, xs, a, opset):
    """Internal: MatMul/Gemm with a constant weight already stored as [out, in]."""
    x = xs[0].t() if a.get("transA", 0) else xs[0]
    return F.linear(x, xs[1], _opt(xs, 2))


def _gemm(n, xs, a, opset):
    x, w, c = xs[0], xs[1], _opt(xs, 2)
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = x @ w
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    y = y * alpha if alpha != 1.0 else y
    return y if c is None else y + (c * beta if beta != 1.0 else c)


def _conv(n, xs, a, opset):
    x, w, b = xs[0], xs[1], _opt(xs, 2)
    r = w.dim() - 2
    if r not in (1, 2, 3):
        raise n.error(f"{r}-D convolution is not supported")
    k = a.get("kernel_shape", list(w.shape[2:]))
    strides, dil = a.get("strides", [1] * r), a.get("dilations", [1] * r)
    begin, end = _pads(n, x, k, strides, dil)
    if begin != end:
        x, begin = _pad_spatial(x, begin, end), [0] * r
    return (F.conv1d, F.conv2d, F.conv3d)[r - 1](x, w, b, strides, begin, dil, a.get("group", 1))


def _batchnorm(n, xs, a, opset):
    if a.get("training_mode", 0):
        raise n.error("training_mode=1 is not supported (export the model in eval mode)")
    x, scale, bias, mean, var = xs[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))


def _instancenorm(n, xs, a, opset):
    return F.instance_norm(xs[0], weight=xs[1], bias=xs[2], eps=a.get("epsilon", 1e-5))


def _layernorm(n, xs, a, opset):
    x, scale, bias = xs[0], xs[1], _opt(xs, 2)
    ax = a.get("axis", -1) % x.dim()
    eps = a.get("epsilon", 1e-5)
    shape = tuple(x.shape[ax:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        y = F.layer_norm(x, shape, scale, bias, eps)
    else:
        y = F.layer_norm(x, shape, None, None, eps) * scale
        y = y if bias is None else y + bias
    if len([o for o in n.outputs if o]) == 1:
        return y
    dims = list(range(ax, x.dim()))
    mean = x.mean(dims, keepdim=True)
    return y, mean, torch.rsqrt(((x - mean) ** 2).mean(dims, keepdim=True) + eps)


def _pool(kind):
    def h(n, xs, a, opset):
        x, k = xs[0], a["kernel_shape"]
        r = len(k)
        strides, dil = a.get("strides", [1] * r), a.get("dilations", [1] * r)
        begin, end = _pads(n, x, k, strides, dil)
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            if begin != end or any(p > kk // 2 for p, kk in zip(begin, k)):
                x, begin = _pad_spatial(x, begin, end, float("-inf")), [0] * r
            return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[r - 1](x, k, strides, begin, dil, ceil_mode=ceil)
        if any(d != 1 for d in dil):
            raise n.error(f"dilations={dil} are not supported for AveragePool")
        include = bool(a.get("count_include_pad", 0))
        if begin != end or any(p > kk // 2 for p, kk in zip(begin, k)):
            if not include:
                raise n.error(f"asymmetric pads {begin + end} with count_include_pad=0 are not supported")
            x, begin = _pad_spatial(x, begin, end), [0] * r
        return (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[r - 1](x, k, strides, begin, ceil, include)
    return h


def _reduce(fn, py, since):
    def h(n, xs, a, opset):
        x = xs[0]
        axes = _axes(n, xs, a, since)
        keep = bool(a.get("keepdims", 1))
        if not axes and a.get("noop_with_empty_axes", 0):
            return x
        if isinstance(x, _Sh) and py:
            return _Sh([py(x.v)], x.dtype, scalar=not keep)
        x = T(x)
        return fn(x, list(range(x.dim())) if not axes else axes, keep)
    return h


def _prod(x, dims, keep):
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


def _argmax(fn):
    def h(n, xs, a, opset):
        if a.get("select_last_index", 0):
            raise n.error("select_last_index=1 is not supported")
        return fn(xs[0], a.get("axis", 0), bool(a.get("keepdims", 1)))
    return h


def _shape(n, xs, a, opset):
    x = xs[0]
    dims = ([] if x.scalar else [len(x.v)]) if isinstance(x, _Sh) else list(x.shape)
    return _Sh(dims[a.get("start", 0): a.get("end", None)])


def _size(n, xs, a, opset):
    x = xs[0]
    return _Sh([len(x.v) if isinstance(x, _Sh) else x.numel()], scalar=True)


def _reshape(n, xs, a, opset):
    x, shape = xs[0], _ints(n, xs, 1)
    if isinstance(x, _Sh) and len(shape) <= 1:
        return _Sh(list(x.v), x.dtype, scalar=not shape)
    x = T(x)
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if isinstance(s, int) and s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(n, xs, a, opset):
    x = T(xs[0])
    ax = a.get("axis", 1)
    ax = ax + x.dim() if ax < 0 else ax
    if ax == 0:
        return x.reshape(1, -1)
    return x.flatten(ax).flatten(0, ax - 1) if ax < x.dim() else x.flatten(0, ax - 1).unsqueeze(1)


def _transpose(n, xs, a, opset):
    x = T(xs[0])
    return x.permute(a.get("perm", list(range(x.dim()))[::-1]))


def _unsqueeze(n, xs, a, opset):
    x, axes = xs[0], _axes(n, xs, a, 13)
    if isinstance(x, _Sh) and x.scalar and len(axes) == 1:
        return _Sh(list(x.v), x.dtype)
    x = T(x)
    r = x.dim() + len(axes)
    for ax in sorted(e % r for e in axes):
        x = x.unsqueeze(ax)
    return x


def _squeeze(n, xs, a, opset):
    x, axes = xs[0], _axes(n, xs, a, 13)
    if isinstance(x, _Sh) and not x.scalar and len(x.v) == 1 and (not axes or list(axes) in ([0], [-1])):
        return _Sh(list(x.v), x.dtype, scalar=True)
    x = T(x)
    return x.squeeze(tuple(e % x.dim() for e in axes)) if axes else x.squeeze()


def _concat(n, xs, a, opset):
    if all(isinstance(x, _Sh) for x in xs):
        return _Sh([e for x in xs for e in x.v], xs[0].dtype)
    return torch.cat([T(x) for x in xs], a["axis"])


def _split(n, xs, a, opset):
    x = T(xs[0])
    ax = a.get("axis", 0)
    sizes = a.get("split") if opset < 13 else _ints(n, xs, 1)
    if sizes:
        return tuple(torch.split(x, list(sizes), ax))
    k = a.get("num_outputs", len(n.outputs))
    return tuple(torch.split(x, -(-x.shape[ax] // k), ax))


def _slice(n, xs, a, opset):
    x = xs[0]
    if opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends, axes, steps = _ints(n, xs, 1), _ints(n, xs, 2), _ints(n, xs, 3), _ints(n, xs, 4)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    if isinstance(x, _Sh) and not x.scalar:
        return _Sh(x.v[starts[0]: ends[0]: steps[0]], x.dtype)
    x = T(x)
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax = ax % x.dim()
        if isinstance(st, int) and st < 0:
            d = x.shape[ax]
            if not isinstance(d, int):
                raise n.error("a negative step along a dynamic dim is not supported")
            x = x.index_select(ax, torch.tensor(list(range(d))[s:e:st], dtype=torch.long))
        else:
            x = x[(slice(None),) * ax + (slice(s, e, st),)]
    return x


def _gather(n, xs, a, opset):
    x, idx, ax = xs[0], xs[1], a.get("axis", 0)
    if isinstance(x, _Sh) and isinstance(idx, _Sh):
        return _Sh([x.v[i] for i in idx.v], x.dtype, idx.scalar)
    x = T(x)
    ax %= x.dim()
    if isinstance(idx, _Sh) and all(isinstance(i, int) for i in idx.v):
        d = x.shape[ax]
        norm = [i + d if i < 0 else i for i in idx.v]
        if idx.scalar:
            return x.select(ax, norm[0])
        return x.index_select(ax, torch.tensor(norm, dtype=torch.long))
    idx = T(idx)
    if ax == 0 and x.dim() == 2 and n.const(0) is not None and x.is_floating_point():
        return F.embedding(idx, x)
    out = x.index_select(ax, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:ax]) + tuple(idx.shape) + tuple(x.shape[ax + 1:]))


def _gather_elements(n, xs, a, opset):
    return torch.gather(T(xs[0]), a.get("axis", 0), T(xs[1]))


def _gather_nd(n, xs, a, opset):
    if a.get("batch_dims", 0):
        raise n.error("batch_dims > 0 is not supported")
    x, idx = T(xs[0]), T(xs[1])
    return x[tuple(idx.unbind(-1))]


def _expand(n, xs, a, opset):
    x, shape = T(xs[0]), _ints(n, xs, 1)
    r = max(len(shape), x.dim())
    have = [1] * (r - x.dim()) + list(x.shape)
    want = [1] * (r - len(shape)) + shape
    return x.expand([h if isinstance(w, int) and w == 1 else w for h, w in zip(have, want)])


def _tile(n, xs, a, opset):
    return T(xs[0]).repeat(_ints(n, xs, 1))


def _pad(n, xs, a, opset):
    x = T(xs[0])
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(
        a.get("mode", "constant"))
    if mode is None:
        raise n.error(f"pad mode '{a.get('mode')}' is not supported")
    if opset < 11:
        pads, value = a["pads"], a.get("value", 0.0)
        axes = None
    else:
        pads = _ints(n, xs, 1)
        value = _num(n, xs, 2) if _opt(xs, 2) is not None else 0.0
        axes = _ints(n, xs, 3)
    r = x.dim()
    axes = [e % r for e in axes] if axes is not None else list(range(r))
    begin, end = [0] * r, [0] * r
    for i, ax in enumerate(axes):
        begin[ax], end[ax] = pads[i], pads[len(axes) + i]
    first = next((i for i in range(r) if begin[i] or end[i]), r)
    if first == r:
        return x
    if mode != "constant" and 1 <= r - 2 <= 3:
        first = min(first, 2)
    return F.pad(x, [p for i in reversed(range(first, r)) for p in (begin[i], end[i])], mode=mode,
                 value=value if mode == "constant" else None)


def _cast(n, xs, a, opset):
    to = _DTYPES.get(a["to"])
    if to is None:
        raise n.error(f"cast to {P.DataType.Name(a['to'])} is not supported")
    x = xs[0]
    if isinstance(x, _Sh) and to in (torch.int64, torch.int32, torch.bool):
        return _Sh([(e != 0) if to == torch.bool else e for e in x.v], to, x.scalar)
    return T(x).to(to)


def _cast_like(n, xs, a, opset):
    return T(xs[0]).to(T(xs[1]).dtype)


def _where(n, xs, a, opset):
    c, x, y = xs
    if all(isinstance(v, _Sh) for v in xs):
        return _sh_map(lambda cc, xx, yy: xx if cc else yy, c, x, y, dtype=x.dtype)
    return torch.where(T(c), T(x), T(y))


def _constant(n, xs, a, opset):
    if "value" in a:
        return a["value"]
    if "value_float" in a:
        return torch.tensor(a["value_float"], dtype=torch.float32)
    if "value_floats" in a:
        return torch.tensor(a["value_floats"], dtype=torch.float32)
    if "value_int" in a:
        return torch.tensor(a["value_int"], dtype=torch.int64)
    if "value_ints" in a:
        return torch.tensor(a["value_ints"], dtype=torch.int64)
    if "sparse_value" in a:
        sp = a["sparse_value"]
        vals, idx = _to_torch(sp.values, n), _to_torch(sp.indices, n).long()
        dims = list(sp.dims)
        strides = torch.tensor([math.prod(dims[i + 1:]) for i in range(len(dims))])
        flat = idx if idx.dim() == 1 else (idx * strides).sum(1)
        return torch.zeros(math.prod(dims), dtype=vals.dtype).index_put_((flat,), vals).reshape(dims)
    raise n.error(f"Constant with attribute {sorted(a)} is not supported")


def _constant_of_shape(n, xs, a, opset):
    shape = _ints(n, xs, 0)
    value = a.get("value", torch.zeros(1))
    if value.dtype in (torch.int64, torch.int32, torch.bool) and len(shape) <= 1 and all(
            isinstance(e, int) for e in shape) and (not shape or shape[0] <= _SMALL):
        return _Sh([value.item()] * (shape[0] if shape else 1), value.dtype, scalar=not shape)
    return torch.full(shape, value.item(), dtype=value.dtype)


def _range(n, xs, a, opset):
    start, limit, delta = (_num(n, xs, i) for i in range(3))
    v = xs[0]
    dtype = v.dtype if isinstance(v, (_Sh, torch.Tensor)) else torch.int64
    return torch.arange(start, limit, delta, dtype=dtype)


def _einsum(n, xs, a, opset):
    return torch.einsum(a["equation"], *[T(x) for x in xs])


def _dropout(n, xs, a, opset):
    if len([o for o in n.outputs if o]) > 1:
        return xs[0], torch.ones_like(xs[0], dtype=torch.bool)
    return xs[0]


def _trilu(n, xs, a, opset):
    k = _num(n, xs, 1) if _opt(xs, 1) is not None else 0
    return torch.triu(xs[0], k) if a.get("upper", 1) else torch.tril(xs[0], k)


def _cumsum(n, xs, a, opset):
    x, ax = T(xs[0]), _num(n, xs, 1)
    x = x.flip(ax) if a.get("reverse", 0) else x
    y = torch.cumsum(x, ax)
    y = y - x if a.get("exclusive", 0) else y
    return y.flip(ax) if a.get("reverse", 0) else y


def _qparams(n: _Node, x: torch.Tensor, xs: list, a: dict):
    """(qmin, qmax, axis, block, dtype) of a QuantizeLinear / DequantizeLinear node."""
    zt = n.type_of(2)
    if zt is None and _opt(xs, 2) is not None:
        zt = {torch.int8: P.INT8, torch.uint8: P.UINT8, torch.int16: P.INT16, torch.uint16: P.UINT16,
              torch.int32: P.INT32}.get(T(xs[2]).dtype)
    rng = _QRANGE.get(zt)
    if rng is None:
        raise n.error(f"quantized type {P.DataType.Name(zt) if zt else '?'} is not supported")
    block = a.get("block_size", 0)
    scale = xs[1]
    axis = a.get("axis", 1) % max(x.dim(), 1) if (scale.numel() > 1 or block) else 0
    return rng[0], rng[1], axis, block, _DTYPES[zt]


def _quantize(n, xs, a, opset):
    x = T(xs[0])
    qmin, qmax, axis, block, dtype = _qparams(n, x, xs, a)
    return _Q(x, xs[1], T(xs[2]), qmin, qmax, axis, block, dtype)


def _dequantize(n, xs, a, opset):
    q = xs[0]
    if isinstance(q, _Q) and n.attrs.get("_pairs_with_q"):
        return torch.ops.qc.fake_quant.default(q.x, q.scale, q.zp, q.qmin, q.qmax, q.axis, q.block)
    x, scale, zp = T(q), xs[1], T(xs[2])
    _, _, axis, block, _ = _qparams(n, x, xs, a)
    s, z = (expand_qparam(p, x, axis, block) for p in (scale, zp))
    return ((x.to(torch.float32) - z.to(torch.float32)) * s).to(scale.dtype)


OPS: dict[str, Callable] = {
    "Identity": lambda n, xs, a, opset: xs[0],
    "Dropout": _dropout,
    "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Range": _range,
    "Add": _binary(torch.add, lambda x, y: x + y), "Sub": _binary(torch.sub, lambda x, y: x - y),
    "Mul": _binary(torch.mul, lambda x, y: x * y), "Div": _binary(_div, _trunc_div),
    "Pow": _pow, "Mod": _mod,
    "Max": _variadic(torch.maximum, max), "Min": _variadic(torch.minimum, min),
    "Sum": _variadic(torch.add, sum),
    "Mean": lambda n, xs, a, opset: _variadic(torch.add)(n, xs, a, opset) / len(xs),
    "Equal": _binary(torch.eq, lambda x, y: x == y, torch.bool),
    "Less": _binary(torch.lt, lambda x, y: x < y, torch.bool),
    "LessOrEqual": _binary(torch.le, lambda x, y: x <= y, torch.bool),
    "Greater": _binary(torch.gt, lambda x, y: x > y, torch.bool),
    "GreaterOrEqual": _binary(torch.ge, lambda x, y: x >= y, torch.bool),
    "And": _binary(torch.logical_and, lambda x, y: bool(x and y), torch.bool),
    "Or": _binary(torch.logical_or, lambda x, y: bool(x or y), torch.bool),
    "Xor": _binary(torch.logical_xor, lambda x, y: bool(x) != bool(y), torch.bool),
    "Not": _unary(torch.logical_not, lambda x: not x),
    "Neg": _unary(torch.neg, lambda x: -x), "Abs": _unary(torch.abs, abs),
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf), "Sqrt": _unary(torch.sqrt), "Reciprocal": _unary(torch.reciprocal),
    "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Round": _unary(torch.round),
    "Sign": _unary(torch.sign), "IsNaN": _unary(torch.isnan), "IsInf": _unary(torch.isinf),
    "Softplus": _unary(F.softplus), "HardSwish": _unary(F.hardswish), "HardSigmoid": _hardsigmoid,
    "LeakyRelu": lambda n, xs, a, opset: F.leaky_relu(xs[0], a.get("alpha", 0.01)),
    "Elu": lambda n, xs, a, opset: F.elu(xs[0], a.get("alpha", 1.0)),
    "PRelu": lambda n, xs, a, opset: torch.where(xs[0] < 0, xs[0] * xs[1], xs[0]),
    "Gelu": _gelu, "Clip": _clip,
    "Softmax": _softmax(F.softmax), "LogSoftmax": _softmax(F.log_softmax),
    "MatMul": _matmul, "Gemm": _gemm, "Einsum": _einsum,
    "Conv": _conv, "BatchNormalization": _batchnorm, "InstanceNormalization": _instancenorm,
    "LayerNormalization": _layernorm,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda n, xs, a, opset: xs[0].mean(list(range(2, xs[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda n, xs, a, opset: xs[0].amax(list(range(2, xs[0].dim())), keepdim=True),
    "ReduceMean": _reduce(torch.mean, None, 18), "ReduceSum": _reduce(torch.sum, sum, 13),
    "ReduceMax": _reduce(torch.amax, max, 18), "ReduceMin": _reduce(torch.amin, min, 18),
    "ReduceProd": _reduce(_prod, math.prod, 18),
    "ArgMax": _argmax(torch.argmax), "ArgMin": _argmax(torch.argmin),
    "Shape": _shape, "Size": _size, "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose,
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Concat": _concat, "Split": _split, "Slice": _slice,
    "Gather": _gather, "GatherElements": _gather_elements, "GatherND": _gather_nd,
    "Expand": _expand, "Tile": _tile, "Pad": _pad, "Cast": _cast, "CastLike": _cast_like, "Where": _where,
    "Trilu": _trilu, "CumSum": _cumsum,
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize,
}

_NO_FOLD = {"QuantizeLinear"}  # so that Q -> DQ of a float weight becomes fake_quant on a constant


# -- the module torch.export traces -----------------------------------------------------

class _OnnxModule(torch.nn.Module):
    def __init__(self, model, opset: int):
        super().__init__()
        g = model.graph
        self.consts: dict[str, torch.Tensor] = {}
        self.types: dict[str, int] = {}
        self.values: dict[str, list] = {}
        self._derived: dict[tuple[str, str], str] = {}
        for t in g.initializer:
            self.consts[t.name], self.types[t.name] = _to_torch(t), t.data_type
        self.input_names = [i.name for i in g.input if i.name not in self.consts]
        self.output_names = [o.name for o in g.output]
        nodes = [_Node(p, i, opset, self) for i, p in enumerate(g.node)]
        _check_supported(nodes, model, opset)
        self.nodes = self._live(nodes)
        self.types.update({n.outputs[0]: n.value_type for n in self.nodes if n.op == "Constant" and n.value_type})
        self._add_zero_points()
        self._fold()
        self._weights_to_linear()
        self._pair_qdq()
        self._refs: dict[str, str] = {}
        used = {i for n in self.nodes for i in n.inputs} | set(self.output_names)
        for name in [k for k in self.consts if k in used]:
            self._refs[name] = _fresh(self, _safe(name))
            self.register_buffer(self._refs[name], self.consts[name].contiguous())
        self.values.update({k: v.reshape(-1).tolist() for k, v in self.consts.items() if v.numel() <= 1024})
        self._small = {k: v for k in self._refs if isinstance(v := _as_sh(self.consts[k]), _Sh)}

    def _live(self, nodes: list[_Node]) -> list[_Node]:
        need, live = set(self.output_names), []
        for n in reversed(nodes):
            if any(o in need for o in n.outputs):
                live.append(n)
                need.update(i for i in n.inputs if i)
        return live[::-1]

    def _pair_qdq(self) -> None:
        """Mark each DequantizeLinear whose input is a QuantizeLinear with the same parameters."""
        producer = {o: n for n in self.nodes for o in n.outputs}

        def same(a: str, b: str) -> bool:
            ca, cb = self.consts.get(a), self.consts.get(b)
            return a == b or (ca is not None and cb is not None and ca.shape == cb.shape and torch.equal(ca, cb))

        for n in self.nodes:
            q = producer.get(n.inputs[0])
            if n.op == "DequantizeLinear" and q is not None and q.op == "QuantizeLinear":
                n.attrs["_pairs_with_q"] = (same(n.inputs[1], q.inputs[1]) and same(n.inputs[2], q.inputs[2])
                                            and all(n.attrs.get(k) == q.attrs.get(k) for k in ("axis", "block_size")))

    def _add_zero_points(self) -> None:
        """Give Q/DQ nodes without a zero point an explicit zero constant of the right type."""
        producer = {o: n for n in self.nodes for o in n.outputs}
        for n in self.nodes:
            if n.op in ("QuantizeLinear", "DequantizeLinear") and not (len(n.inputs) > 2 and n.inputs[2]):
                src = producer.get(n.inputs[0])
                if n.op == "DequantizeLinear" and src is not None and src.op == "QuantizeLinear":
                    n.inputs = n.inputs[:2] + [src.inputs[2]]
                    continue
                if n.op == "QuantizeLinear":
                    zt = n.attrs.get("output_dtype", 0) or P.UINT8
                else:
                    zt = self.types.get(n.inputs[0], P.INT32)
                if zt not in _DTYPES:
                    raise n.error(f"quantized type {P.DataType.Name(zt)} is not supported")
                scale = n.const(1)
                name = _fresh_key(self.consts, n.name + ".zero_point")
                self.consts[name] = torch.zeros(scale.shape if scale is not None else (), dtype=_DTYPES[zt])
                self.types[name] = zt
                n.inputs = n.inputs[:2] + [name]

    def _fold(self) -> None:
        """Evaluate nodes whose inputs are all constants."""
        rest = []
        for n in self.nodes:
            if n.op in _NO_FOLD or not all(i in self.consts for i in n.inputs if i):
                rest.append(n)
                continue
            outs = _run(n, [_as_sh(self.consts[i]) if i else None for i in n.inputs])
            for o, v in zip(n.outputs, outs):
                self.consts[o] = T(v).detach()
        self.nodes = rest

    def _weights_to_linear(self) -> None:
        """MatMul / Gemm with a constant 2-D weight -> linear(x, W[out, in], bias)."""
        producer = {o: n for n in self.nodes for o in n.outputs}
        users: dict[str, list[_Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                users.setdefault(i, []).append(n)
        outs = set(self.output_names)
        for n in list(self.nodes):
            if n.op == "MatMul" and n.inputs[0] not in self.consts:
                w = self.consts.get(n.inputs[1])
                if w is not None and w.dim() == 2 and w.is_floating_point():
                    n.inputs = [n.inputs[0], self._derive(n.inputs[1], "T", torch.t)]
                elif not self._qdq_weight_to_linear(n, producer, users, outs):
                    continue
                n.inputs, n.fn = n.inputs + [""], _linear
                self._fuse_bias(n, users, outs)
            elif n.op == "Gemm" and n.inputs[0] not in self.consts:
                a, w, c = n.attrs, n.const(1), n.const(2)
                if w is None or w.dim() != 2:
                    continue
                w = w if a.get("transB", 0) else w.t()
                vector = c is not None and (c.numel() == 1 or c.numel() == c.shape[-1] == w.shape[0])
                if _opt(n.inputs, 2) and not vector:  # C is an activation or a full [M, N] matrix
                    continue
                alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
                inputs = [n.inputs[0], self._const(w * alpha if alpha != 1.0 else w, n.inputs[1] + ".W")]
                if c is not None:
                    c = c * beta if beta != 1.0 else c
                    inputs.append(self._const(c.reshape(-1).expand(w.shape[0]), n.inputs[2] + ".b"))
                n.inputs, n.fn = inputs, _linear

    def _qdq_weight_to_linear(self, n: _Node, producer, users, outs) -> bool:
        """MatMul(x, DQ(Q(W))) with W a constant [in, out]: quantize W.T instead (axis swapped)."""
        d = producer.get(n.inputs[1])
        q = producer.get(d.inputs[0]) if d is not None and d.op == "DequantizeLinear" else None
        if q is None or q.op != "QuantizeLinear" or getattr(self.consts.get(q.inputs[0]), "ndim", 0) != 2:
            return False
        w = d.outputs[0]
        if q.outputs[0] in outs or w in outs or users.get(q.outputs[0]) != [d] or any(
                u.op != "MatMul" or u.inputs != [u.inputs[0], w] or u.inputs[0] == w for u in users[w]):
            return False
        if q.attrs.get("_transposed"):
            return True
        blocked = q.attrs.get("block_size", 0) > 0
        q.inputs[0] = self._derive(q.inputs[0], "T", torch.t)
        for m in (q, d):
            m.attrs["axis"] = 1 - m.attrs.get("axis", 1) % 2
            if blocked:
                m.inputs[1:3] = [self._derive(i, "T", torch.t) for i in m.inputs[1:3]]
        q.attrs["_transposed"] = True
        return True

    def _fuse_bias(self, n: _Node, users, outs) -> None:
        """linear(x, W) followed by Add(., b[N]) with b constant -> linear(x, W, b)."""
        y = n.outputs[0]
        adds = users.get(y, [])
        if y in outs or len(adds) != 1 or adds[0].op != "Add" or adds[0].inputs.count(y) != 1:
            return
        add = adds[0]
        other = add.inputs[1 - add.inputs.index(y)]
        b = self.consts.get(other)
        if b is None or b.dim() != 1 or not b.is_floating_point():
            return
        n.inputs[2] = other
        n.outputs = list(add.outputs)
        self.nodes.remove(add)

    def _derive(self, src: str, kind: str, fn: Callable) -> str:
        """The name of constant fn(consts[src]), made once per (src, kind)."""
        if (src, kind) not in self._derived:
            self._derived[src, kind] = self._const(fn(self.consts[src]), f"{src}.{kind}")
        return self._derived[src, kind]

    def _const(self, value: torch.Tensor, hint: str) -> str:
        name = _fresh_key(self.consts, hint)
        self.consts[name] = value.contiguous()
        return name

    def forward(self, *args):
        env: dict[str, Any] = dict(zip(self.input_names, args))
        for k, buf in self._refs.items():
            env[k] = replace(self._small[k], t=getattr(self, buf)) if k in self._small else getattr(self, buf)
        for n in self.nodes:
            env.update(zip(n.outputs, _run(n, [env[i] if i else None for i in n.inputs])))
        return tuple(T(env[o]) for o in self.output_names)


def _run(n: _Node, xs: list) -> tuple:
    """Apply a node's handler; any failure becomes a QCError naming the node."""
    try:
        out = n.fn(n, xs, n.attrs, n.opset)
    except QCError:
        raise
    except Exception as e:
        raise n.error(f"could not be converted ({type(e).__name__}: {_first_line(e)})") from None
    out = out if isinstance(out, tuple) else (out,)
    if len([o for o in n.outputs if o]) > len(out):
        raise n.error(f"only the first {len(out)} output(s) are supported, the model uses {len(n.outputs)}")
    return out


def _fresh(module: torch.nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _fresh_key(d: dict, base: str) -> str:
    name, i = base, 0
    while name in d:
        i += 1
        name = f"{base}_{i}"
    return name


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _check_supported(nodes: list[_Node], model, opset: int) -> None:
    """One UnsupportedOpError listing every node the table cannot convert."""
    versions = {o.domain: o.version for o in model.opset_import}
    bad = []
    for n in nodes:
        if n.domain in ("", "ai.onnx") and n.fn is not None:
            continue
        custom = n.domain not in ("", "ai.onnx")
        dom = f" in domain '{n.domain}' (version {versions.get(n.domain, '?')})" if custom else ""
        bad.append(f"node '{n.name}', op '{n.op}'{dom}")
    if bad:
        what = "not supported" if len(bad) == 1 else f"{len(bad)} nodes are not supported"
        raise UnsupportedOpError(f"{'; '.join(bad)}: {what} by the ONNX importer (opset {opset})")


# -- entry point ------------------------------------------------------------------------

def load_onnx(path: str | os.PathLike) -> Graph:
    """Import an .onnx file (external data beside it is loaded) as a Graph.

    Dynamic dims (dim_param or unknown) stay dynamic and are named after the dim_param.
    Input/output names are kept where they are Python identifiers and sanitized otherwise;
    `meta["onnx_names"]` maps sanitized names back to the file's names.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise QCError(f"{path}: no such file")
    if os.path.isdir(path):
        raise QCError(f"{path}: is a directory, not an ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
        if any(t.data_location == P.EXTERNAL for t in model.graph.initializer):
            onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise QCError(f"{path}: could not read the model or its external data ({_first_line(e)})") from None
    except Exception as e:  # protobuf DecodeError and friends
        raise QCError(f"{path}: not a valid ONNX model ({type(e).__name__}: {_first_line(e)})") from None
    try:
        onnx.checker.check_model(model if model.ByteSize() < 2**31 - 1 else path)
    except Exception as e:
        raise QCError(f"{path}: not a valid ONNX model (checker: {_first_line(e)})") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise QCError(f"{path}: the model imports no default-domain (ai.onnx) opset")
    module = _OnnxModule(model, opset)
    specs = _input_specs(model, module.input_names)
    names = _safe_names(module.input_names)
    onames = _safe_names(module.output_names)
    examples, dynamic_shapes, dyn = _examples(specs, names)
    try:
        with torch.no_grad():
            ep = torch.export.export(module, tuple(examples), strict=False,
                                     dynamic_shapes=(tuple(dynamic_shapes),) if any(dynamic_shapes) else None)
    except QCError:
        raise
    except Exception as e:
        why = f"{type(e).__name__}: {_first_line(e)}"
        raise QCError(f"{path}: torch.export could not trace the imported model ({why})") from None
    for node in ep.graph.nodes:  # keep the input names free for the placeholders that take them
        if node.op != "placeholder" and node.name in names:
            node._rename(node.name + "_")
    g = from_exported_program(ep, input_names=names, output_names=onames, dynamic=dyn)
    g.source = os.path.basename(path)
    g.meta["onnx_opset"] = opset
    renamed = {s: o for s, o in zip(names + onames, module.input_names + module.output_names) if s != o}
    if renamed:
        g.meta["onnx_names"] = renamed
    eliminate_dead_code(g)
    g.prune_attrs()
    g.recompile()
    verify(g)
    return g


def _input_specs(model, names: list[str]) -> list[tuple[str, torch.dtype, list]]:
    """(name, dtype, dims) per graph input; a dim is an int or a dim_param / None when unknown."""
    out = []
    by_name = {i.name: i for i in model.graph.input}
    for name in names:
        if not by_name[name].type.HasField("tensor_type") or not by_name[name].type.tensor_type.HasField("shape"):
            raise QCError(f"input '{name}' is not a tensor with a known rank")
        tt = by_name[name].type.tensor_type
        dtype = _DTYPES.get(tt.elem_type)
        if dtype is None:
            raise QCError(f"input '{name}' has type {P.DataType.Name(tt.elem_type)}, which is not supported")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                for d in tt.shape.dim]
        out.append((name, dtype, dims))
    return out


def _examples(specs, names):
    """Example inputs for torch.export: dynamic dims get sizes >= 2 distinct from the static dims."""
    taken = {d for _, _, dims in specs for d in dims if isinstance(d, int)}
    sizes: dict[str, int] = {}

    def pick(label: str, start: int) -> int:
        if label not in sizes:
            sizes[label] = next(k for k in itertools.count(start) if k not in taken)
            taken.add(sizes[label])
        return sizes[label]

    examples, dshapes, dyn = [], [], {}
    for (name, dtype, dims), safe in zip(specs, names):
        shape, auto = [], {}
        for i, d in enumerate(dims):
            if isinstance(d, int):
                shape.append(d)
                continue
            label = d or f"{safe}_dim{i}"
            shape.append(pick(label, 2 if i == 0 else (32 if len(dims) >= 4 else 8)))
            auto[i] = Dim.AUTO
            dyn.setdefault(safe, {})[i] = label
        x = torch.rand(shape).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
        examples.append(x)
        dshapes.append(auto or None)
    return examples, dshapes, dyn


def _safe_names(names: list[str]) -> list[str]:
    """Python identifiers for the model's input/output names, unique, unchanged where possible."""
    out, used = [], set()
    for nm in names:
        s = nm if nm.isidentifier() else _safe(nm)
        s = s + "_" if keyword.iskeyword(s) else s
        base, i = s, 0
        while s in used:
            i += 1
            s = f"{base}_{i}"
        used.add(s)
        out.append(s)
    return out
