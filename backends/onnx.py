"""ONNX backend: a (fake-quantized) Graph -> a QDQ ONNX model, and an onnxruntime runner.

Route: torch.onnx.export(dynamo=True) with a custom translation of `qc.fake_quant` into
QuantizeLinear -> DequantizeLinear, then post-processing with the onnx API:

- constant inputs of QuantizeLinear (weights) are quantized here, exactly like the reference
  kernel (float32 division, round half to even, clamp), and stored as integer initializers
  feeding DequantizeLinear: the TensorRT explicit-quantization pattern int8 -> DQ -> Conv/Gemm;
- a range narrower than its integer type ([-127, 127] int8, 6-bit [-32, 31] in int8, ...) is
  made exact by clipping a non-constant input to [(qmin-z)*s, (qmax-z)*s] before
  QuantizeLinear (Clip per tensor, Max/Min with broadcast bounds per channel); a constant
  input is clipped the same way before it is quantized;
- qc.fake_quant_log2 and qc.log_sqrt2_split (log2 / log-sqrt2 quantizers) become standard ops
  that reproduce the torch kernel bit for bit (see _log_translations);
- dynamic dims get the names of the Graph's TensorSpecs; doc strings and metadata (stack
  traces, file paths) are dropped and node names made unique, so the bytes are a function of
  the graph alone;
- onnx.checker.check_model(full_check=True) must pass.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import re
import warnings
from typing import Any

import numpy as np
import onnx
import onnxscript
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper

from qcompiler.errors import QCError
from qcompiler.ir import Graph, op_name
from qcompiler.ops import (SQRT2_F32, expand_qparam, fake_quant, fake_quant_log2, log_code_ref, log_sqrt2_split,
                           quantize_ref)

FAKE_QUANT = fake_quant
LOG_OPS = (fake_quant_log2, log_sqrt2_split)
DEFAULT_OPSET = 20  # torch.onnx's default; int4/uint4/int16/uint16 and blocked quantization need 21
BLOCKED_OPSET = 21
OPSETS = range(17, 24)  # 17 through onnx's version converter (torch.onnx builds 18 and up)

# (qmin, qmax) of each ONNX integer type, smallest first; a range picks the first type containing it
_QTYPES = [
    (TensorProto.INT4, -8, 7), (TensorProto.UINT4, 0, 15), (TensorProto.INT8, -128, 127),
    (TensorProto.UINT8, 0, 255), (TensorProto.INT16, -32768, 32767), (TensorProto.UINT16, 0, 65535),
]
_OPSET21_TYPES = {TensorProto.INT4, TensorProto.UINT4, TensorProto.INT16, TensorProto.UINT16}


def qtype(qmin: int, qmax: int) -> tuple[int, int, int]:
    """The smallest ONNX integer type containing [qmin, qmax], and that type's own range:
    [-7, 7] -> int4, [-32, 31] (6-bit) -> int8, [-127, 127] -> int8, [0, 65535] -> uint16."""
    for t, lo, hi in _QTYPES:
        if lo <= qmin and qmax <= hi:
            return t, lo, hi
    raise QCError(f"quantization range [{qmin}, {qmax}] fits no ONNX integer type")


def export_onnx(graph: Graph, *, opset: int | None = None) -> bytes:
    """Serialize `graph` to a QDQ ONNX model (bytes of a single-file ModelProto).

    Opset: 20 (torch.onnx's default) unless the graph needs 21: int4/uint4/int16/uint16
    types or per-group (blocked) quantization. `opset` may ask for 17..23; asking for less
    than the graph needs is a QCError.
    """
    g, needs = _prepare(graph)
    opset = opset or (BLOCKED_OPSET if needs else DEFAULT_OPSET)
    if opset not in OPSETS:
        raise QCError(f"ONNX opset {opset} is not supported (choose {OPSETS[0]}..{OPSETS[-1]})")
    if needs and opset < BLOCKED_OPSET:
        raise QCError(f"the graph uses {', '.join(sorted(needs))}, which need ONNX opset >= {BLOCKED_OPSET} "
                      f"(asked for {opset})")
    args, dynamic_shapes = _example_args(graph)
    model = _torch_export(g, args, dynamic_shapes, opset)
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise QCError(f"torch.onnx could not convert the model to ONNX opset {opset} (it produced {got})")
    _constants_to_initializers(model.graph)
    _fold_quantize(model.graph)
    _rename_dims(model, graph)
    _scrub(model)
    if model.ByteSize() >= 2**31:
        raise QCError(f"the ONNX model is {model.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB single-file limit")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx raises ValidationError or InferenceError
        raise QCError(f"the exported ONNX model does not pass onnx.checker: {str(e).strip().splitlines()[0]}") from None
    return model.SerializeToString(deterministic=True)


# -- before export: on a copy of the fx graph ----------------------------------------------


def _prepare(graph: Graph) -> tuple[Graph, set[str]]:
    """Copy the graph; make per-tensor qparams 0-d; make narrow ranges exact (see module doc).

    Returns the copy and the features that need opset 21.
    """
    g = graph.copy()
    g.gm.eval()
    needs: set[str] = set()
    for n in list(g.nodes):
        if n.op == "call_function" and n.target in LOG_OPS:
            _prepare_log(g, n)
            continue
        if n.op != "call_function" or n.target is not FAKE_QUANT:
            continue
        x, s_node, z_node, qmin, qmax, axis, group = n.args
        if not (s_node.op == "get_attr" and z_node.op == "get_attr"):
            raise QCError("scale and zero point must be constants to export to ONNX", node=n.name, op=op_name(n))
        t, tmin, tmax = qtype(qmin, qmax)
        if t in _OPSET21_TYPES:
            needs.add(helper.tensor_dtype_to_string(t).split(".")[-1].lower())
        if group > 0:
            needs.add("per-group quantization")
        s, z = g.attr(s_node), g.attr(z_node)
        shape = s.shape if group > 0 else () if s.numel() == 1 else (s.numel(),)  # ONNX layouts
        if s.shape != shape or s.dtype != torch.float32:
            n.replace_input_with(s_node, g.add_constant(s.float().reshape(shape), s_node.target, n))
        if z.shape != shape:
            z = z.reshape(-1).expand(s.numel()) if z.numel() == 1 else z
            n.replace_input_with(z_node, g.add_constant(z.reshape(shape), z_node.target, n))
        s, z = s.float().reshape(shape), z.reshape(shape)
        if (qmin, qmax) == (tmin, tmax):
            continue
        if x.op == "get_attr":  # clip a constant only where saturating to the type would not
            w = g.attr(x).float()
            q = quantize_ref(w, s, z, tmin, tmax, axis, group)  # saturates to the type; narrower range?
            if q.min() < qmin or q.max() > qmax:
                clipped = torch.clamp(w, *_clip_bounds(s, z, qmin, qmax, w, axis, group))
                n.replace_input_with(x, g.add_constant(clipped.to(g.attr(x).dtype), f"{x.target}_clipped", n))
        elif group > 0:
            raise QCError(f"per-group quantization of a non-constant input to [{qmin}, {qmax}] "
                          "(not a full integer type) cannot be exported", node=n.name, op=op_name(n))
        elif s.numel() == 1:
            lo, hi = (float(v) for v in _clip_bounds(s, z, qmin, qmax))
            with g.graph.inserting_before(n):
                n.replace_input_with(x, g.graph.call_function(torch.ops.aten.clamp.default, (x, lo, hi)))
        else:
            rank = _rank(x)
            lo, hi = _clip_bounds(s, z, qmin, qmax, torch.empty([1] * rank), axis, group)
            lo_n, hi_n = g.add_constant(lo, f"{x.name}_clip_lo", n), g.add_constant(hi, f"{x.name}_clip_hi", n)
            with g.graph.inserting_before(n):
                n.replace_input_with(x, g.graph.call_function(torch.ops.aten.clamp.Tensor, (x, lo_n, hi_n)))
    g.prune_attrs()
    g.recompile()
    return g, needs


def _prepare_log(g: Graph, n: fx.Node) -> None:
    """A log quantizer's scale: a constant, made a 0-d float32 tensor; its input: float32."""
    x, s_node = n.args[0], n.args[1]
    if s_node.op != "get_attr":
        raise QCError("the scale of a log quantizer must be a constant to export to ONNX", node=n.name, op=op_name(n))
    v = x.meta.get("val")
    if isinstance(v, torch.Tensor) and v.dtype != torch.float32:
        raise QCError(f"log quantizers export for float32 inputs only (this one is {v.dtype})",
                      node=n.name, op=op_name(n))
    s = g.attr(s_node)
    if s.numel() != 1:
        raise QCError("a log quantizer's scale must be one value (per-tensor)", node=n.name, op=op_name(n))
    if s.shape != () or s.dtype != torch.float32:
        n.replace_input_with(s_node, g.add_constant(s.float().reshape(()), s_node.target, n))


def _clip_bounds(s, z, qmin, qmax, like=None, axis=0, group=0):
    """[(qmin - z) * s, (qmax - z) * s] in float32, broadcast against `like` when given."""
    if like is not None:
        if group > 0:
            s, z = expand_qparam(s, like, axis, group), expand_qparam(z, like, axis, group)
        elif s.numel() > 1:
            shape = [1] * like.dim()
            shape[axis % like.dim()] = s.numel()
            s, z = s.reshape(shape), z.reshape(shape)
    zf = z.float()
    return (qmin - zf) * s, (qmax - zf) * s


def _rank(x: fx.Node) -> int:
    v = x.meta.get("val")
    if isinstance(v, torch.Tensor):
        return v.dim()
    raise QCError("per-channel fake_quant input has no recorded shape (meta['val'])", node=x.name, op=op_name(x))


def _example_args(graph: Graph) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...] | None]:
    """Zeros of each input's shape; dynamic dims get a size (>= 2) distinct per dim name."""
    static = {d for spec in graph.inputs for d in spec.shape if isinstance(d, int)}
    sizes: dict[str, int] = {}
    nxt = 2
    args, dyn = [], []
    for spec in graph.inputs:
        shape = []
        for d in spec.shape:
            if isinstance(d, str) and d not in sizes:
                while nxt in static:
                    nxt += 1
                sizes[d], nxt = nxt, nxt + 1
            shape.append(sizes[d] if isinstance(d, str) else d)
        dt = spec.torch_dtype()
        args.append(torch.ones(shape, dtype=dt) if dt == torch.bool else torch.zeros(shape, dtype=dt))
        dyn.append({i: torch.export.Dim.AUTO for i, d in enumerate(spec.shape) if isinstance(d, str)} or None)
    return tuple(args), (tuple(dyn) if any(dyn) else None)


