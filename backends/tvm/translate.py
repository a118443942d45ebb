"""The integer graph (qc:: integer ops, ATen shape ops) as a TVM Relax module.

One Relax binding per fx node, built with relax.BlockBuilder. Each qc:: op is written out in
the arithmetic its torch kernel defines (qcompiler/int_ops.py): int64 products, rounding
shifts, integer divisions, exact isqrt; the matmul-like ops accumulate in int32, which is
exact for the shapes qcompiler.int_ops.check_accumulator accepts. The translation never
approximates: a node whose semantics it cannot reproduce is refused with its name and op.

Rounding right shift, half away from zero, in one add and one arithmetic shift:
    sign(p) (|p| + 2^(c-1)) >> c  ==  (p + 2^(c-1) - [p < 0]) >> c     (c >= 1)
(for p < 0 both are -floor((|p| + h) / 2^c) = floor((p + h - 1) / 2^c)).
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx as fx

from qcompiler import int_ops as I
from qcompiler.errors import QCError
from qcompiler.ir import Graph

aten = torch.ops.aten
I64_MIN_HALF = torch.iinfo(torch.int64).min // 2


class Fused:
    """The env value of a node computed inside another node's kernel call (no Relax value of its own)."""

    def __init__(self, by: str):
        self.by = by


class Columns:
    """The env value of a node that is columns [start, start + width) of a Relax value's last dim
    (one GEMM for several linears that read the same input). Kernels that take strided views
    read `value` directly (fuse_attention.py); any other reader gets the slice (Translator.arg)."""

    def __init__(self, value, start: int, width: int):
        self.value, self.start, self.width = value, start, width


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _dt(t: torch.dtype) -> str:
    return str(t).replace("torch.", "")


VNNI_BLOCK = "qc_dot_u8s8"  # the name of backends/tvm/vnni.py's kernels in the module
CPU_DOTS = ("vnni", "amx", "avx2")  # build.int8_dot's names for vnni.py's instruction sets


def _isa(tr):
    from . import vnni
    return vnni.isa_of(tr.dot)


def _linear_isa(tr, *weights: np.ndarray):
    """The CPU kernel's instruction set for linears with these constant weights: on AVX2, the
    vpmaddubsw variant where every |w| <= 64 (7-bit weights), else the target's."""
    from . import vnni
    if tr.dot == "avx2" and all(np.abs(w.astype(np.int16)).max(initial=0) <= vnni.S7_MAX for w in weights):
        return vnni.AVX2_S7
    return _isa(tr)


class _Element:
    """What an elementwise kernel's fn sees besides its inputs' values: raw, the tensor inputs'
    loads, and table(i), a read of the kernel's constant table. Intermediates are plain
    expressions, not TIR Let bindings: TVM's simplifier substitutes let-bound values back anyway,
    and in apache-tvm 0.27 a Let over a per-channel value inside a vectorized CPU loop fails its
    type check (int64 vs int64x16). So each kernel's arithmetic reads a value at most a few times
    (no Select: see _rshift_round), which keeps its expression small once inlined."""

    def __init__(self, table=None):
        self._table, self.raw = table, []

    def table(self, i):
        return self._table(i)


