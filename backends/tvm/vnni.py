"""The int8 GEMM kernel for AVX-512 VNNI, written directly in TIR:
C[b, r, j] = sum_k u[b, r, k] w[b, k, j] with u uint8 and w int8 packed as [B, ceil(N/16),
ceil(K/4), 16, 4] (zeros past the edges), one vpdpbusd per 16 columns x 4 k. Linears pass
their weights packed, as a constant; attention's activation x activation matmuls pass the
right operand as it is, and the kernel packs each column panel before using it. With an
epilogue the kernel also requantizes (Requant) the int32 tile in registers and writes the
requant's dtype.

Written by hand because TVM 0.27.0.post1's `tensorize` segfaults (with its own VNNI
intrinsic, on the canonical packed-layout example). vpdpbusd adds the four u8 x s8 products
to the int32 lane without saturation, so the result is the exact integer dot product.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

ROWS, COLS = 4, 4  # the register tile: ROWS rows x COLS 16-column blocks (16 zmm accumulators)


def _llvm_major() -> int:
    import tvm
    return int(tvm.target.codegen.llvm_version_major())


@dataclass(frozen=True)
class Requant:
    """The requant computed on each int32 tile before it is stored:
    y = clamp(rshift_round((acc - colsum_mult * sum_k w[k, j] + e[0, j]) * e[1, j], e[2, j]) + out_zp)
    with e the kernel's int64 [4, n or 1] argument (offset, multiplier, shift, rounding
    2^(shift-1) or 0), per column or, with one column, for all; colsum_mult != 0 only for
    unpacked w (the kernel sums each packed panel's columns with the same instruction)."""
    out_dtype: str
    out_zp: int
    qmin: int
    qmax: int
    per_channel: bool
    colsum_mult: int = 0


def kernel(k: int | None, n: int | None, packed: bool = True, ep: Requant | None = None):
    """The PrimFunc for reduction length k (static and k % 4 == 0, or None: symbolic, u's last
    word read byte by byte) and n outputs (static, or None: a last partial column block),
    batch and rows symbolic. packed: w is given packed, [B, ceil(n/16), ceil(k/4), 64];
    else w is [B, k, n] and each (batch, panel) packs its own columns first. ep: the requant
    of the epilogue (arguments u, w, e, c), else c is the int32 product (u, w, c).

    (batch, column panel of COLS x 16) pairs run in parallel; within a panel (its packed
    weights, k x 16 x COLS bytes, stay in L1/L2) row blocks of ROWS rows accumulate
    ROWS x COLS x 16 int32 in registers: per 4 k-steps, ROWS broadcasts and COLS weight loads
    feed ROWS x COLS vpdpbusd. A last partial row block re-reads (and rewrites, with the same
    values) row m - 1 in place of rows >= m; columns past n are not stored."""
    import tvm
    if n is not None and n % 16 == 0:
        cols = next(c for c in (COLS, 3, 2, 1) if (n // 16) % c == 0)
        rows = ROWS
    else:
        cols, rows = 1, 2 * ROWS
    nb = "nb" if n is None else str(-(-n // 16))
    kb = "kb" if k is None else str(k // 4)
    kk, nn = ("k" if k is None else k), ("n" if n is None else n)
    syms = [v for v, d in (("n", n), ("k", k)) if d is None] + [v for v, d in (("nb", n), ("kb", k)) if d is None and packed]
    decl = "".join(f"    {v} = T.int64()\n" for v in syms)
    # LLVM >= 20 declares vpdpbusd's multiplicands as <64 x i8>, older releases as <16 x i32>
    bty = "int8x64" if _llvm_major() >= 20 else "int32x16"
    dot = lambda acc, a, w: (f'T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", {acc}, '
                             f'T.reinterpret("{bty}", {a}), ' + (w if bty == "int8x64" else f'T.reinterpret("int32x16", {w})') + ")")
    colsum = ep is not None and ep.colsum_mult != 0
    if packed:
        wdecl = f'    wp = T.match_buffer(var_w, (bt, {nb}, {kb}, 64), "int8")\n'
        wsrc = f"wp[b, jq * {cols} + t, ko, T.ramp(0, 1, 64)]"
        prologue = ""
    else:
        kb = "((k + 3) // 4)" if k is None else kb
        nb = "((n + 15) // 16)" if n is None else nb
        wdecl = f'    w = T.match_buffer(var_w, (bt, {kk}, {nn}), "int8")\n'
        wsrc = "wl[t, ko, T.ramp(0, 1, 64)]"
        idx = ", ".join(str((e % 4) * 16 + e // 4) for e in range(64))
        rows4 = ", ".join(f"w[b, kq * 4 + {r}, T.ramp(jb * 16, 1, 16)]" for r in range(4))
        ones = "T.broadcast(T.int32(16843009), 16)"  # the bytes 1, 1, 1, 1: vpdpbusd sums 4 rows of w
        sums = (f"\n                cs[t, T.ramp(0, 1, 16)] = {dot('cs[t, T.ramp(0, 1, 16)]', ones, 'wl[t, kq, T.ramp(0, 1, 64)]')}"
                if colsum else "")
        prologue = f"""
        wl = T.alloc_buffer(({cols}, {kb}, 64), "int8")
        cs = T.alloc_buffer(({cols}, 16), "int32", scope="global")
        for t in range({cols}):
            cs[t, T.ramp(0, 1, 16)] = T.broadcast(T.int32(0), 16)
            for kq in range({kb}):
                if kq * 4 + 4 <= {kk} and jb * 16 + 16 <= {nn}:
                    wl[t, kq, T.ramp(0, 1, 64)] = T.Shuffle([{rows4}], [{idx}])
                else:
                    for q in range(64):
                        wl[t, kq, q] = T.if_then_else(kq * 4 + q % 4 < {kk} and jb * 16 + q // 4 < {nn},
                                                      w[b, T.min(kq * 4 + q % 4, {kk} - 1), T.min(jb * 16 + q // 4, {nn} - 1)],
                                                      T.int8(0)){sums}"""
    col0 = f"(jq * {cols} + t) * 16"
    row = f"T.min(rb * {rows} + i, m - 1)"
    out_dt = "int32" if ep is None else ep.out_dtype
    val = "acc[i, t, T.ramp(0, 1, 16)]"
    edecl = ""
    if ep is not None:
        edecl = f'    e = T.match_buffer(var_e, (4, {nn if ep.per_channel else 1}), "int64")\n'
        sub = f' - T.Cast("int64x16", cs[t, T.ramp(0, 1, 16)]) * T.broadcast(T.int64({ep.colsum_mult}), 16)' if colsum else ""
        eps = f"yv[T.ramp(0, 1, 16)] = {requant16(ep, val, col0, sub)}\n{' ' * 20}"
        val = "yv[T.ramp(0, 1, 16)]"
    else:
        edecl, eps = "", ""
    lane = "acc[i, t, l]" if ep is None else "yv[l]"
    if n is not None and n % 16 == 0:
        store = f"{eps}c[b, {row}, T.ramp({col0}, 1, 16)] = {val}"
    else:
        store = (f"{eps}if {col0} + 16 <= {nn}:\n"
                 f"{' ' * 24}c[b, {row}, T.ramp({col0}, 1, 16)] = {val}\n"
                 f"{' ' * 20}else:\n"
                 f"{' ' * 24}for l in range(16):\n"
                 f"{' ' * 28}if {col0} + l < {nn}:\n"
                 f"{' ' * 32}c[b, {row}, {col0} + l] = {lane}")
    word = f'T.reinterpret("int32", u[b, {row}, T.ramp(ko * 4, 1, 4)])'
    if k is None:  # the last word of a row whose length is not a multiple of 4: bytes past k are 0
        tail = " | ".join(f'(T.Cast("int32", T.if_then_else(ko * 4 + {e} < k, u[b, {row}, T.min(ko * 4 + {e}, k - 1)], '
                          f"T.uint8(0))) << {8 * e})" for e in range(4))
        word = f"T.if_then_else(ko * 4 + 4 <= k, {word}, {tail})"
    scratch = "" if ep is None else f"""
            yv = T.alloc_buffer((16,), "{out_dt}", scope="global")"""
    src = f"""

@T.prim_func
def qc_vnni_dot(var_u: T.handle, var_w: T.handle, {'var_e: T.handle, ' if ep else ''}var_c: T.handle):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    bt = T.int64()
    m = T.int64()
{decl}{wdecl}{edecl}    u = T.match_buffer(var_u, (bt, m, {kk}), "uint8")
    c = T.match_buffer(var_c, (bt, m, {nn}), "{out_dt}")
    for bj in T.parallel(bt * ({nb} // {cols})):
{prologue}
        for rb in range((m + {rows - 1}) // {rows}):
            acc = T.alloc_buffer(({rows}, {cols}, 16), "int32", scope="global"){scratch}
            for i in T.unroll({rows}):
                for t in T.unroll({cols}):
                    acc[i, t, T.ramp(0, 1, 16)] = T.broadcast(T.int32(0), 16)
            for ko in range({kb}):
                for i in T.unroll({rows}):
                    a = {word}
                    for t in T.unroll({cols}):
                        acc[i, t, T.ramp(0, 1, 16)] = {dot('acc[i, t, T.ramp(0, 1, 16)]', 'T.broadcast(a, 16)', wsrc)}
            for i in T.unroll({rows}):
                for t in T.unroll({cols}):
                    {store}
"""
    # no named scalars: TVM 0.27 lowers a scalar assigned inside a loop to a workspace allocation
    for name, expr in (("jb", f"(jq * {cols} + t)"), ("b", f"(bj // ({nb} // {cols}))"), ("jq", f"(bj % ({nb} // {cols}))")):
        src = re.sub(rf"\b{name}\b", expr, src)
    return tvm.script.from_source(src)


def requant16(ep: Requant, acc: str, col0: str, sub: str = "") -> str:
    """The TVMScript expression of Requant `ep` on 16 int32 lanes `acc` (columns col0 ...),
    minus `sub` (an int64x16 expression, or ""), reading the kernel's argument e."""
    ev = (lambda r: f"e[{r}, T.ramp({col0}, 1, 16)]") if ep.per_channel else (lambda r: f"T.broadcast(e[{r}, 0], 16)")
    c64 = lambda v: f"T.broadcast(T.int64({v}), 16)"
    p = f'((T.Cast("int64x16", {acc}) + {ev(0)}{sub}) * {ev(1)})'
    # rshift_round: (p + 2^(c-1) - [p < 0]) >> c for c > 0, p for c = 0 (e[3] is 2^(c-1) or 0)
    r = (f'T.shift_right({p} + {ev(3)} - T.Cast("int64x16", {p} < {c64(0)}) * T.Cast("int64x16", {ev(2)} > {c64(0)}), '
         f"{ev(2)})")
    return f'T.Cast("{ep.out_dtype}x16", T.max(T.min({r} + {c64(ep.out_zp)}, {c64(ep.qmax)}), {c64(ep.qmin)}))'


def epilogue_table(offset: np.ndarray, mult: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Requant's e argument: rows offset, multiplier, shift and rounding term 2^(shift-1) (0 where
    shift is 0), int64, broadcast to one length."""
    off, m, c = np.broadcast_arrays(*(np.asarray(v, np.int64).reshape(-1) for v in (offset, mult, shift)))
    rnd = np.where(c > 0, np.left_shift(np.int64(1), np.maximum(c - 1, 0)), 0)
    return np.stack([off, m, c, rnd]).astype(np.int64)