# -- export ----------------------------------------------------------------------------------


def _qdq_translation(opset: int):
    """An onnxscript function for qc.fake_quant: QuantizeLinear -> DequantizeLinear."""
    op = onnxscript.values.Opset("", opset)

    def fake_quant(x, scale, zero_point, qmin: int, qmax: int, axis: int, group_size: int):
        zp = op.Cast(zero_point, to=qtype(qmin, qmax)[0])
        per_axis = group_size > 0 or len(scale.shape) > 0
        attrs = {"axis": axis, **({"block_size": group_size} if group_size > 0 else {})} if per_axis else {}
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp, **attrs), scale, zp, **attrs)

    return fake_quant


@functools.lru_cache(maxsize=None)
def log_thresholds(bits: int, root: int) -> np.ndarray:
    """T[k], k = 0 .. 2^bits - 2: the smallest float32 y > 0 whose torch log code
    (qcompiler.ops.log_code_ref on y = x / s) is <= k, found by bisection over float32 bit
    patterns with the torch kernel itself. The code of y is then #{k : y < T[k]}: exact
    wherever torch's float32 log2 is monotone (tests check every threshold's neighbourhood).
    They are the boundaries of the torch kernel on the exporting machine: torch picks its log2
    kernel by CPU capability, and another build of it may move a boundary by an ulp."""
    one = torch.tensor(1.0)
    k = torch.arange(2**bits - 1, dtype=torch.float32)
    lo = torch.zeros_like(k, dtype=torch.int64)  # bits of +0: code 2^bits - 1 > k
    hi = torch.full_like(lo, 0x7F800000)  # bits of +inf: code 0 <= k
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        ok = log_code_ref(mid.to(torch.int32).view(torch.float32), one, bits, root) <= k
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    return hi.to(torch.int32).view(torch.float32).numpy()


