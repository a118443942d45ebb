"""tvm-cuda: an attention block of the integer graph as one call of qcompiler's fused attention
kernel (kernels/int_attention.cu).

The pattern, as lower_integer leaves it (MiniLM / BERT / DeiT):

    s  = requant(int_matmul(q, 0, k^T, 0))        per tensor, any integer range up to int32
    p  = int_softmax(s, mask, ...)                along the keys, int8 out
    o  = requant(int_matmul(p, 0, v, 0))          per tensor
    e  = views of o (the heads merged back: transpose, reshape)
    [y = requant(e)]                              per tensor or per channel of e's last dim

where q, k, v are views (reshape, transpose, permute, unbind, ...) of int8 tensors the linears
wrote. The views are not copied: each is resolved to an affine map from the attention's
(batch, head, row, d) index into its source buffer, by replaying the view ops of the graph on
an index tensor, and the kernel reads the sources through those maps. The output is written
the same way into e's (or y's) layout. Every intermediate stays in registers; the transposes,
the requants and the softmax kernel of the op-by-op translation disappear.

`fuse(tr, node)` is tried at the first int_matmul of the block; it returns None (and the ops are
translated one by one) wherever a precondition of the kernel fails.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from qcompiler import int_ops as I

aten = torch.ops.aten

# view ops that only re-index their first argument (replayed on index tensors)
_VIEWS = {aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute, aten.unsqueeze, aten.squeeze,
          aten.select, aten.unbind, aten.slice, aten.t, aten.contiguous, aten.clone, aten.alias, aten.flatten}
_INT32 = (-2**31, 2**31 - 1)


def _is_view(n) -> bool:
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return False
    if n.target is operator.getitem:
        return True
    return getattr(n.target, "overloadpacket", None) in _VIEWS and \
        not any(isinstance(a, fx.Node) for a in [*n.args[1:], *n.kwargs.values()])


def _source(node: fx.Node):
    """(the first non-view ancestor along first arguments, the view nodes from it to `node`)."""
    chain = []
    while _is_view(node):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _replay(chain: list, ix):
    """The views of `chain` applied to the index tensor ix."""
    for n in chain:
        if n.target is operator.getitem:
            ix = ix[n.args[1]]
        else:
            ix = n.target(ix, *n.args[1:], **n.kwargs)
    return ix


def _index(shape) -> torch.Tensor:
    return torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)


def _affine(ix: torch.Tensor) -> tuple[int, list[int]] | None:
    """(offset, strides) with ix[i] == offset + sum_k i_k strides_k for every index i, or None."""
    if ix.numel() == 0:
        return None
    flat = ix.reshape(-1)
    off = int(flat[0])
    strides, grid = [], torch.full(ix.shape, off, dtype=torch.int64)
    for k, size in enumerate(ix.shape):
        at = [0] * ix.dim()
        if size > 1:
            at[k] = 1
        st = int(ix[tuple(at)]) - off if size > 1 else 0
        strides.append(st)
        along = torch.arange(size, dtype=torch.int64).reshape([size if j == k else 1 for j in range(ix.dim())])
        grid = grid + along * st
    return (off, strides) if torch.equal(grid, ix) else None


def _only_user(n: fx.Node, target=None):
    users = list(n.users)
    if len(users) != 1 or (target is not None and users[0].target is not target) or users[0].args[0] is not n:
        return None
    return users[0]


def _int_consts(tr, node, channels: int = 1, nd: int = 1):
    """translate.requant_consts of a requant whose output range is within int32 (the kernel keeps
    scores in int32), as a list; one multiplier / shift (plain ints) where channels is 1."""
    from .translate import requant_consts
    got = requant_consts(tr, node, channels, nd)
    if got is None or not _INT32[0] <= got[4] <= got[5] <= _INT32[1]:
        return None
    in_zp, m, c, out_zp, qmin, qmax = got
    if channels == 1:
        return [in_zp, int(m[0]), int(c[0]), out_zp, qmin, qmax]
    return [in_zp, m, c, out_zp, qmin, qmax]


def _ancestors_clear(start: list, stop: fx.Node) -> bool:
    """Whether no node in `start` depends on `stop`."""
    seen, todo = set(), [n for n in start if isinstance(n, fx.Node)]
    while todo:
        n = todo.pop()
        if n is stop:
            return False
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return True


def _ensure(tr, n: fx.Node):
    """n's value (a Relax value, or Columns of one), translating it (and what it needs) now if the
    walk has not reached it."""
    from .translate import Columns
    if n not in tr.env and n.op == "call_function":
        for a in n.all_input_nodes:
            _ensure(tr, a)
        if n not in tr.env:  # an op translated above may have bound n (a fused requant)
            tr.env[n] = tr.node(n)
    v = tr.env.get(n)
    return v if isinstance(v, Columns) else tr.arg(n)


def _base(tr, v):
    """(the Relax value a kernel reads, index tensor of v's entries in it) for a value or Columns."""
    from .translate import Columns, _static_shape
    if isinstance(v, Columns):
        shape = _static_shape(tr, v.value)
        return v.value, (None if shape is None else _index(tuple(shape))[..., v.start:v.start + v.width])
    shape = _static_shape(tr, v)
    return v, (None if shape is None else _index(tuple(shape)))


def _view4(ix: torch.Tensor, lead: list, swap: bool):
    """[offset, batch, head, row] strides of a q / k / v operand whose entries are the source
    offsets ix (k: swap, as the operand is k^T): element (batch, head, row, d) at source[offset +
    ...] with unit stride along d; None unless the map is affine with 16-byte aligned offset and
    strides."""
    if swap:
        ix = ix.transpose(-1, -2)
    fit = _affine(ix.reshape(_lead4(lead) + list(ix.shape[-2:])))
    if fit is None:
        return None
    off, (sb, sh, ss, sd) = fit
    if sd != 1 or any(v % 16 for v in (off, sb, sh, ss)):
        return None
    return [off, sb, sh, ss]


def _lead4(lead: list) -> list:
    """The leading dims of the attention as (batch, heads)."""
    return [1, 1] if not lead else ([1, lead[0]] if len(lead) == 1 else list(lead))


def params(q: list, k: list, v: list, y: list, mask: list, r1: list, softmax: list, r2: list,
           r3: list | None, factors: tuple = (0, 0)) -> np.ndarray:
    """The kernel's int64 params (int_attention.cu's P_* layout): the views of q, k, v and y as
    [offset, batch, head, row] strides (unit stride along d), the mask's [batch, head, row, key]
    strides, requant1 and requant2 as [in_zp, mult, shift, out_zp, qmin, qmax], the softmax's
    [mult, shift, out_zp, qmin, qmax], requant3 as [in_zp, mult(s), shift(s), out_zp, qmin, qmax]
    or None (its multipliers and shifts go to the kernel as tensors of 1 or heads * d entries), and
    attention_hi's (k, e0) of exp_factors: its rounding margin 2^-k (0: every entry is rint(p)) and the
    table's entry at d = 0."""
    r3_row = [0] * 6 if r3 is None else [1, int(np.asarray(r3[1]).size != 1), r3[0], r3[3], r3[4], r3[5]]
    out = np.asarray([*q, *k, *v, *y, *mask, *r1, *softmax, *r2, *r3_row, *factors], np.int64)
    assert out.size == 45, out.size  # int_attention.cu: P_LEN
    return out


FACTORS = 256  # attention_hi: e(d) from two float64 factor tables of this many entries, d = 256 a + b


def exp_factors(tab: np.ndarray) -> tuple[np.ndarray, int, int] | None:
    """The softmax table as attention_hi computes it, from shared memory instead of a gather from
    the table in device memory: (factors float64 [2 * FACTORS], k, e at d = 0), with

        p = factors[d >> 8] * factors[FACTORS + (d & 255)]         (one float64 product)
        e(d) = rint(p)                                              where k = 0, else
        e(d) = rint(p)   where |p - rint(p)| <= 1/2 - 2^-k,   else table[d] (a gather)

    for d in [0, T), which this function checks entry by entry with the same float64 arithmetic
    (numpy's IEEE products and sums are the device's __dmul_rn / __dadd_rn): the kernel's values
    are the table's by construction. The factors are 2^EXP_BITS exp(-256 a s) and exp(-b s) for
    the scale s that int_ops.exp_table's rounding allows (the midpoint of the interval every entry
    leaves); k is 0 where rint(p) is every entry (no check on the device), else the largest of
    40 .. 8 that the check passes (the fewest gathers). None where the table is not an exp_table of
    T <= 2^16 entries with e(0) = 2^16 and the others below 0xFFFF (the kernel sums a row's e in
    int32 and keeps each e in 16 bits, e(0) as 0xFFFF), or no k passes."""
    t = np.asarray(tab, np.int64).reshape(-1)
    n, one = t.size, 2 ** I.EXP_BITS
    if not 2 <= n <= FACTORS * FACTORS or t[0] != one or int(t[1:].max()) >= 0xFFFF or int(t.min()) < 0:
        return None
    j = np.arange(1, n, dtype=np.float64)
    e = t[1:].astype(np.float64)
    with np.errstate(divide="ignore"):
        lo = np.log(one / (e + 0.5)) / j                                        # 2^16 exp(-j s) < e + 1/2
        hi = np.where(e > 0, np.log(one / np.maximum(e - 0.5, 1e-300)) / j, np.inf)  # >= e - 1/2
    top = float(hi.min()) if np.isfinite(hi.min()) else 2 * float(lo.max())  # only zeros past d = 0: any s above
    s = 0.5 * (float(lo.max()) + top)
    if not (np.isfinite(s) and s > 0):
        return None
    a = np.arange(FACTORS, dtype=np.float64)
    fac = np.concatenate([one * np.exp(-FACTORS * a * s), np.exp(-a * s)])
    d = np.arange(n)
    p = fac[d >> 8] * fac[FACTORS + (d & (FACTORS - 1))]
    two52 = 2.0**52
    r = (p + two52) - two52
    if np.array_equal(r.astype(np.int64), t):
        return fac, 0, int(t[0])
    off = np.abs(p - r)
    for k in range(40, 7, -1):
        near = 0.5 - 2.0**-k
        if np.array_equal(r[off <= near].astype(np.int64), t[off <= near]):
            return fac, k, int(t[0])
    return None


MULT_BITS_HI = 39  # attention_hi's requant1 / requant2: |acc| < 2^23 (sk <= 256) times |m| < 2^39


def hi_params(prm: np.ndarray) -> np.ndarray:
    """prm with requant1's and requant2's shifts below 32 scaled up to 32, their multipliers times
    the same power of two (the same integers: cuda_kernels.scale_shift_up), where they stay within
    2^MULT_BITS_HI; else unchanged."""
    from .cuda_kernels import scale_shift_up
    out = np.asarray(prm, np.int64).copy()
    for at in (20, 31):  # P_R1, P_R2: in_zp, mult, shift, ...
        up = scale_shift_up([out[at + 1:at + 2]], int(out[at + 2]), MULT_BITS_HI)
        if up is not None:
            out[at + 1], out[at + 2] = int(up[0][0][0]), up[1]
    return out


def hi_ok(prm: np.ndarray, mult3: np.ndarray, shift3: np.ndarray) -> bool:
    """Whether the block may take int_attention.cu's attention_hi (params in the P_* layout):
    requant1 and requant2 with in_zp 0, multipliers within 2^39 and shifts 32..62 (hi_params),
    requant1's output within int16 (the scores kept as int16 pairs), the softmax's multiplier M > 0
    with M / 2^c <= 2^20 (its division as one float64 FMA: see the kernel), requant3's (if any)
    shifts 32..62, multipliers within int32 and zero points within 2^16."""
    from .cuda_kernels import HI_SHIFTS, ZP_HI
    p = [int(v) for v in prm]
    r1, (smult, sshift), r2, r3 = p[20:26], p[26:28], p[31:37], p[37:43]
    shifts_ok = lambda c: all(HI_SHIFTS[0] <= int(x) <= HI_SHIFTS[1] for x in np.asarray(c).reshape(-1))  # noqa
    for zi, m, c, zo, _lo, _hi in (r1, r2):
        if zi != 0 or abs(m) >= 2**MULT_BITS_HI or not shifts_ok(c) or abs(zo) > ZP_HI:
            return False
    if not (-2**15 <= r1[4] <= r1[5] < 2**15) or not (0 < smult <= 2**(sshift + 20)):
        return False
    if r3[0]:
        m3 = np.abs(np.asarray(mult3, np.int64))
        if not shifts_ok(shift3) or int(m3.max()) >= 2**31 or abs(r3[2]) > ZP_HI or abs(r3[3]) > ZP_HI:
            return False
    return True


@dataclass
class Plan:
    """One attention block as the kernel computes it: read q, k, v from the Relax values
    `sources` (and the mask from `mask`), write `out` (the last node it computes, of shape
    out_shape); `inside` are the nodes it computes on the way."""
    sources: list
    mask: object
    table: np.ndarray
    params: np.ndarray
    mult3: np.ndarray
    shift3: np.ndarray
    sizes: list  # batch, heads, query rows, keys, d
    out: fx.Node
    out_shape: list
    out_dtype: str
    inside: list


def match(tr, m1: fx.Node) -> Plan | None:
    """The attention block that starts at int_matmul m1, or None where it does not have the
    kernel's form (then its ops are translated one by one)."""
    from .translate import _dt, _norm_dim, softmax_table

    a, a_zp, b, b_zp = m1.args
    r1 = _only_user(m1, I.requant)
    sm = _only_user(r1, I.int_softmax) if r1 is not None else None
    m2 = _only_user(sm, I.int_matmul) if sm is not None else None
    r2 = _only_user(m2, I.requant) if m2 is not None else None
    if r2 is None or a_zp != 0 or b_zp != 0 or m2.args[1] != 0 or m2.args[3] != 0 or sm.args[1] is r1:
        return None
    _x, mask, table, dim, smult, sshift, szp, sqmin, sqmax = sm.args
    # -- q, k, v: views of int8 sources, which (and the mask) must not depend on the block
    chains = [_source(a), _source(b), _source(m2.args[2])]
    needed = [src for src, _ in chains] + ([mask] if mask is not None else [])
    if any(src.op not in ("call_function", "placeholder") or src in tr.padded for src, _ in chains) or \
            not _ancestors_clear(needed, m1):
        return None
    based = [_base(tr, _ensure(tr, n)) for n in needed]  # translated now where the walk has not reached them
    vals = [v for v, _ix in based]
    if any(ix is None for _v, ix in based) or any(tr.dtype_of(v) != "int8" for v in vals[:3]):
        return None
    ix_q, ix_k, ix_v = (_replay(chain, ix) for (_src, chain), (_v, ix) in zip(chains, based))
    lead = list(ix_q.shape[:-2])
    if len(lead) > 2 or list(ix_k.shape[:-2]) != lead or list(ix_v.shape[:-2]) != lead or \
            ix_q.shape[-1] != ix_k.shape[-2] or ix_v.shape[-2] != ix_k.shape[-1] or ix_v.shape[-1] != ix_q.shape[-1]:
        return None
    sq, sk, d = ix_q.shape[-2], ix_k.shape[-1], ix_q.shape[-1]
    s_shape, o_shape = [*lead, sq, sk], [*lead, sq, d]
    if not 1 <= sk <= 256 or d not in (32, 64) or sq < 1:
        return None
    # -- the softmax: int8 out, the table and division exact as the kernel computes them
    tab = softmax_table(np.asarray(tr.tensor_const(table)))
    if tab is None or _norm_dim(dim, len(s_shape)) != len(s_shape) - 1 or not (-128 <= sqmin <= sqmax <= 127) or \
            not 0 <= sshift <= 62:
        return None
    tmax = int(tab.max())
    if abs(int(smult)) * tmax >= 2**53 or sk * tmax >= 2**53:
        return None
    c1, c2 = _int_consts(tr, r1), _int_consts(tr, r2)
    if c1 is None or c2 is None:
        return None
    vq, vk, vv = _view4(ix_q, lead, False), _view4(ix_k, lead, True), _view4(ix_v, lead, False)
    if vq is None or vk is None or vv is None:
        return None
    # -- the output: o's views up to e, then e's requant (if any) in the kernel too
    end, views = r2, []
    while True:
        nxt = _only_user(end)
        if nxt is None or not _is_view(nxt):
            break
        views.append(nxt)
        end = nxt
    pos_of = _replay(views, _index(tuple(o_shape)))
    e_shape = list(pos_of.shape)
    pos_of = pos_of.reshape(-1)
    if pos_of.numel() != math.prod(o_shape) or not torch.bincount(pos_of, minlength=pos_of.numel()).eq(1).all():
        return None  # not a permutation of o's entries
    pos = torch.empty_like(pos_of)
    pos[pos_of] = torch.arange(pos_of.numel())
    pos = pos.reshape(_lead4(lead) + [sq, d])
    fit = _affine(pos)
    if fit is None or fit[1][3] != 1:
        return None
    out_node, c3 = end, None
    r3 = _only_user(end, I.requant)
    if r3 is not None:
        channels = e_shape[-1] if e_shape else 1
        c3 = _int_consts(tr, r3, channels, max(len(e_shape), 1))
        if c3 is not None and channels == 1:
            c3 = [c3[0], np.asarray([c3[1]]), np.asarray([c3[2]]), *c3[3:]]
        if c3 is not None and c3[1].size != 1:
            h_idx = torch.arange(_lead4(lead)[1]).reshape(1, -1, 1, 1)
            d_idx = torch.arange(d).reshape(1, 1, 1, d)
            if not torch.equal((pos % channels), (h_idx * d + d_idx).expand_as(pos)):
                c3 = None  # e's channel is not head * d + d
        if c3 is not None:
            out_node = r3
    out_dt = _dt(I.int_dtype(*out_node.args[5:7]))
    if out_dt not in ("int8", "int16"):
        return None
    mstr = [0, 0, 0, 0]
    if mask is not None:
        ms = list(based[3][1].shape)
        if len(ms) > len(s_shape):
            return None
        ms = [1] * (len(s_shape) - len(ms)) + ms
        if any(m not in (1, s) for m, s in zip(ms, s_shape)):
            return None
        st = [math.prod(ms[i + 1:]) if ms[i] != 1 else 0 for i in range(len(ms))]
        lead_st = st[:-2]
        mstr = ([0, 0] if not lead_st else ([0, lead_st[0]] if len(lead_st) == 1 else lead_st)) + st[-2:]
    r3c = c3 if out_node is not end else None
    prm = params(vq, vk, vv, [fit[0], *fit[1][:3]], mstr, c1, [smult, sshift, szp, sqmin, sqmax], c2, r3c)
    m3, s3 = (np.asarray(r3c[i] if r3c is not None else 0, np.int64).reshape(-1) for i in (1, 2))
    return Plan(vals[:3], vals[3] if mask is not None else None, tab, prm, m3, s3, [*_lead4(lead), sq, sk, d],
                out_node, e_shape, out_dt, [r1, sm, m2, r2, *views])


def fuse(tr, m1: fx.Node):
    """Translate the attention block that starts at int_matmul m1 as one kernel call: the Fused
    value of m1, or None (nothing emitted) where match() declines."""
    from . import cuda_kernels
    from .cuda_kernels import attention_func
    plan = match(tr, m1)
    if plan is None:
        return None
    # attention_hi where its constants allow, with e(d) from factor tables (exp_factors)
    fac = exp_factors(plan.table)
    prm = hi_params(plan.params)
    hi = cuda_kernels.ATTENTION_HI and fac is not None and hi_ok(prm, plan.mult3, plan.shift3)
    if hi:
        prm[-2:] = fac[1:]
    else:
        prm = plan.params
    args = list(plan.sources) + ([tr.cast(plan.mask, "bool")] if plan.mask is not None else [])
    args += [tr.const(plan.table, "int32")] + ([tr.const(fac[0], "float64")] if hi else [])
    args += [tr.const(prm, "int64"), tr.const(plan.mult3, "int64"), tr.const(plan.shift3, "int64")]
    args += [tr.relax.prim_value(int(v)) for v in plan.sizes]
    out_ty = tr.relax.TensorType(plan.out_shape, plan.out_dtype)
    func = attention_func(plan.mask is not None, hi)
    tr.env[plan.out] = tr.emit(tr.relax.call_dps_packed(func, args, out_ty))
    # what the kernel computed has no value of its own (the views of q / k / v that only the
    # block read become dead bindings, which the pipeline's dead-code elimination drops)
    from .translate import Fused
    done = Fused(m1.name)
    for n in plan.inside:
        tr.env[n] = done
    return done