class Translator:
    def __init__(self, graph: Graph, dot: str | None = None, kind: str | None = None):
        import tvm
        from tvm import relax, tirx
        self.tvm, self.relax, self.tir, self.R = tvm, relax, tirx, relax.op
        self.g = graph
        self.bb = relax.BlockBuilder()
        self.env: dict[fx.Node, object] = {}
        self.dims: dict[str, object] = {}
        # "vnni" / "avx2": int8 linears as u8 x s8 dot products over a packed weight layout (CPU);
        # "sm90": int8 linears / matmuls and the requant after them as one call of
        # qcompiler's CUTLASS kernel (cuda_kernels.py), on Hopper's tensor cores
        self.dot = dot
        self.kind = kind  # "llvm": rows_cpu.py's row kernels for the softmax
        self.kernels: dict = {}  # hand-written kernels added to the module, per shape
        # tvm-cuda: values kept zero-padded along their last dim to a multiple of 16 (the int8
        # GEMM's TMA rows) between our kernels: fx node -> its true last-dim size. padded_k: a
        # softmax output padded with zeros (the next GEMM's K); padded_n: a GEMM's requantized
        # output with junk-free padding columns that the softmax after it skips.
        self.padded: dict = {}
        self.sliced: dict = {}  # a Columns value's slice, where a reader needs it as a tensor

    # -- helpers ------------------------------------------------------------------------------
    def emit(self, expr, name: str | None = None):
        return self.bb.emit(expr, name_hint=name or "")

    def const(self, value, dtype: str):
        return self.relax.const(np.asarray(value, dtype=dtype), dtype)

    def shape_of(self, v) -> list:
        return list(v.ty.shape.values)

    def dtype_of(self, v) -> str:
        return str(v.ty.dtype)

    def ndim(self, v) -> int:
        return v.ty.ndim

    def cast(self, v, dtype: str):
        return v if self.dtype_of(v) == dtype else self.emit(self.R.astype(v, dtype))

    def i64(self, v):
        return self.cast(v, "int64")

    def sub_zp(self, v, zp: int, dtype: str = "int64"):
        v = self.cast(v, dtype)
        return v if zp == 0 else self.emit(self.R.subtract(v, self.const(zp, dtype)))

    def axis_const(self, t: torch.Tensor, like, axis: int, dtype: str):
        """A per-tensor (scalar) or per-channel constant shaped to broadcast along `axis` of `like`."""
        a = _np(t).astype(dtype)
        if a.size == 1:
            return self.const(a.reshape(()), dtype)
        shape = [1] * self.ndim(like)
        shape[axis % self.ndim(like)] = a.size
        return self.const(a.reshape(shape), dtype)

    def isqrt(self, v, scale_bits: int = 0):
        """floor(sqrt(v * 2^scale_bits)) for int64 v (one elementwise kernel)."""
        return self.elementwise("isqrt", [v], lambda el, x: _isqrt(x * (1 << scale_bits) if scale_bits else x),
                                "int64", own_kernel=True)

    def elementwise(self, name: str, inputs: list, fn, dtype: str, table=None, own_kernel: bool = False,
                    fusable: bool = False):
        """One elementwise kernel over the broadcast shape of `inputs` (numpy broadcasting; a
        Python int stands for a scalar constant and is passed to fn as is): fn(el, *scalars) ->
        TIR expression, where el (an _Element) has table(i), a read of the 1-D constant
        `table`, and raw, the tensor inputs' loads. Each integer op is one such kernel (not a chain of
        Relax ops), so TVM's GPU schedules, which inline elementwise producers into their
        consumers, inline one small expression per op instead of a tree that copies every
        value into each of its uses (exponential in a chain of requantizations).
        own_kernel: never fused into a consumer (op_pattern opaque), for small per-row results
        whose expression is long (isqrt): inlined where it is read several times, TVM's
        simplifier takes minutes per kernel (MiniLM's LayerNorm: 117 s).
        fusable: a kernel reading its table once per element, marked injective (TVM's analysis
        calls a table read opaque) so that FuseOps fuses it with the elementwise ops around it."""
        from tvm import te, tirx
        tensors = [v for v in inputs if not isinstance(v, int)]
        shapes = [self.shape_of(v) for v in tensors]
        rank = max(len(sh) for sh in shapes)
        one = lambda d: _static(d) and int(d) == 1
        out_shape = []
        for k in range(rank):
            dims = [sh[k - rank + len(sh)] for sh in shapes if k - rank + len(sh) >= 0]
            big = [d for d in dims if not one(d)]
            out_shape.append(big[0] if big else dims[0])

        def body(*ts):
            ts, tab = (ts[:-1], ts[-1]) if table is not None else (ts, None)

            def at(*i):
                el = _Element(tab)
                for t in ts:
                    r = len(t.shape)
                    idx = [tirx.const(0, "int64") if one(d) and not one(o) else ix
                           for d, o, ix in zip(t.shape, out_shape[rank - r:], i[rank - r:])]
                    el.raw.append(t(*idx))
                loaded = iter(el.raw)
                return fn(el, *[v if isinstance(v, int) else next(loaded) for v in inputs])
            return te.compute(out_shape, at, name=name)
        args = tensors + ([table] if table is not None else [])
        attrs = {"primfunc_attrs": {"op_pattern": 8}} if own_kernel else {}  # 8: kOpaque
        if fusable:
            attrs = {"primfunc_attrs": {"op_pattern": 2}}  # 2: kInjective
        return self.bb.emit_te(body, *args, primfunc_name_hint=name, **attrs)

    def per_channel(self, t: torch.Tensor, like, axis: int, dtype: str = "int64"):
        """An integer constant of a requant-like op: a Python int when it is one value, else a
        tensor of `dtype` shaped to broadcast along `axis` of `like` (for elementwise)."""
        a = _np(t).astype(np.int64)
        return int(a.reshape(-1)[0]) if a.size == 1 else self.axis_const(t, like, axis, dtype)

    def arg(self, a):
        if isinstance(a, fx.Node):
            if a.op == "get_attr" and a not in self.env:  # a constant used as a tensor operand
                t = self.tensor_const(a)
                self.env[a] = self.const(_np(t), _dt(t.dtype))
            if a not in self.env:
                raise QCError("value used before it is defined", node=a.name, op=str(a.target))
            v = self.env[a]
            if isinstance(v, Columns):  # the slice, once (env keeps the Columns for kernels that read views)
                if a not in self.sliced:
                    self.sliced[a] = self.emit(self.R.strided_slice(v.value, axes=[self.ndim(v.value) - 1],
                                                                    begin=[v.start], end=[v.start + v.width]))
                v = self.sliced[a]
            if isinstance(v, Fused):
                raise QCError(f"value computed inside the fused kernel of {v.by}, which has no value of its own",
                              node=a.name, op=str(a.target))
            return v
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        return a

    def tensor_const(self, node: fx.Node) -> torch.Tensor:
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            raise QCError("the TVM backend needs this operand to be a constant", node=getattr(node, "name", "?"),
                          op=str(getattr(node, "target", "?")))
        return self.g.attr(node)

    def value(self, node: fx.Node, dtype: str):
        """An operand as a Relax value of `dtype`: a constant if it is one, else the computed value."""
        if node.op == "get_attr":
            return self.const(_np(self.tensor_const(node)).astype(dtype), dtype)
        return self.cast(self.arg(node), dtype)

    # -- the graph ------------------------------------------------------------------------------
    def build(self):
        relax, tir = self.relax, self.tir
        params = []
        for spec in self.g.inputs:
            shape = []
            for d in spec.shape:
                if isinstance(d, str):
                    d = self.dims.setdefault(d, tir.Var(d, "int64"))
                shape.append(d)
            params.append(relax.Var(spec.name, relax.TensorType(shape, spec.dtype)))
        placeholders = [n for n in self.g.graph.nodes if n.op == "placeholder"]
        with self.bb.function("main", params):
            with self.bb.dataflow():
                for n, p in zip(placeholders, params):
                    self.env[n] = p
                outs = None
                for n in self.g.graph.nodes:
                    if n.op == "placeholder":
                        continue
                    if n.op == "output":
                        outs = [self.arg(o) for o in n.args[0]]
                        break
                    if n.op == "get_attr":
                        continue  # constants are read by the ops that use them
                    if n in self.env:
                        continue  # computed by the kernel of the op before it (a fused requant)
                    self.env[n] = self.node(n)
                res = self.bb.emit_output(relax.Tuple(outs))
            self.bb.emit_func_output(res)
        return self.bb.get()

    def node(self, n: fx.Node):
        t = n.target
        fn = QC.get(t) or ATEN.get(getattr(t, "overloadpacket", t))
        if fn is None:
            raise QCError("the TVM backend cannot translate this op", node=n.name, op=str(t))
        try:
            return fn(self, n)
        except QCError:
            raise
        except Exception as e:  # a TVM type error: name the node
            raise QCError(f"TVM translation failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                          node=n.name, op=str(t)) from None


# -- qc:: integer ops ----------------------------------------------------------------------------

def _quantize(tr: Translator, n):
    """q = clamp(round_half_even(x / s) + z, qmin, qmax) in float32, as qcompiler.ops.quantize_ref."""
    x, scale, zp, qmin, qmax, axis = n.args
    R = tr.R
    xv = tr.cast(tr.arg(x), "float32")
    s = tr.axis_const(tr.tensor_const(scale).float(), xv, axis, "float32")
    z = tr.axis_const(tr.tensor_const(zp).float(), xv, axis, "float32")
    y = tr.emit(R.divide(xv, s))
    from tvm import te, tirx
    # relax's round is half away from zero on some targets; nearbyint is half to even everywhere
    r = tr.bb.emit_te(lambda t: te.compute(t.shape, lambda *i: tirx.nearbyint(t(*i)), name="round_half_even"), y,
                      primfunc_name_hint="round_half_even")
    q = tr.emit(R.clip(R.add(r, z), float(qmin), float(qmax)))
    return tr.cast(q, _dt(I.int_dtype(qmin, qmax)))


def _dequantize(tr, n):
    q, scale, zp, axis = n.args
    qv = tr.arg(q)
    z = tr.axis_const(tr.tensor_const(zp).float(), qv, axis, "float32")
    s = tr.axis_const(tr.tensor_const(scale).float(), qv, axis, "float32")
    R = tr.R
    return tr.emit(R.multiply(R.subtract(R.astype(qv, "float32"), z), s))


def _requant(tr, n):
    """y = clamp(rshift_round((acc - in_zp) * mult, shift) + out_zp): one elementwise kernel."""
    acc, in_zp, mult, shift, out_zp, qmin, qmax, axis = n.args
    av = tr.arg(acc)
    mt = tr.tensor_const(mult)
    # per-channel multipliers as int32 where they fit: the product of two sign-extended int32
    # values is one vpmuldq on AVX2, where an int64 x int64 product takes LLVM five instructions
    m = tr.per_channel(mt, av, axis, "int32" if mt.abs().max() < 2**31 else "int64")
    c = tr.per_channel(tr.tensor_const(shift), av, axis)

    def fn(el, a, m_, c_):
        p = (_i64(a) - in_zp) * (_i64(m_) if not isinstance(m_, int) else m_)
        return _saturate(_rshift_round(p, c_) + out_zp, qmin, qmax)
    return tr.elementwise("requant", [av, m, c], fn, _dt(I.int_dtype(qmin, qmax)))


def _mm_operand(tr, v, zp):
    """An operand of an int32-accumulating matmul: int8 as-is when its zero point is 0, else widened."""
    if zp == 0 and tr.dtype_of(v) in ("int8", "int16", "int32"):
        return v
    return tr.sub_zp(v, zp, "int32")


def _same_dtype(tr, a, b):
    if tr.dtype_of(a) != tr.dtype_of(b):
        return tr.cast(a, "int32"), tr.cast(b, "int32")
    return a, b


def _int_linear(tr, n):
    x, x_zp, w, bias = n.args
    wt = tr.tensor_const(w)
    xv = tr.arg(x)
    if tr.dot == "sm90":
        group = _linear_group_sm90(tr, n, xv)
        if len(group) > 1:
            return _linears_sm90(tr, n, xv, group)
        if group:
            _l, req, b = group[0]
            return _gemm_sm90(tr, n, req, xv, tr.const(_np(wt), "int8"), b, batched=False)
    if tr.dot in CPU_DOTS and wt.dtype == torch.int8 and tr.dtype_of(xv) in ("int8", "uint8") and \
            wt.shape[0] % _isa(tr).lanes == 0 and wt.shape[1] % 4 == 0:
        group = _linear_group_cpu(tr, n, xv, x_zp)
        if group and _linears_cpu(tr, n, xv, x_zp, group):
            return Fused(n.name)
        return _linear_vnni(tr, n, xv, x_zp, wt, bias)
    xv = _mm_operand(tr, xv, x_zp)
    wv = tr.const(_np(wt), _dt(wt.dtype))
    xv, wv = _same_dtype(tr, xv, wv)
    y = tr.emit(tr.R.linear(xv, wv, None, out_dtype="int32"))
    if bias is not None:
        y = tr.emit(tr.R.add(y, tr.value(bias, "int32")))
    return y


def _linear_sm90(tr, lin, xv):
    """(requant, int32 bias) of an int_linear that the GEMM kernel computes with its requant, or None."""
    _x, x_zp, w, bias = lin.args
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    wt = tr.tensor_const(w)
    req = _gemm_requant(tr, lin, xv, x_zp, wt.shape[0], wt.shape[1], wt.dtype)
    if req is None:
        return None
    b = _gemm_bias(tr, bias, _np(wt), x_zp)
    return None if b is None else (req, b)


def _gemm_bias(tr, bias, w2: np.ndarray, x_zp: int) -> np.ndarray | None:
    """The GEMM kernel's int32 bias for (x - x_zp) @ w2^T + bias (w2 [N, K] int8): bias - x_zp
    colsum(w2), exact; None where an int32 accumulator could overflow with it."""
    b = _bias64(tr, bias, w2.shape[0]) - x_zp * w2.astype(np.int64).sum(1)
    if np.abs(b).max(initial=0) + w2.shape[1] * 128 * 128 >= 2**31:
        return None
    return b.astype(np.int32)


def _linear_group_sm90(tr, n, xv) -> list:
    """[(linear, requant, bias)] for n and, where every int_linear reading n's input can be
    computed with its requant and their requants share out_zp and range (attention's q, k, v), each
    of them: one GEMM over the concatenated weights then computes them all. [] where n's GEMM
    does not apply; [n's] alone where the siblings do not all fit."""
    one = _linear_sm90(tr, n, xv)
    if one is None:
        return []
    x, x_zp = n.args[0], n.args[1]
    sibs = [u for u in x.users if u.target is I.int_linear and u.args[0] is x]
    if len(sibs) < 2 or sibs[0] is not n or any(u in tr.env for u in sibs):
        return [(n, *one)]
    group = [(n, *one)]
    for lin in sibs[1:]:
        got = _linear_sm90(tr, lin, xv) if lin.args[1] == x_zp else None
        if got is None or got[0].args[4:7] != one[0].args[4:7] or \
                tr.tensor_const(lin.args[2]).shape[1] != tr.tensor_const(n.args[2]).shape[1]:
            return [(n, *one)]
        group.append((lin, *got))
    return group


def _linears_sm90(tr, n, xv, group):
    """The linears of `group` (_linear_group_sm90) as one GEMM + requant call over their
    concatenated weights: each requant's value is its columns of the output (Columns)."""
    ws = [_np(tr.tensor_const(lin.args[2])) for lin, _r, _b in group]
    vec = lambda t, k: np.broadcast_to(_np(tr.tensor_const(t)).astype(np.int64).reshape(-1), (k,))  # noqa: E731
    mult = np.concatenate([vec(r.args[2], w.shape[0]) for (_l, r, _b), w in zip(group, ws)])
    shift = np.concatenate([vec(r.args[3], w.shape[0]) for (_l, r, _b), w in zip(group, ws)])
    _acc, _zp, _m, _c, out_zp, qmin, qmax, _axis = group[0][1].args
    y = _gemm_sm90_call(tr, xv, tr.const(np.concatenate(ws), "int8"), np.concatenate([b for _l, _r, b in group]),
                        mult, shift, out_zp, qmin, qmax, batched=False)
    start = 0
    for (lin, req, _b), w in zip(group, ws):
        tr.env[req] = Columns(y, start, w.shape[0])
        if lin is not n:
            tr.env[lin] = Fused(n.name)
        start += w.shape[0]
    return Fused(n.name)


def _linear_vnni(tr, n, xv, x_zp: int, wt: torch.Tensor, bias):
    """(x - x_zp) @ w^T + bias as vnni.py's kernel computes it (_cpu_operand): u = x + 128 as
    uint8 for int8 x (x itself for uint8), sum_k u_k w_jk in int32 over w packed (vnni.pack),
    minus (128 + x_zp) * sum_k w_jk: the same integers, since every term is exact in int32
    (AVX2 with 8-bit weights: u = x - x_zp as int16, nothing to subtract). With the requant
    after it (_vnni_requant) in the kernel's epilogue (_linears_cpu): binds that node, returns
    None."""
    from . import vnni
    req = _vnni_requant(tr, n, wt.shape[0], tr.ndim(xv))
    if req is not None and _linears_cpu(tr, n, xv, x_zp, [(n, wt, req)]):
        return None
    isa = _linear_isa(tr, _np(wt))
    u3, lead = _cpu_operand(tr, xv, x_zp, isa)
    corr = _colsum_mult(tr, xv, x_zp, isa) * _np(wt).astype(np.int64).sum(1)
    n_out, k_in = wt.shape
    y = _vnni_call(tr, u3, tr.const(vnni.pack(_np(wt), isa), "int8"), k_in, n_out, [1, math.prod(lead), n_out],
                   isa=isa)
    y = tr.emit(tr.R.reshape(y, [*lead, n_out]))
    if corr.any():
        y = tr.emit(tr.R.subtract(y, tr.const(corr.astype(np.int32), "int32")))
    if bias is not None:
        y = tr.emit(tr.R.add(y, tr.value(bias, "int32")))
    return y


def _colsum_mult(tr, xv, x_zp: int, isa) -> int:
    """c such that the linear's value is the kernel's sum minus c * sum_k w_jk (_cpu_operand)."""
    return (128 if tr.dtype_of(xv) == "int8" else 0) + x_zp if isa.act == "uint8" else 0


def _cpu_operand(tr, xv, x_zp: int, isa):
    """(u as [1, rows, k], x's leading dims) for vnni.py's kernel: VNNI-style u = x + 128 (uint8
    x as it is; _colsum_mult corrects for it), or AVX2's u = x - x_zp as int16."""
    if isa.act == "uint8":
        u = _as_uint8(tr, xv, 128 if tr.dtype_of(xv) == "int8" else 0)
    else:
        u = tr.sub_zp(xv, x_zp, "int16")
    shape = tr.shape_of(u)
    return tr.emit(tr.R.reshape(u, [1, math.prod(shape[:-1]), shape[-1]])), shape[:-1]


def _linear_group_cpu(tr, n, xv, x_zp: int) -> list:
    """[(linear, weight, requant)] for the int_linears reading n's input with n's zero point
    where there are several (attention's q, k, v), n is the first, none is translated yet, and
    each has int8 weights of n's K (rows a multiple of the kernel's lanes) and a requant the
    kernel computes in its epilogue (_vnni_requant), all with one output zero point and range:
    then one kernel call over the concatenated weights computes them all. Else []."""
    x = n.args[0]
    sibs = [u for u in x.users if u.target is I.int_linear and u.args[0] is x]
    if len(sibs) < 2 or sibs[0] is not n or any(u in tr.env for u in sibs):
        return []
    k_in, ndim = tr.tensor_const(n.args[2]).shape[1], tr.ndim(xv)
    group = []
    for lin in sibs:
        w = lin.args[2]
        if lin.args[1] != x_zp or not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return []
        wt = tr.tensor_const(w)
        if wt.dtype != torch.int8 or wt.ndim != 2 or wt.shape[1] != k_in or wt.shape[0] % _isa(tr).lanes:
            return []
        req = _vnni_requant(tr, lin, wt.shape[0], ndim)
        if req is None or (group and req.args[4:7] != group[0][2].args[4:7]):
            return []
        group.append((lin, wt, req))
    return group


def _linears_cpu(tr, n, xv, x_zp: int, group) -> bool:
    """The linears of `group` ([(linear, weight, requant)]: one, or _linear_group_cpu's) as one
    call of vnni.py's kernel over their concatenated weights, each requant in the epilogue; one
    linear's requant gets the output, several get their columns of it (Columns, sliced by their
    readers). False (nothing emitted) where an offset does not fit the epilogue."""
    from . import vnni
    w = np.concatenate([_np(wt) for _l, wt, _r in group])
    isa = _linear_isa(tr, w)
    tables, start, cm = [], 0, _colsum_mult(tr, xv, x_zp, isa)
    for lin, wt, req in group:
        offset = _bias64(tr, lin.args[3], wt.shape[0]) - cm * _np(wt).astype(np.int64).sum(1)
        if np.abs(offset).max(initial=0) >= 2**31:
            return False
        _acc, in_zp, mult, shift, out_zp, _qmin, _qmax, _axis = req.args
        tables.append(vnni.epilogue_table(offset - in_zp, _np(tr.tensor_const(mult)), _np(tr.tensor_const(shift)),
                                          isa, int(out_zp)))
    _acc, _in_zp, _mult, _shift, out_zp, qmin, qmax, _axis = group[0][2].args
    rq = vnni.Requant(_dt(I.int_dtype(qmin, qmax)), int(out_zp), int(qmin), int(qmax), True)
    u3, lead = _cpu_operand(tr, xv, x_zp, isa)
    n_all, k_in = w.shape
    y = _vnni_call(tr, u3, tr.const(vnni.pack(w, isa), "int8"), k_in, n_all, [1, math.prod(lead), n_all],
                   ep=(np.concatenate(tables, axis=1), rq), isa=isa)
    y = tr.emit(tr.R.reshape(y, [*lead, n_all]))
    if len(group) == 1:
        tr.env[group[0][2]] = y
        return True
    for lin, wt, req in group:
        tr.env[req] = Columns(y, start, wt.shape[0])
        if lin is not n:
            tr.env[lin] = Fused(n.name)
        start += wt.shape[0]
    return True


def _bias64(tr, bias, n_out: int) -> np.ndarray:
    """A linear's bias as int64 [n_out] (zeros without one)."""
    return np.zeros(n_out, np.int64) if bias is None else _np(tr.tensor_const(bias)).astype(np.int64).reshape(-1)


def _vnni_requant(tr, n, n_out: int | None, ndim: int):
    """The requant after `n` that the VNNI kernel can compute in its epilogue, or None: `n`'s only
    user; multiplier and shift per tensor or per column (along the last axis, where n_out is
    static); |multiplier| < 2^31 and 0 <= shift <= 62, so that every product fits in int64."""
    users = list(n.users)
    if len(users) != 1 or users[0].target is not I.requant:
        return None
    r = users[0]
    _acc, _in_zp, mult, shift, _out_zp, _qmin, _qmax, axis = r.args
    m, c = tr.tensor_const(mult), tr.tensor_const(shift)
    if m.numel() != 1 and (n_out is None or m.numel() != n_out or c.numel() not in (1, n_out) or
                           axis % ndim != ndim - 1):
        return None
    if m.abs().max() >= 2**31 or c.min() < 0 or c.max() > 62:
        return None
    return r


def _vnni_call(tr, u3, w, k: int | None, n: int | None, out_shape: list, packed: bool = True,
               req=None, offset: np.ndarray | None = None, colsum_mult: int = 0, ep=None, isa=None):
    """One call of backends/tvm/vnni.py's kernel for (k, n) (None: symbolic), or of amx.py's
    where the target has AMX and the shape fits (packed weights), each kind added to the module
    once. req: the requant node the kernel's epilogue computes, on the product plus `offset`
    (per column, or one value) minus colsum_mult * sum_k w[k, j]; the output then has the
    requant's dtype, else it is the int32 product. ep: (e table, vnni.Requant) built by the
    caller, in place of req. isa: vnni.py's instruction set (default: the target's)."""
    from . import amx, vnni
    isa = isa or _isa(tr)
    args = [u3, w]
    rq = None
    if ep is not None:
        table, rq = ep
        args.append(tr.const(table, "int64"))
    elif req is not None:
        _acc, in_zp, mult, shift, out_zp, qmin, qmax, _axis = req.args
        table = vnni.epilogue_table(offset - in_zp, _np(tr.tensor_const(mult)), _np(tr.tensor_const(shift)),
                                    isa, int(out_zp))
        rq = vnni.Requant(_dt(I.int_dtype(qmin, qmax)), int(out_zp), int(qmin), int(qmax), table.shape[1] > 1,
                          colsum_mult)
        args.append(tr.const(table, "int64"))
    tiles = tr.dot == "amx" and packed and k is not None and n is not None and amx.fits(k, n)
    key = ("amx" if tiles else isa.name, k, n, packed, rq)
    if key not in tr.kernels:
        name = (f"qc_amx_dot_{k}x{n}" if tiles else f"{VNNI_BLOCK}_{k or 'k'}x{n or 'n'}" + ("" if packed else "_act") +
                ("_s7" if isa is vnni.AVX2_S7 else "")) + \
            ("" if rq is None else f"_rq{len(tr.kernels)}")
        f = amx.kernel(k, n, rq) if tiles else vnni.kernel(k, n, packed, rq, isa)
        tr.kernels[key] = tr.bb.add_func(f.with_attr("global_symbol", name), name)
    return tr.emit(tr.relax.call_tir(tr.kernels[key], args, tr.relax.TensorType(out_shape, rq.out_dtype if rq else "int32")))


def _as_uint8(tr, v, off: int):
    """v + off as uint8 (off = 128 for int8 values, 0 for values already in uint8's range)."""
    if off:
        v = tr.emit(tr.R.add(tr.R.astype(v, "int16"), tr.const(off, "int16")))
    return tr.cast(v, "uint8")


def _matmul_vnni(tr, node, a, a_zp: int, bv):
    """(a - a_zp) @ b for activations a (int8 / uint8) and b (int8, zero point 0), batched over
    equal leading dims, with the linears' kernel (vnni.py): u = a as uint8 (a itself when it
    cannot be negative, as a softmax's output, else a + 128), b packed by the kernel panel by
    panel (zeros past its edges add nothing), then minus (128 + a_zp) * sum_k b[k, j] where that
    is not 0 (AVX2: u = a - a_zp as int16, nothing to subtract). With the requant after it in the kernel (per tensor, or per column where n is static):
    binds that node and returns None. The leading dims must be equal (_same_batch)."""
    av = tr.arg(a)
    sa, sb = tr.shape_of(av), tr.shape_of(bv)
    lead, m, k, n = sa[:-2], sa[-2], sa[-1], sb[-1]
    ks, ns = (int(k) if _static(k) else None), (int(n) if _static(n) else None)
    if ks is not None and ks % 4:
        ks = None
    if _isa(tr).act == "int16":  # a - a_zp exactly: nothing to correct
        off, a_zp, ua = 0, 0, tr.sub_zp(av, a_zp, "int16")
    else:
        off = 128 if tr.dtype_of(av) == "int8" and not _nonnegative(a) else 0
        ua = _as_uint8(tr, av, off)
    bt = math.prod(lead) if lead else 1
    u3 = tr.emit(tr.R.reshape(ua, [bt, m, k]))
    b3 = tr.emit(tr.R.reshape(bv, [bt, k, n]))
    req = _vnni_requant(tr, node, ns, len(sa))
    if req is not None:
        y = _vnni_call(tr, u3, b3, ks, ns, [bt, m, n], packed=False, req=req, offset=np.zeros(1, np.int64),
                       colsum_mult=off + a_zp)
        tr.env[req] = tr.emit(tr.R.reshape(y, [*lead, m, n]))
        return None
    y = _vnni_call(tr, u3, b3, ks, ns, [bt, m, n], packed=False)
    if off + a_zp:
        cs = tr.emit(tr.R.sum(tr.R.astype(b3, "int32"), axis=[1], keepdims=True))
        y = tr.emit(tr.R.subtract(y, tr.R.multiply(cs, tr.const(off + a_zp, "int32"))))
    return tr.emit(tr.R.reshape(y, [*lead, m, n]))


def _same_batch(tr, av, bv) -> bool:
    """Whether two matmul operands have the same leading (batch) dims: no broadcasting."""
    import tvm_ffi
    sa, sb = tr.shape_of(av), tr.shape_of(bv)
    return len(sa) == len(sb) >= 2 and all(tvm_ffi.structural_equal(x, y) for x, y in zip(sa[:-2], sb[:-2]))


def _nonnegative(node) -> bool:
    """Whether an integer op's output is never negative: an int_softmax's is
    clamp(rshift_round(e * mult // sum e, shift) + out_zp) with e >= 0, so >= 0 where mult and
    out_zp are (or where its saturation's lower bound is)."""
    if getattr(node, "target", None) is not I.int_softmax:
        return False
    mult, out_zp, qmin = node.args[4], node.args[6], node.args[7]
    return qmin >= 0 or (mult >= 0 and out_zp >= 0)


def _ceil16(v: int) -> int:
    return -(-v // 16) * 16


def _slice_last(tr, v, size: int):
    """v's first `size` entries along its last dim."""
    return tr.emit(tr.R.strided_slice(v, axes=[tr.ndim(v) - 1], begin=[0], end=[size]))


def _unpad(tr, node, v):
    """The value of `node` at its true size, if it is kept padded (Translator.padded)."""
    true = tr.padded.get(node)
    return v if true is None else _slice_last(tr, v, true)


def _pad_last(tr, v, axis: int, to: int):
    """v zero-padded at the end of `axis` to size `to`."""
    nd = tr.ndim(v)
    axis = _norm_dim(axis, nd)
    width = [0] * (2 * nd)
    width[2 * axis + 1] = to - int(tr.shape_of(v)[axis])
    return tr.emit(tr.R.nn.pad(v, width)) if width[2 * axis + 1] else v


def _int_matmul(tr, n):
    """Attention's activation x activation matmuls. On tvm-cuda (zero points 0, int8): one call of
    the batched GEMM kernel with the requant after it; K or N that are not multiples of 16 (DeiT's
    197 tokens) are zero-padded to one (exact: zeros add nothing), the softmax before it writing its
    output padded and the one after it reading the padded output (Translator.padded)."""
    a, a_zp, b, b_zp = n.args
    if tr.dot == "sm90":
        from .fuse_attention import fuse
        done = fuse(tr, n)
        if done is not None:
            return done
    if tr.dot == "sm90" and a_zp == 0 and b_zp == 0:
        av, bv = tr.arg(a), tr.arg(b)
        shape_b = tr.shape_of(bv)
        if tr.ndim(av) == tr.ndim(bv) and tr.ndim(av) >= 3 and tr.dtype_of(av) == tr.dtype_of(bv) == "int8" and \
                _static(shape_b[-1]) and _static(shape_b[-2]) and b not in tr.padded:
            k_in, n_out = int(shape_b[-2]), int(shape_b[-1])
            kp, np_ = _ceil16(k_in), _ceil16(n_out)
            req = _gemm_requant(tr, n, av, 0, np_, kp, torch.int8)
            if req is not None and np_ != n_out and tr.tensor_const(req.args[2]).numel() != 1:
                req = None  # per-channel constants are not padded
            if req is not None:
                if a not in tr.padded:
                    av = _pad_last(tr, av, -1, kp)
                bv = _pad_last(tr, _pad_last(tr, bv, -2, kp), -1, np_)
                bt = tr.emit(tr.R.permute_dims(bv, [*range(tr.ndim(bv) - 2), tr.ndim(bv) - 1, tr.ndim(bv) - 2]))
                _gemm_sm90(tr, n, req, av, bt, np.zeros(np_, np.int32), batched=True)
                if np_ != n_out:
                    users = list(req.users)
                    if users and all(u.target is I.int_softmax and u.args[0] is req and u.args[1] is not req
                                     for u in users):
                        tr.padded[req] = n_out  # the softmax reads the padded rows (or unpads)
                    else:
                        tr.env[req] = _slice_last(tr, tr.env[req], n_out)
                return None
    if tr.dot in CPU_DOTS and b_zp == 0 and tr.dtype_of(tr.arg(b)) == "int8" and \
            tr.dtype_of(tr.arg(a)) in ("int8", "uint8") and _same_batch(tr, tr.arg(a), tr.arg(b)):
        return _matmul_vnni(tr, n, a, a_zp, tr.arg(b))
    av, bv = _mm_operand(tr, _unpad(tr, a, tr.arg(a)), a_zp), _mm_operand(tr, _unpad(tr, b, tr.arg(b)), b_zp)
    av, bv = _same_dtype(tr, av, bv)
    return tr.emit(tr.R.matmul(av, bv, out_dtype="int32"))


def _static(d) -> bool:
    from tvm import tirx
    return isinstance(d, (int, tirx.IntImm))


def _gemm_requant(tr, n, xv, x_zp: int, n_out: int, k_in: int, w_dtype, ch_axis: int | None = None):
    """The requant that the CUDA GEMM kernel can compute in its epilogue for `n`, or None:
    `n`'s only user, int8 or int16 out (the full range), input zero point 0, |out_zp| <= 2^16,
    per tensor or per output channel (the last axis of `n`, which has x's rank, or ch_axis); int8
    operands with K and N multiples of 16 (TMA's 16-byte rows)."""
    users = list(n.users)
    if len(users) != 1 or users[0].target is not I.requant or w_dtype != torch.int8 or tr.dtype_of(xv) != "int8":
        return None
    r = users[0]
    _acc, in_zp, mult, shift, out_zp, qmin, qmax, axis = r.args
    if in_zp != 0 or (qmin, qmax) not in ((-128, 127), (-32768, 32767)) or k_in % 16 or n_out % 16 or \
            abs(int(out_zp)) > 2**16:  # the epilogue adds out_zp in int32 to a value of at most 2^30
        return None
    m, c = tr.tensor_const(mult), tr.tensor_const(shift)
    want = tr.ndim(xv) - 1 if ch_axis is None else ch_axis
    if m.numel() != 1 and (axis % max(1, tr.ndim(xv)) != want or m.numel() != n_out):
        return None
    if m.abs().max() >= 2**31 or c.min() < 0 or c.max() > 62:  # the kernel takes int32 multipliers
        return None
    return r


def _gemm_sm90(tr, n, req, xv, wv, bias: np.ndarray, batched: bool):
    """requant(x @ w^T + bias) in one CUTLASS kernel; binds the requant node, returns None for n."""
    _acc, _in_zp, mult, shift, out_zp, qmin, qmax, _axis = req.args
    n_out = int(tr.shape_of(wv)[-2])
    vec = lambda t: np.broadcast_to(_np(tr.tensor_const(t)).astype(np.int64).reshape(-1), (n_out,))  # noqa: E731
    tr.env[req] = _gemm_sm90_call(tr, xv, wv, bias, vec(mult), vec(shift), out_zp, qmin, qmax, batched)
    return None


def _gemm_sm90_call(tr, xv, wv, bias: np.ndarray, mult: np.ndarray, shift: np.ndarray, out_zp: int, qmin: int,
                    qmax: int, batched: bool):
    """clamp(rshift_round((x @ w^T + bias) * mult, shift) + out_zp, qmin, qmax) (mult, shift per
    output column) as one call of the CUTLASS kernel, shaped [*x's leading dims, N]."""
    from .cuda_kernels import HI_SHIFTS, gemm_func, pick_tile
    n_out = int(tr.shape_of(wv)[-2])
    k_in = int(tr.shape_of(wv)[-1])
    lead = tr.shape_of(xv)[:-1]
    out_dt = _dt(I.int_dtype(qmin, qmax))
    if batched:
        rows = lead[-1]
        batch = 1
        for d in lead[:-1]:
            batch = batch * d
        x3 = tr.emit(tr.R.reshape(xv, [batch, rows, k_in]))
        w3 = tr.emit(tr.R.reshape(wv, [batch, n_out, k_in]))
        out_ty = tr.relax.TensorType([batch, rows, n_out], out_dt)
    else:
        rows = 1
        for d in lead:
            rows = rows * d
        x3 = tr.emit(tr.R.reshape(xv, [rows, k_in]))
        w3 = wv
        out_ty = tr.relax.TensorType([rows, n_out], out_dt)
    args = [x3, w3, tr.const(bias, "int32"), tr.const(mult.astype(np.int32), "int32"),
            tr.const(shift.astype(np.int32), "int32"), tr.relax.prim_value(int(out_zp)),
            tr.relax.prim_value(int(qmin)), tr.relax.prim_value(int(qmax))]
    m_rows = math.prod(int(d) for d in lead) if all(_static(d) for d in lead) else None
    hi = HI_SHIFTS[0] <= int(shift.min()) and int(shift.max()) <= HI_SHIFTS[1]
    y = tr.emit(tr.relax.call_dps_packed(gemm_func(pick_tile(m_rows, n_out, k_in), out_dt, hi), args, out_ty))
    return tr.emit(tr.R.reshape(y, [*lead, n_out]))


def _conv_patches_sm90(tr, n):
    """A 2-D convolution whose windows tile its input (stride = kernel, no padding, dilation 1,
    groups 1: a ViT's patch embedding) and its requant as one call of the GEMM kernel: x [B, C, H,
    W] viewed as the rows of its windows, [B Ho Wo, C kh kw] (a reshape and a transpose: each input
    entry is in one window), times the weights as [O, C kh kw], the result transposed back to [B, O,
    Ho, Wo]; the input zero point folded into the bias as for a linear (exact). Returns whether it
    applied (the requant then bound)."""
    x, x_zp, w, bias, stride, padding, dilation, groups = n.args
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return False
    wt = tr.tensor_const(w)
    xv = tr.arg(x)
    shape = _static_shape(tr, xv)
    if wt.dim() != 4 or wt.dtype != torch.int8 or groups != 1 or any(int(d) != 1 for d in dilation) or \
            any(int(p) != 0 for p in padding) or [int(v) for v in stride] != list(wt.shape[2:]) or shape is None:
        return False
    b_, c_in, h, w_ = (int(v) for v in shape)
    o, kh, kw = (int(v) for v in (wt.shape[0], wt.shape[2], wt.shape[3]))
    k_in = c_in * kh * kw
    if c_in != wt.shape[1] or h % kh or w_ % kw:
        return False
    req = _gemm_requant(tr, n, xv, x_zp, o, k_in, wt.dtype, ch_axis=1)
    if req is None:
        return False
    w2 = _np(wt).reshape(o, k_in)
    b = _gemm_bias(tr, bias, w2, x_zp)
    if b is None:
        return False
    R, ho, wo = tr.R, h // kh, w_ // kw
    win = tr.emit(R.reshape(xv, [b_, c_in, ho, kh, wo, kw]))
    win = tr.emit(R.reshape(tr.emit(R.permute_dims(win, [0, 2, 4, 1, 3, 5])), [b_ * ho * wo, k_in]))
    _gemm_sm90(tr, n, req, win, tr.const(w2, "int8"), b, batched=False)
    y = tr.emit(R.reshape(tr.env[req], [b_, ho, wo, o]))
    tr.env[req] = tr.emit(R.permute_dims(y, [0, 3, 1, 2]))
    return True


def _int_conv(tr, n):
    x, x_zp, w, bias, stride, padding, dilation, groups = n.args
    if tr.dot == "sm90" and _conv_patches_sm90(tr, n):
        return None
    xv = _mm_operand(tr, tr.arg(x), x_zp)
    wt = tr.tensor_const(w)
    wv = tr.const(_np(wt), _dt(wt.dtype))
    xv, wv = _same_dtype(tr, xv, wv)
    R = tr.R
    if wt.dim() == 4:
        y = tr.emit(R.nn.conv2d(xv, wv, strides=stride, padding=padding, dilation=dilation, groups=groups,
                                out_dtype="int32"))
    elif wt.dim() == 3:
        y = tr.emit(R.nn.conv1d(xv, wv, strides=stride, padding=padding, dilation=dilation, groups=groups,
                                out_dtype="int32"))
    else:
        raise QCError(f"the TVM backend translates 1-D and 2-D integer convolutions, not {wt.dim() - 2}-D",
                      node=n.name, op="qc::int_conv")
    if bias is not None:
        y = tr.emit(R.add(y, R.reshape(tr.value(bias, "int32"), [wt.shape[0]] + [1] * (wt.dim() - 2))))
    return y


def _int_add(tr, n):
    a, a_zp, a_mult, b, b_zp, b_mult, shift, out_zp, qmin, qmax = n.args

    def fn(el, x, y):
        p = (_i64(x) - a_zp) * a_mult + (_i64(y) - b_zp) * b_mult
        return _saturate(_rshift_round(p, shift) + out_zp, qmin, qmax)
    return tr.elementwise("int_add", [tr.arg(a), tr.arg(b)], fn, _dt(I.int_dtype(qmin, qmax)))


def _int_lut(tr, n):
    x, table, offset = n.args
    tab = tr.tensor_const(table)
    if tr.dot == "sm90":
        done, y = _lut_sm90(tr, n, tr.arg(x), tab, offset)
        if done:
            return y
    from tvm import tirx
    top = tab.numel() - 1
    return tr.elementwise("int_lut", [tr.arg(x)],
                          lambda el, a: el.table(tirx.max(tirx.min(_i64(a) - _c(offset), _c(top)), _c(0))),
                          _dt(tab.dtype), table=tr.const(_np(tab), _dt(tab.dtype)), fusable=True)


def _int_sum(tr, n):
    x, x_zp, dims, keepdim = n.args
    s = tr.emit(tr.R.sum(tr.sub_zp(tr.arg(x), x_zp), axis=list(dims), keepdims=keepdim))
    return tr.cast(s, "int32")


def _int_mul(tr, n):
    a, a_zp, b, b_zp = n.args
    return tr.emit(tr.R.multiply(tr.sub_zp(tr.arg(a), a_zp), tr.sub_zp(tr.arg(b), b_zp)))


def _int_div(tr, n):
    """As int_ops.int_div, with round_div (half away from zero, 0 where b == 0) inline."""
    from tvm import tirx
    a, a_zp, b, mult, shift, out_zp, qmin, qmax = n.args

    def fn(el, x, den):
        num, den = (_i64(x) - a_zp) * mult, _i64(den)
        d = tirx.max(den, _c(1))
        q = tirx.floordiv(tirx.abs(num) * 2 + d, d * 2)
        t = q * (_c(1) - 2 * tirx.Cast("int64", num < _c(0)))
        y = _rshift_round(t, shift) * tirx.Cast("int64", den > _c(0)) + out_zp
        return _saturate(y, qmin, qmax)
    return tr.elementwise("int_div", [tr.arg(a), tr.arg(b)], fn, _dt(I.int_dtype(qmin, qmax)))


def _int_l2_norm(tr, n):
    x, x_zp, dims, keepdim, frac_bits = n.args
    sq = tr.elementwise("l2_square", [tr.arg(x)], lambda el, v: (lambda t: t * t)(_i64(v) - x_zp), "int64")
    s = tr.emit(tr.R.sum(sq, axis=list(dims), keepdims=keepdim))
    return tr.isqrt(s, 2 * frac_bits)


def _int_softmax(tr, n):
    """As int_ops' int_softmax: d = rowmax - x (masked entries excluded), e = table[min(d, N-1)]
    (0 where masked), t = (e * mult) // max(sum e, 1), y = clamp(rshift_round(t, shift) + out_zp).
    The two elementwise stages are single kernels (see Translator.elementwise)."""
    x, mask, table, dim, mult, shift, out_zp, qmin, qmax = n.args
    from tvm import tirx
    R = tr.R
    xv = tr.arg(x)
    tab = tr.tensor_const(table)
    if tr.dot == "sm90":
        y = _softmax_sm90(tr, n, xv, mask, tab, dim, mult, shift, out_zp, qmin, qmax)
        if y is not None:
            return y
        xv = _unpad(tr, x, xv)
    top = tab.numel() - 1
    if tr.kind == "llvm" and (dim % tr.ndim(xv)) == tr.ndim(xv) - 1:
        y = _softmax_rows_cpu(tr, xv, mask, tab, mult, shift, out_zp, qmin, qmax)
        if y is not None:
            return y
    tv = tr.const(_np(tab).astype(np.int64), "int64")
    i64, c = _i64, _c
    if mask is not None:
        mv = tr.cast(tr.arg(mask), "bool")
        xm = tr.elementwise("softmax_masked", [xv, mv], lambda el, a, k: tirx.Select(k, i64(a), c(I64_MIN_HALF)),
                            "int64")
        mx = tr.emit(R.max(xm, axis=[dim], keepdims=True))

        def exp_(el, a, k, m):
            a, _k, m = el.raw
            # clamped below too: a masked entry may exceed the row's max (Select loads both sides)
            return tirx.Select(k, el.table(tirx.max(tirx.min(m - i64(a), c(top)), c(0))), c(0))
        e = tr.elementwise("softmax_exp", [xv, mv, mx], exp_, "int64", table=tv)
    else:
        mx = tr.emit(R.max(tr.i64(xv), axis=[dim], keepdims=True))
        e = tr.elementwise("softmax_exp", [xv, mx], lambda el, a, m: el.table(tirx.min(el.raw[1] - i64(el.raw[0]), c(top))),
                           "int64", table=tv)
    s = tr.emit(R.sum(e, axis=[dim], keepdims=True))

    def out_(el, ev, sv):
        div = _floordiv_small_quotient if _softmax_div_fits(mult, tab) else tirx.floordiv
        t = div(ev * c(mult), tirx.max(sv, c(1)))
        return _saturate(_rshift_round(t, shift) + c(out_zp), qmin, qmax)
    return tr.elementwise("softmax_out", [e, s], out_, _dt(I.int_dtype(qmin, qmax)))


def _softmax_rows_cpu(tr, xv, mask, tab: torch.Tensor, mult: int, shift: int, out_zp: int, qmin: int, qmax: int):
    """The softmax over the last dim as rows_cpu.py's row kernel: x as [rows, n], the mask (its
    leading dims a prefix of x's, then 1s: it broadcasts over the rest) as [mask rows, n] int8.
    None for other mask shapes."""
    from .rows_cpu import softmax
    shape = tr.shape_of(xv)
    n, rows = shape[-1], math.prod(shape[:-1])
    args = [tr.emit(tr.R.reshape(xv, [rows, n]))]
    if mask is not None:
        mv = tr.arg(mask)
        ms = tr.shape_of(mv)
        # the mask's leading dims must be a prefix of x's, with 1s after it (e.g. [b, 1, 1, n])
        lead = [d for d in ms[:-1]]
        while lead and _static(lead[-1]) and int(lead[-1]) == 1:
            lead.pop()
        import tvm_ffi
        if len(ms) != len(shape) or any(not tvm_ffi.structural_equal(a, b) for a, b in zip(lead, shape)) or \
                any(not (_static(d) and int(d) == 1) for d in ms[len(lead):-1]):
            return None
        mrows = math.prod(lead) if lead else 1
        args.append(tr.emit(tr.R.reshape(tr.cast(tr.cast(mv, "bool"), "int8"), [mrows, n])))
    tab_dt = "int32" if tab.abs().max() < 2**31 else "int64"
    out_dt = _dt(I.int_dtype(qmin, qmax))
    key = ("softmax_rows", tr.dtype_of(xv), mask is not None, int(tab.numel()), tab_dt, mult, shift, out_zp, qmin, qmax)
    if key not in tr.kernels:
        name = f"qc_softmax_rows{len(tr.kernels)}"
        f = softmax(tr.dtype_of(xv), mask is not None, int(tab.numel()) - 1, tab_dt, int(mult), int(shift), int(out_zp),
                    int(qmin), int(qmax), out_dt, _softmax_div_fits(mult, tab), _softmax_float_div(mult, tab))
        tr.kernels[key] = tr.bb.add_func(f.with_attr("global_symbol", name), name)
    args.append(tr.const(_np(tab).astype(tab_dt), tab_dt))
    y = tr.emit(tr.relax.call_tir(tr.kernels[key], args, tr.relax.TensorType([rows, n], out_dt)))
    return tr.emit(tr.R.reshape(y, shape))


def _i64(v):
    from tvm import tirx
    return v if str(v.ty) == "int64" else tirx.Cast("int64", v)


def _c(v: int):
    from tvm import tirx
    return tirx.const(v, "int64")


def _saturate(y, qmin: int, qmax: int):
    from tvm import tirx
    return tirx.Cast(_dt(I.int_dtype(qmin, qmax)), tirx.max(tirx.min(y, _c(qmax)), _c(qmin)))


def _rshift_round(p, c):
    """p / 2^c rounded half away from zero (int_ops.rshift_round), for an int64 p and a shift
    c >= 0 that is a Python int or an int64 value (a per-channel shift), written without Select
    and reading p twice: (p + 2^(c-1) - [p < 0]) >> c (arithmetic shift) for c > 0, p for c = 0.
    (For p < 0 that is floor((p + 2^(c-1) - 1) / 2^c) = -floor((|p| + 2^(c-1)) / 2^c).) A Select
    reads p three times and makes TVM's simplifier simplify each branch under its condition:
    exponential time in a chain of requantizations."""
    from tvm import tirx
    neg = tirx.Cast("int64", p < _c(0))
    if isinstance(c, int):
        return p if c == 0 else tirx.shift_right(p + _c(1 << (c - 1)) - neg, _c(c))
    pos = tirx.Cast("int64", c > _c(0))
    half = tirx.shift_left(pos, tirx.max(c - _c(1), _c(0)))
    return tirx.shift_right(p + half - neg * pos, c)


def _softmax_div_fits(mult: int, tab: torch.Tensor) -> bool:
    """Whether the softmax's floor(e * mult / S) may use _floordiv_small_quotient: e <= S (every
    e >= 0), so the quotient is at most mult (< 2^49), and e * mult stays far inside int64."""
    return 0 <= mult < 2**49 and mult * max(int(tab.max()), 1) < 2**62


def _softmax_float_div(mult: int, tab: torch.Tensor) -> bool:
    """Whether rows_cpu's softmax may run its output stage in float64 lanes (exact: see there):
    0 <= e * mult < 2^49 for every table entry e."""
    return 0 <= mult and int(tab.min()) >= 0 and mult * max(int(tab.max()), 1) < 2**49


def _floordiv_small_quotient(a, d):
    """floor(a / d) for int64 a >= 0, d >= 1 whose quotient is below 2^49, without an integer
    division (which no x86 vector unit has: LLVM would divide lane by lane): the float64 estimate
    fl(fl(a) / fl(d)) is within 2^-2 of a / d (three roundings of relative error 2^-53 each), so
    its floor q0 is the answer Q or one off; one step down (q0 d > a) and one step up
    ((q + 1) d <= a) make it exact. Products stay below a + 2d, far from int64's limit."""
    from tvm import tirx
    f64 = lambda v: tirx.Cast("float64", v)
    q = tirx.Cast("int64", tirx.floor(f64(a) / f64(d)))
    q = q - tirx.Cast("int64", q * d > a)
    return q + tirx.Cast("int64", (q + _c(1)) * d <= a)


def _isqrt(x):
    """floor(sqrt(x)) for int64 x in [0, 2^62), as int_ops.isqrt: the float64 estimate r0 is
    within 1 of the answer R (|sqrt(fl(x)) - sqrt(x)| < 2^-21 for x < 2^62), so one step down
    (r0 > R) then one step up (r0 < R) makes it exact; Select-free like _rshift_round."""
    from tvm import tirx
    r = tirx.Cast("int64", tirx.floor(tirx.sqrt(tirx.Cast("float64", x))))
    r = r - tirx.Cast("int64", r * r > x)
    return r + tirx.Cast("int64", (r + _c(1)) * (r + _c(1)) <= x)


def _int_layer_norm(tr, n):
    """As int_ops.int_layer_norm, in four kernels: the row sum of x', the row sum of d^2 (d
    recomputed from x and the first sum), the per-row reciprocal std, and the output."""
    from tvm import tirx
    x, x_zp, eps, sqrt_bits, gamma, beta, shift, out_zp, qmin, qmax = n.args
    R = tr.R
    xv = tr.arg(x)
    if tr.dot == "sm90":
        y = _layer_norm_sm90(tr, n)
        if y is not None:
            return y
    ch = int(tr.shape_of(xv)[-1])
    s1 = tr.emit(R.sum(tr.sub_zp(xv, x_zp), axis=[-1], keepdims=True))
    dev = lambda v, s: (_i64(v) - x_zp) * ch - s
    sq = tr.elementwise("ln_square", [xv, s1], lambda el, v, s: (lambda d: d * d)(dev(v, s)), "int64")
    s2 = tr.emit(R.sum(sq, axis=[-1], keepdims=True))

    def recip(el, v):
        r = _isqrt((tirx.floordiv(v, _c(ch)) + eps) * (1 << sqrt_bits))
        return tirx.floordiv(_c(1 << I.LN_RECIP_BITS), tirx.max(r, _c(1))) * tirx.Cast("int64", r > _c(0))
    inv = tr.elementwise("ln_recip", [s2], recip, "int64", own_kernel=True)
    g = tr.const(_np(tr.tensor_const(gamma)).astype(np.int64).reshape(-1), "int64")
    b = tr.const(_np(tr.tensor_const(beta)).astype(np.int64).reshape(-1), "int64")

    def out(el, v, s, r, g_, b_):
        nn_ = _rshift_round(dev(v, s) * r, I.LN_RECIP_BITS - sqrt_bits // 2 - I.LN_NORM_BITS)
        y = _rshift_round(nn_ * g_ + b_, shift) + out_zp
        return _saturate(y, qmin, qmax)
    return tr.elementwise("layer_norm", [xv, s1, inv, g, b], out, _dt(I.int_dtype(qmin, qmax)))


# -- tvm-cuda: qcompiler's row and table kernels (kernels/int_rows.cu) ---------------------------
# Each returns None (or (False, None)) where the kernel's preconditions do not hold; the op then
# takes the generic path above.

# what the kernels read and write (each pair is one instantiation of a kernel template)
_ROW_IN = ("int8", "int16")
_ROW_OUT = ("int8", "uint8", "int16")


def _static_shape(tr, v) -> list[int] | None:
    sh = tr.shape_of(v)
    return [int(d) for d in sh] if all(_static(d) for d in sh) else None


def _row_call(tr, func: str, x2, args: list, shape: list[int], out_dt: str):
    """call_dps_packed(func, [x2, *args] -> [rows, last] out_dt), reshaped back to `shape`."""
    ints = [tr.relax.prim_value(int(a)) if isinstance(a, (int, np.integer)) else a for a in args]
    out_ty = tr.relax.TensorType([math.prod(shape[:-1]), shape[-1]], out_dt)
    y = tr.emit(tr.relax.call_dps_packed(func, [x2, *ints], out_ty))
    return tr.emit(tr.R.reshape(y, shape))


def softmax_table(tab: np.ndarray) -> np.ndarray | None:
    """int_softmax's exp table as the kernel takes it (int32, cut after its first zero when every
    later entry is 0 too: min(d, T - 1) then reads the same values), or None if an entry is
    negative or above int32."""
    t = np.asarray(tab).astype(np.int64).reshape(-1)
    if t.size == 0 or t.min() < 0 or t.max() >= 2**31:
        return None
    zeros = np.flatnonzero(t == 0)
    if zeros.size and not t[zeros[0]:].any():
        t = t[: zeros[0] + 1]
    return t.astype(np.int32)


def _softmax_sm90(tr, node, xv, mask, tab, dim, mult, shift, out_zp, qmin, qmax):
    """int_softmax along the last dim as one qc.cuda.int_softmax[_masked] call: a warp per row;
    e * mult and the row sum must stay below 2^53 (the kernel's exact division estimates in float64).
    Reads its input padded where the GEMM before it left it so, and writes its output zero-padded
    to a multiple of 16 where every user is a GEMM that takes it so (Translator.padded)."""
    from .cuda_kernels import SOFTMAX_FUNC, SOFTMAX_MASKED_FUNC
    shape = _static_shape(tr, xv)
    out_dt = _dt(I.int_dtype(qmin, qmax))
    if not shape or _norm_dim(dim, len(shape)) != len(shape) - 1 or tr.dtype_of(xv) not in _ROW_IN or \
            out_dt not in _ROW_OUT or not 0 <= shift <= 62:
        return None
    t = softmax_table(_np(tab))
    if t is None:
        return None
    ldx = shape[-1]
    n_ = tr.padded.get(node.args[0], ldx)
    rows = math.prod(shape[:-1])
    tmax = int(t.max())
    if abs(int(mult)) * tmax >= 2**53 or n_ * tmax >= 2**53:
        return None
    mv = tr.arg(mask) if mask is not None else None
    msh = _static_shape(tr, mv) if mask is not None else []
    if msh is None or len(msh) > len(shape):
        return None
    users = list(node.users)
    ldy = n_
    if n_ % 16 and out_dt == "int8" and users and all(u.target is I.int_matmul and u.args[0] is node and
                                                      u.args[2] is not node and u.args[1] == 0 and u.args[3] == 0
                                                      for u in users):
        ldy = _ceil16(n_)
        tr.padded[node] = n_  # every user is a GEMM that takes it padded (or unpads it)
    x2 = tr.emit(tr.R.reshape(xv, [rows, ldx]))
    out_shape = [*shape[:-1], ldy]
    consts = [int(mult), int(shift), int(out_zp), int(qmin), int(qmax)]
    if mask is None:
        return _row_call(tr, SOFTMAX_FUNC, x2, [tr.const(t, "int32"), n_, *consts], out_shape, out_dt)
    m8 = tr.cast(mv, "bool")  # one byte a value, as the kernel reads it
    msh = [1] * (len(shape) - len(msh)) + msh
    lead, xl = msh[:-1], shape[:-1]
    shape = [*xl, n_]  # the true shape, which the mask broadcasts to
    big = [i for i, d in enumerate(lead) if d != 1]
    if msh[-1] == n_ and all(lead[i] == xl[i] for i in big) and big == list(range(big[0], big[-1] + 1) if big else []):
        # the mask's non-1 leading dims are one contiguous block of x's: row r reads mask row (r / mdiv) % mmod
        mdiv, mmod = (math.prod(xl[big[-1] + 1:]), math.prod(lead)) if big else (1, 1)
        m2 = tr.emit(tr.R.reshape(m8, [mmod, n_]))
    else:
        m2 = tr.emit(tr.R.reshape(tr.emit(tr.R.broadcast_to(m8, shape)), [rows, n_]))
        mdiv, mmod = 1, rows
    return _row_call(tr, SOFTMAX_MASKED_FUNC, x2, [m2, tr.const(t, "int32"), n_, mdiv, mmod, *consts], out_shape,
                     out_dt)


def _lut_sm90(tr, n, xv, tab: torch.Tensor, offset: int):
    """int_lut as one qc.cuda.int_lut call, with the requant after it (n's only user, per tensor or
    per last-dim channel) in the same kernel. Returns (done, value of n)."""
    from . import cuda_kernels
    from .cuda_kernels import LUT_FUNC, LUT_REQUANT_FUNC, lut_hi_ok, row_func
    shape = _static_shape(tr, xv)
    tab_dt = _dt(tab.dtype)
    if not shape or tr.dtype_of(xv) not in _ROW_IN or tab_dt not in _ROW_OUT or tab.numel() == 0:
        return False, None
    t = tr.const(_np(tab).astype(np.int16).reshape(-1), "int16")  # int8 / uint8 / int16 values (_ROW_OUT)
    x2 = tr.emit(tr.R.reshape(xv, [math.prod(shape[:-1]), shape[-1]]))
    users = list(n.users)
    req = users[0] if len(users) == 1 and users[0].target is I.requant and users[0].args[0] is n else None
    got = requant_consts(tr, req, shape[-1], len(shape)) if req is not None else None
    if got is not None:
        in_zp, m, c, out_zp, qmin, qmax = got
        out_dt = _dt(I.int_dtype(qmin, qmax))
        if out_dt in _ROW_OUT:
            func = row_func(LUT_REQUANT_FUNC, cuda_kernels.LUT_HI and lut_hi_ok(int(in_zp), m, c, int(out_zp)))
            tr.env[req] = _row_call(tr, func, x2, [t, int(offset), int(in_zp), tr.const(m, "int64"),
                                                               tr.const(c, "int64"), int(out_zp), int(qmin), int(qmax)],
                                    shape, out_dt)
            return True, None
    return True, _row_call(tr, LUT_FUNC, x2, [t, int(offset)], shape, tab_dt)


def _layer_norm_sm90(tr, n):
    """int_layer_norm as one qc.cuda.int_layer_norm call (a warp per row), which also computes
    - the int_add before it, when the LayerNorm is that add's only reader (the residual add of a
      post-LN block: its sum is never stored), and
    - a per-channel int8 requant after it (the next linears' input) as a second output, beside
      the LayerNorm's own output that the residual path reads."""
    from .cuda_kernels import (ADD_LAYER_NORM_FUNC, ADD_MULT_BITS_HI, LAYER_NORM_FUNC, LAYER_NORM_REQUANT_FUNC,
                               ln_hi_ok, row_func, scale_shift_up)
    x, x_zp, eps, sqrt_bits, gamma, beta, shift, out_zp, qmin, qmax = n.args
    xv = tr.arg(x)
    shape = _static_shape(tr, xv)
    out_dt = _dt(I.int_dtype(qmin, qmax))
    if not shape or tr.dtype_of(xv) not in _ROW_IN or out_dt not in _ROW_OUT or \
            not (0 <= sqrt_bits <= 40 and 0 <= shift <= 62):
        return None
    ch, rows = shape[-1], math.prod(shape[:-1])
    g = _np(tr.tensor_const(gamma)).astype(np.int64).reshape(-1)
    b = _np(tr.tensor_const(beta)).astype(np.int64).reshape(-1)
    if g.size not in (1, ch) or b.size not in (1, ch):
        return None
    g, b = np.broadcast_to(g, (ch,)).copy(), np.broadcast_to(b, (ch,)).copy()
    add, av, bv = None, xv, xv
    if x.target is I.int_add:
        a_, a_zp, a_mult, b_, b_zp, b_mult, ash, azo, alo, ahi = x.args
        consts = [a_zp, a_mult, b_zp, b_mult, ash, azo, alo, ahi]
        if isinstance(a_, fx.Node) and isinstance(b_, fx.Node) and all(isinstance(c, int) for c in consts) and \
                0 <= ash <= 62:
            A, B = tr.arg(a_), tr.arg(b_)
            if _static_shape(tr, A) == shape == _static_shape(tr, B) and tr.dtype_of(A) == tr.dtype_of(B) in _ROW_IN:
                add, av, bv = consts, A, B
    rq = next((u for u in n.users
               if u.target is I.requant and u.args[0] is n and _ln_requant(tr, u, ch, len(shape))), None)
    keep_sum = add is not None and len(x.users) > 1  # a pre-LN residual: the sum is read again later
    if keep_sum and (rq is not None or tr.dtype_of(xv) != tr.dtype_of(av)):
        add, av, bv, keep_sum = None, xv, xv, False
    if rq is not None:
        m3, s3, rq_consts = _ln_requant(tr, rq, ch, len(shape))
    else:
        m3, s3, rq_consts = np.zeros(1, np.int64), np.zeros(1, np.int64), [0] * 4
    add = add if av is not xv else None
    rq_arrays = (m3, s3) if rq is not None else ()
    prm = layer_norm_params(add, [x_zp, eps, sqrt_bits, shift, out_zp, qmin, qmax], rq_consts)
    # the kernel in 32-bit words where every constant allows it, after scaling the add's and the
    # LayerNorm's shifts below 32 up to 32 (the same integers: see scale_shift_up)
    hi = ln_hi_ok(prm, g, ch, *rq_arrays)
    if not hi:
        up_add = scale_shift_up([add[1], add[3]], add[4], ADD_MULT_BITS_HI) if add else ([], None)
        up_g = scale_shift_up([g], int(shift), 31)
        up_b = scale_shift_up([b], int(shift), 62)
        if up_add is not None and up_g is not None and up_b is not None:
            add2 = [add[0], int(up_add[0][0]), add[2], int(up_add[0][1]), up_add[1], *add[5:]] if add else None
            prm2 = layer_norm_params(add2, [x_zp, eps, sqrt_bits, up_g[1], out_zp, qmin, qmax], rq_consts)
            if ln_hi_ok(prm2, up_g[0][0], ch, *rq_arrays):
                prm, g, b, hi = prm2, up_g[0][0], up_b[0][0], True
    args = [tr.emit(tr.R.reshape(v, [rows, ch])) for v in (av, bv)]
    args += [tr.const(prm, "int64"), tr.const(g, "int64"), tr.const(b, "int64"), tr.const(m3, "int64"),
             tr.const(s3, "int64")]
    y_ty = tr.relax.TensorType([rows, ch], out_dt)
    if keep_sum:  # x's other readers get the kernel's copy of the sum (the add's own kernel is then dead)
        both = tr.emit(tr.relax.call_dps_packed(row_func(ADD_LAYER_NORM_FUNC, hi), args,
                                                [tr.relax.TensorType([rows, ch], tr.dtype_of(xv)), y_ty]))
        tr.env[x] = tr.emit(tr.R.reshape(tr.emit(tr.relax.TupleGetItem(both, 0)), shape))
        return tr.emit(tr.R.reshape(tr.emit(tr.relax.TupleGetItem(both, 1)), shape))
    if rq is None:
        return tr.emit(tr.R.reshape(tr.emit(tr.relax.call_dps_packed(row_func(LAYER_NORM_FUNC, hi), args, y_ty)),
                                    shape))
    both = tr.emit(tr.relax.call_dps_packed(row_func(LAYER_NORM_REQUANT_FUNC, hi), args,
                                            [y_ty, tr.relax.TensorType([rows, ch], "int8")]))
    tr.env[rq] = tr.emit(tr.R.reshape(tr.emit(tr.relax.TupleGetItem(both, 1)), shape))
    return tr.emit(tr.R.reshape(tr.emit(tr.relax.TupleGetItem(both, 0)), shape))


def layer_norm_params(add: list | None, ln: list, rq: list) -> np.ndarray:
    """qc.cuda.int_layer_norm's int64 params (int_rows.cu's L_* layout): the int_add's [a_zp,
    a_mult, b_zp, b_mult, shift, out_zp, qmin, qmax] or None (no add), the LayerNorm's [x_zp, eps,
    sqrt_bits, shift, out_zp, qmin, qmax], the requant's [in_zp, out_zp, qmin, qmax]."""
    out = np.asarray([*(add or [0] * 8), *ln, *rq, int(add is not None)], np.int64)
    assert out.size == 20, out.size  # L_LEN
    return out


def requant_consts(tr, rq, channels: int, nd: int):
    """A requant's (in_zp, mult, shift, out_zp, qmin, qmax) as qcompiler's CUDA kernels compute it
    (the LUT's, the LayerNorm's and the attention kernel's requants): mult / shift int64 arrays of
    one entry (per tensor) or `channels` (per channel of the last of nd dims), |mult| and |in_zp|
    below 2^31, 0 <= shift <= 62; None otherwise. Callers add their output-range conditions."""
    _x, in_zp, mult, shift, out_zp, qmin, qmax, axis = rq.args
    m = _np(tr.tensor_const(mult)).astype(np.int64).reshape(-1)
    c = _np(tr.tensor_const(shift)).astype(np.int64).reshape(-1)
    if m.size == 0 or m.size != c.size or not (m.size == 1 or (m.size == channels and _norm_dim(axis, nd) == nd - 1)):
        return None
    if np.abs(m).max() >= 2**31 or c.min() < 0 or c.max() > 62 or abs(int(in_zp)) >= 2**31:
        return None
    return int(in_zp), m, c, int(out_zp), int(qmin), int(qmax)


def _ln_requant(tr, rq, ch: int, nd: int):
    """(mult [C], shift [C], [in_zp, out_zp, qmin, qmax]) of a LayerNorm's requant that the kernel
    computes as its second output (int8), else None."""
    got = requant_consts(tr, rq, ch, nd)
    if got is None or not (-128 <= got[4] <= got[5] <= 127):
        return None
    in_zp, m, c, out_zp, qmin, qmax = got
    return np.broadcast_to(m, (ch,)).copy(), np.broadcast_to(c, (ch,)).copy(), [in_zp, out_zp, qmin, qmax]


QC = {I.quantize: _quantize, I.dequantize: _dequantize, I.requant: _requant, I.int_linear: _int_linear,
      I.int_matmul: _int_matmul, I.int_conv: _int_conv, I.int_add: _int_add, I.int_lut: _int_lut,
      I.int_sum: _int_sum, I.int_mul: _int_mul, I.int_div: _int_div, I.int_l2_norm: _int_l2_norm,
      I.int_softmax: _int_softmax, I.int_layer_norm: _int_layer_norm}


# -- ATen shape ops and the few integer ATen ops an integer graph keeps ----------------------------

def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _shape_arg(tr, shape):
    return [tr.arg(s) if isinstance(s, fx.Node) else s for s in shape]


def _reshape(tr, n):
    x, shape = tr.arg(n.args[0]), _shape_arg(tr, n.args[1])
    if sum(1 for s in shape if isinstance(s, int) and s == -1) == 1 and any(not isinstance(s, int) for s in shape):
        # -1 beside symbolic dims: resolve it from the element count
        total = 1
        for s in tr.shape_of(x):
            total = total * s
        known = 1
        for s in shape:
            if not (isinstance(s, int) and s == -1):
                known = known * s
        shape = [total // known if isinstance(s, int) and s == -1 else s for s in shape]
    return tr.emit(tr.R.reshape(x, shape))


def _flatten(tr, n):
    x = tr.arg(n.args[0])
    shape = tr.shape_of(x)
    nd = len(shape)
    start = _norm_dim(n.args[1] if len(n.args) > 1 else 0, nd)
    end = _norm_dim(n.args[2] if len(n.args) > 2 else -1, nd)
    mid = 1
    for s in shape[start:end + 1]:
        mid = mid * s
    return tr.emit(tr.R.reshape(x, shape[:start] + [mid] + shape[end + 1:]))


def _transpose(tr, n):
    x = tr.arg(n.args[0])
    nd = tr.ndim(x)
    a, b = _norm_dim(n.args[1], nd), _norm_dim(n.args[2], nd)
    perm = list(range(nd))
    perm[a], perm[b] = perm[b], perm[a]
    return tr.emit(tr.R.permute_dims(x, perm))


def _permute(tr, n):
    x = tr.arg(n.args[0])
    return tr.emit(tr.R.permute_dims(x, [_norm_dim(d, tr.ndim(x)) for d in n.args[1]]))


def _unsqueeze(tr, n):
    x = tr.arg(n.args[0])
    return tr.emit(tr.R.expand_dims(x, [_norm_dim(n.args[1], tr.ndim(x) + 1)]))


def _squeeze(tr, n):
    x = tr.arg(n.args[0])
    dims = n.args[1] if len(n.args) > 1 else None
    if isinstance(dims, int):
        dims = [dims]
    return tr.emit(tr.R.squeeze(x, None if dims is None else [_norm_dim(d, tr.ndim(x)) for d in dims]))


def _expand(tr, n):
    x = tr.arg(n.args[0])
    shape = _shape_arg(tr, n.args[1])
    cur = tr.shape_of(x)
    lead = len(shape) - len(cur)
    shape = [cur[i - lead] if isinstance(s, int) and s == -1 else s for i, s in enumerate(shape)]
    return tr.emit(tr.R.broadcast_to(x, shape))


def _expand_as(tr, n):
    return tr.emit(tr.R.broadcast_to(tr.arg(n.args[0]), tr.shape_of(tr.arg(n.args[1]))))


def _cat(tr, n):
    parts = [tr.arg(p) for p in n.args[0]]
    dim = n.args[1] if len(n.args) > 1 else 0
    return tr.emit(tr.R.concat(parts, axis=_norm_dim(dim, tr.ndim(parts[0]))))


def _slice(tr, n):
    x = tr.arg(n.args[0])
    dim = _norm_dim(n.args[1] if len(n.args) > 1 else 0, tr.ndim(x))
    start = n.args[2] if len(n.args) > 2 and n.args[2] is not None else 0
    end = n.args[3] if len(n.args) > 3 and n.args[3] is not None else 2**62
    step = n.args[4] if len(n.args) > 4 else 1
    size = tr.shape_of(x)[dim]
    if isinstance(end, int) and end >= 2**62 and start == 0 and step == 1:
        return x  # the whole dim
    start, end = tr.arg(start), tr.arg(end)
    if isinstance(size, int) or hasattr(size, "value"):
        size = int(size)
        clip = lambda v: v if not isinstance(v, int) else max(0, min(size, v + size if v < 0 else v))  # noqa: E731
        start, end = clip(start), clip(end)
    # a symbolic bound (a sym_size of another input) cannot be proved in range: torch would
    # clip it, and the graph's shapes only agree when it is in range, so it is
    inbound = not (isinstance(start, int) and isinstance(end, int))
    return tr.emit(tr.R.strided_slice(x, axes=[dim], begin=[start], end=[end], strides=[step], assume_inbound=inbound))


def _select(tr, n):
    x = tr.arg(n.args[0])
    dim = _norm_dim(n.args[1], tr.ndim(x))
    idx = n.args[2]
    if idx < 0:
        idx = tr.shape_of(x)[dim] + idx
    s = tr.emit(tr.R.strided_slice(x, axes=[dim], begin=[idx], end=[idx + 1]))
    return tr.emit(tr.R.squeeze(s, [dim]))


def _unbind(tr, n):
    x = tr.arg(n.args[0])
    dim = _norm_dim(n.args[1] if len(n.args) > 1 else 0, tr.ndim(x))
    k = int(tr.shape_of(x)[dim])
    parts = tr.emit(tr.R.split(x, k, axis=dim))
    return tr.relax.Tuple([tr.emit(tr.R.squeeze(tr.emit(tr.relax.TupleGetItem(parts, i)), [dim])) for i in range(k)])


def _getitem(tr, n):
    seq, i = tr.arg(n.args[0]), n.args[1]
    if isinstance(seq, tr.relax.Tuple):
        return seq.fields[i]
    if isinstance(seq, (list, tuple)):
        return seq[i]
    return tr.emit(tr.relax.TupleGetItem(seq, i))


def _sym_size(tr, n):
    return tr.shape_of(tr.arg(n.args[0]))[n.args[1]]


def _embedding(tr, n):
    table, ids = n.args[0], n.args[1]
    tab = tr.tensor_const(table) if table.op == "get_attr" else None
    tv = tr.const(_np(tab), _dt(tab.dtype)) if tab is not None else tr.arg(table)
    return tr.emit(tr.R.take(tv, tr.arg(ids), axis=0))


def _scalar_like(tr, x, v):
    return tr.const(v, tr.dtype_of(x))


def _with_scalar(op: str, arg: int = 1):
    """x <op> scalar for an ATen op whose args[arg] is a python number (compared or clamped in x's dtype)."""
    def f(tr, n):
        x = tr.arg(n.args[0])
        return tr.emit(getattr(tr.R, op)(x, _scalar_like(tr, x, n.args[arg] if arg is not None else 0)))
    return f


def _clamp(tr, n):
    x = tr.arg(n.args[0])
    lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min")
    hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max")
    if lo is not None:
        x = tr.emit(tr.R.maximum(x, _scalar_like(tr, x, lo)))
    if hi is not None:
        x = tr.emit(tr.R.minimum(x, _scalar_like(tr, x, hi)))
    return x


def _max_pool2d(tr, n):
    x = tr.arg(n.args[0])
    k = n.args[1]
    stride = n.args[2] if len(n.args) > 2 and n.args[2] else k
    padding = n.args[3] if len(n.args) > 3 else 0
    dilation = n.args[4] if len(n.args) > 4 else 1
    ceil_mode = n.args[5] if len(n.args) > 5 else False
    return tr.emit(tr.R.nn.max_pool2d(x, pool_size=k, strides=stride, padding=padding, dilation=dilation,
                                      ceil_mode=ceil_mode))


def _identity(tr, n):
    return tr.arg(n.args[0])


def _to(tr, n):
    x = tr.arg(n.args[0])
    dtype = n.kwargs.get("dtype") or next((a for a in n.args[1:] if isinstance(a, torch.dtype)), None)
    return x if dtype is None else tr.cast(x, _dt(dtype))


def _skip(tr, n):
    return None


ATEN = {aten.view: _reshape, aten.reshape: _reshape, aten._unsafe_view: _reshape, aten.flatten: _flatten,
        aten.transpose: _transpose, aten.permute: _permute, aten.unsqueeze: _unsqueeze, aten.squeeze: _squeeze,
        aten.expand: _expand, aten.expand_as: _expand_as, aten.cat: _cat, aten.slice: _slice, aten.select: _select,
        aten.unbind: _unbind, operator.getitem: _getitem, aten.sym_size: _sym_size, aten.embedding: _embedding,
        aten.ne: _with_scalar("not_equal"), aten.eq: _with_scalar("equal"), aten.clamp: _clamp,
        aten.clamp_min: _with_scalar("maximum"), aten.clamp_max: _with_scalar("minimum"),
        aten.relu: _with_scalar("maximum", None),
        aten.max_pool2d: _max_pool2d, aten.contiguous: _identity, aten.clone: _identity, aten.alias: _identity,
        aten.detach: _identity, aten.dropout: _identity, aten._to_copy: _to, aten.to: _to,
        aten._assert_tensor_metadata: _skip}


def to_relax(graph: Graph, dot: str | None = None, kind: str | None = None):
    """The Relax IRModule ("main": inputs in graph order -> tuple of outputs) of an integer graph;
    dot="vnni" / "avx2": int8 linears and matmuls on backends/tvm/vnni.py's AVX-512 VNNI or AVX2
    kernel; "amx": VNNI, with the linears that fit on amx.py's AMX kernel;
    dot="sm90": on the CUTLASS kernels of cuda_kernels.py; kind="llvm": the softmax as one row
    kernel (rows_cpu.py)."""
    return Translator(graph, dot, kind).build()