def log_level_tables(bits: int, root: int) -> tuple[np.ndarray, np.ndarray]:
    """(even, odd) [2^bits]: 2^(-ceil(q/root)) where q is even (odd), else 0, and 0 at the zero
    code 2^bits - 1, computed with the torch kernel's expression (float32 exp2 of integers)."""
    q = torch.arange(2**bits, dtype=torch.float32)
    p = torch.where(q < 2**bits - 1, torch.exp2(-torch.ceil(q / root)), torch.zeros_like(q))
    odd = (torch.remainder(q, 2) == 1) if root == 2 else torch.zeros_like(q, dtype=torch.bool)
    return torch.where(odd, 0.0, p).numpy(), torch.where(odd, p, 0.0).numpy()


def _log_translations(opset: int):
    """onnxscript functions for qc.fake_quant_log2 and qc.log_sqrt2_split, bit-exact to the
    torch kernels (qcompiler.ops). ONNX has no Log2, and Round(Log(y) * -root/ln 2) is not
    torch's float32 log2: next to a code boundary it rounds the other way (2127 of 102400
    floats within 256 ulps of the 8-bit log-sqrt2 boundaries, ORT 1.32). So no logarithm:
        y = x / s where x > 0 else 0                      (Div: IEEE, as in torch)
        q = #{k : y < T[k]}                               binary search: `bits` Gather/Less/Where steps
        even = s * E[q],  odd = s * O[q]                  (E, O: log_level_tables; 0 at the zero code)
        fake_quant_log2 = s * E[q] (+ (s * sqrt2_f32) * O[q] for root 2)
    The products are the torch kernel's own (mantissa times an exact power of two), so every
    input gives the same float32 bits, zeros, 1.0, x > s, subnormals and x / s underflowing to
    0, inf and NaN (the zero code, as in torch) included."""
    op = onnxscript.values.Opset("", opset)

    def const(a):
        return op.Constant(value=numpy_helper.from_array(np.asarray(a)))

    def code(x, scale, bits: int, root: int):
        t = log_thresholds(bits, root)
        zero = const(np.array(0.0, np.float32))
        y = op.Where(op.Greater(x, zero), op.Div(x, scale), zero)
        shifted = const(np.concatenate([[np.inf], t]).astype(np.float32))  # shifted[c] = T[c - 1]
        step = 2 ** (bits - 1)
        q = op.Where(op.Less(y, const(t[step - 1])), const(np.array(step, np.int64)), const(np.array(0, np.int64)))
        while step > 1:  # q + step <= 2^bits - 1: q counts the T[k] above y
            step //= 2
            c = op.Add(q, const(np.array(step, np.int64)))
            q = op.Where(op.Less(y, op.Gather(shifted, c)), c, q)
        return q

    def log2_translation(x, scale, bits: int, root: int):
        q = code(x, scale, bits, root)
        even, odd = log_level_tables(bits, root)
        y = op.Mul(scale, op.Gather(const(even), q))
        if root == 2:
            y = op.Add(y, op.Mul(op.Mul(scale, const(np.array(SQRT2_F32, np.float32))), op.Gather(const(odd), q)))
        return y

    def split_translation(x, scale, bits: int):
        q = code(x, scale, bits, 2)
        even, odd = log_level_tables(bits, 2)
        return op.Mul(scale, op.Gather(const(even), q)), op.Mul(scale, op.Gather(const(odd), q))

    return {fake_quant_log2: log2_translation, log_sqrt2_split: split_translation}


def _torch_export(g: Graph, args, dynamic_shapes, opset: int) -> onnx.ModelProto:
    logs = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [log.level for log in logs]
    for log in logs:  # notes such as "torchvision is not installed", "converting with the onnx C API"
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                g.gm, args, dynamo=True,
                custom_translation_table={FAKE_QUANT: _qdq_translation(opset), **_log_translations(opset)},
                dynamic_shapes=dynamic_shapes, input_names=[s.name for s in g.inputs],
                output_names=[s.name for s in g.outputs], opset_version=opset, optimize=True,
                verbose=False, external_data=False,
            )
    except Exception as e:
        raise _export_error(e, g) from None
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    return prog.model_proto


def _export_error(e: Exception, g: Graph) -> QCError:
    """A QCError naming the node and op the exporter failed on, when its message says."""
    chain, c = [], e
    while c is not None and len(chain) < 20:
        chain.append(c)
        c = c.__cause__ or c.__context__
    text = "\n".join(str(c) for c in chain)
    m = re.search(r"translating node %(\w+)", text)
    if m:
        nodes = {n.name: n for n in g.nodes}
        name = m.group(1)
        op = op_name(nodes[name]) if name in nodes else None
        why = next((ln.strip() for c in chain for ln in str(c).splitlines() if "No ONNX function" in ln), "")
        return QCError(f"the ONNX exporter cannot translate this op{' (' + why + ')' if why else ''}; "
                       "rewrite it into ATen ops that torch.onnx supports", node=name, op=op)
    first = next((ln for ln in str(chain[-1]).splitlines() if ln.strip()), type(chain[-1]).__name__)
    return QCError(f"torch.onnx.export failed: {type(chain[-1]).__name__}: {first}")


# -- after export: the onnx model --------------------------------------------------------------


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes holding a tensor become initializers (one kind of constant to fold)."""
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            graph.initializer.append(t)
        else:
            keep.append(node)
    _set_nodes(graph, keep)


def _fold_quantize(graph: onnx.GraphProto) -> None:
    """Fold Cast and QuantizeLinear nodes whose inputs are all initializers into integer
    initializers; drop initializers and value_info nothing uses any more."""
    inits = {t.name: t for t in graph.initializer}
    keep, done, renames = [], {}, {}
    for node in graph.node:
        ins = [i for i in node.input if i]
        if node.domain not in ("", "ai.onnx") or not all(i in inits for i in ins) or not _foldable(node, ins, inits):
            keep.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        key = (node.op_type, tuple(node.input), tuple(sorted(attrs.items())))
        if key not in done:
            arrs = [_to_array(inits[i]) for i in ins]
            if node.op_type == "Cast":
                t = _make_tensor(arrs[0], attrs["to"], node.output[0])
            else:
                zp_type = inits[ins[2]].data_type
                t = _make_tensor(quantize(*arrs, zp_type, attrs.get("axis", 1), attrs.get("block_size", 0)),
                                 zp_type, _fresh(f"{ins[0]}_quantized", inits))
            graph.initializer.append(t)
            inits[t.name] = t
            done[key] = t.name
        renames[node.output[0]] = done[key]
    for n in keep:
        n.input[:] = [renames.get(i, i) for i in n.input]
    keep += [helper.make_node("Identity", [renames[o.name]], [o.name]) for o in graph.output if o.name in renames]
    _set_nodes(graph, keep)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    produced = {o for n in graph.node for o in n.output}
    vi = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(vi)


def _foldable(node: onnx.NodeProto, ins: list[str], inits: dict) -> bool:
    """QuantizeLinear to one of our integer types, or an integer-to-integer Cast."""
    if node.op_type == "QuantizeLinear":
        return len(ins) == 3 and inits[ins[2]].data_type in _QTYPE_RANGE
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return node.op_type == "Cast" and inits[ins[0]].data_type in _INT_TYPES and to in _INT_TYPES


_QTYPE_RANGE = {t: (lo, hi) for t, lo, hi in _QTYPES}
_INT_TYPES = set(_QTYPE_RANGE) | {TensorProto.INT32, TensorProto.INT64, TensorProto.UINT32, TensorProto.UINT64}


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: int, axis: int = 1,
             block_size: int = 0) -> np.ndarray:
    """ONNX QuantizeLinear by the reference kernel (qcompiler.ops.quantize_ref), saturating to
    the range of ONNX type `dtype`; returns int64 values."""
    lo, hi = _QTYPE_RANGE[dtype]
    q = quantize_ref(torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(scale, np.float32)),
                     torch.from_numpy(np.asarray(zero_point).astype(np.float32)), lo, hi, axis, block_size)
    return q.numpy().astype(np.int64)


def _to_array(t: onnx.TensorProto) -> np.ndarray:
    a = numpy_helper.to_array(t)
    return a.astype(np.int64) if t.data_type in (TensorProto.INT4, TensorProto.UINT4) else a


def _make_tensor(a: np.ndarray, dtype: int, name: str) -> onnx.TensorProto:
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, dtype, a.shape, a.astype(np.int64).flatten().tolist())
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    return numpy_helper.from_array(np.asarray(a).astype(np_type), name)


def _fresh(name: str, used) -> str:
    out, i = name, 0
    while out in used:
        i += 1
        out = f"{name}_{i}"
    return out


def _set_nodes(graph: onnx.GraphProto, nodes) -> None:
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
    del graph.node[:]
    graph.node.extend(nodes)


def _rename_dims(model: onnx.ModelProto, graph: Graph) -> None:
    """Symbols the exporter chose for dynamic dims (s77, ...) -> the Graph's dim names."""
    names: dict[str, str] = {}
    for vi, spec in zip(model.graph.input, graph.inputs):
        for d, want in zip(vi.type.tensor_type.shape.dim, spec.shape):
            if isinstance(want, str) and d.HasField("dim_param"):
                names.setdefault(d.dim_param, want)
    if not names:
        return
    pat = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True)) + r")\b")
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = pat.sub(lambda m: names[m.group(1)], d.dim_param)


def _scrub(model: onnx.ModelProto) -> None:
    """Drop everything that is not a function of the graph: doc strings, metadata (stack
    traces, source paths), the exporter's producer fields; give every node a unique name."""
    from qcompiler import __version__

    model.producer_name, model.producer_version = "qcompiler", __version__
    g = model.graph
    seen: set[str] = set()
    for i, n in enumerate(g.node):
        n.name = _fresh(n.name or f"{n.op_type}_{i}", seen)
        seen.add(n.name)
    parts = [model, g, *g.input, *g.output, *g.value_info, *g.initializer, *g.node, *model.functions,
             *(n for f in model.functions for n in f.node)]
    for p in parts:
        p.ClearField("doc_string")
        p.ClearField("metadata_props")
    for n in [*g.node, *(n for f in model.functions for n in f.node)]:
        for a in n.attribute:
            a.ClearField("doc_string")


# -- runtime ----------------------------------------------------------------------------------


def fused_int8_is_exact() -> bool:
    """Whether ORT's fused int8 CPU kernels compute exact int32 sums here. On x86 CPUs without
    VNNI, MLAS multiplies u8 x s8 pairs with vpmaddubsw, whose int16 pair sums saturate once
    |a1 w1 + a2 w2| > 32767, which full-range int8 weights reach (measured on an AVX2-only AMD
    EPYC: a QDQ MatMul 48 output steps off)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True
    return any(f in flags for f in (" avx512_vnni", " avx_vnni", " amx_int8"))


def _has_4bit_activations(src: str | bytes) -> bool:
    """True when a QuantizeLinear of a computed (non-initializer) tensor outputs int4 / uint4."""
    try:
        m = onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(src, load_external_data=False)
    except Exception:  # let onnxruntime report what is wrong with the file
        return False
    inits = {t.name: t.data_type for t in m.graph.initializer}
    four = (TensorProto.INT4, TensorProto.UINT4)
    return any(n.op_type == "QuantizeLinear" and n.input[0] not in inits and len(n.input) > 2
               and inits.get(n.input[2]) in four for n in m.graph.node)


class OnnxRunner:
    """An onnxruntime session (CPU, default threads) with inputs and outputs keyed by name.

    `optimize=True` keeps ORT's default graph optimizations, which fuse QDQ patterns into
    integer kernels (QGemm, QLinearConv: int32 bias, requantized outputs), where those kernels
    are exact (fused_int8_is_exact); elsewhere only the basic optimizations run, so the QDQ
    graph computes what the torch reference does instead of saturating. `optimize=False`
    runs the QDQ graph op by op, and so does a model with 4-bit activations (see __init__).
    `self.fused_int8` says which it is.
    """

    def __init__(self, path_or_bytes: str | os.PathLike | bytes, *, optimize: bool = True, spinning: bool = True):
        import onnxruntime as ort

        src = path_or_bytes if isinstance(path_or_bytes, bytes) else os.fspath(path_or_bytes)
        opts = ort.SessionOptions()
        if not spinning:  # ORT's threads spin after each run by default, taking cores from what runs next
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.fused_int8 = optimize and fused_int8_is_exact()
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        elif not self.fused_int8:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        # A weight-only int8 MatMul (a float input: a log-quantized activation, a float island) is fused
        # into MatMulNBits, whose default accuracy level 4 rounds that float input to int8 on the fly;
        # level 1 computes in float32, as the QDQ graph says.
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        if _has_4bit_activations(src):
            # ORT 1.32's graph optimizers mishandle 4-bit activation QDQ pairs: at the extended level a
            # 4-bit QuantizeLinear is copied before a MaxPool (QDQPropagationTransformer) and fused into
            # an integer MaxPool that has no int4 kernel (INVALID_GRAPH at load); with that off, the
            # Fashion-MNIST CNN at W4A4 still computed logits 0.24 (basic level) to 5.7 (all) of their
            # max-abs away from the QDQ graph's. Op by op, ORT computes what the QDQ graph says.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self.fused_int8 = False
        try:
            self.session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise QCError(f"onnxruntime cannot load the model: {str(e).strip().splitlines()[0]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise QCError(f"missing input(s) {missing} (the model's inputs are {self.input_names})")
        outs = self.session.run(self.output_names, {n: np.asarray(feeds[n]) for n in self.input_names})
        return dict(zip(self.output_names, outs))


# -- the artifact interface (see backends/__init__.py) ---------------------------------------

RUNTIME = "onnxruntime"


def emit(graph: Graph) -> dict[str, bytes]:
    return {"model.onnx": export_onnx(graph)}


def load(artifact_dir: str, manifest: dict) -> OnnxRunner:
    return OnnxRunner(os.path.join(artifact_dir, "model.onnx"))
