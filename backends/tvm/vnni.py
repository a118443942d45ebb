"""The int8 GEMM kernel of x86 CPUs, written directly in TIR, for AVX-512 VNNI and for AVX2:
C[b, r, j] = sum_k u[b, r, k] w[b, k, j] with u the activation (VNNI: x + 128 as uint8; AVX2:
x - x_zp as int16) and w int8 packed as [B, ceil(N/L), ceil(K/4), 4L] (zeros past the edges)
for L = 16 (VNNI) or 8 (AVX2) int32 lanes a vector. Linears
pass their weights packed (`pack`), as a constant; attention's activation x activation matmuls
pass the right operand as it is, and the kernel packs each column panel before using it. With an
epilogue the kernel also requantizes (Requant) the int32 tile in registers and writes the
requant's dtype.

- VNNI: one vpdpbusd per L columns x 4 k, which adds the four u8 x s8 products to the int32 lane
  without saturation. A block's bytes are column-major: column c's 4 k at 4c.
- AVX2 has no such instruction, and vpmaddubsw (u8 x s8 pairs into int16) saturates: 255 x 127
  x 2 > 32767, the reason ONNX Runtime suggests 7-bit weights (reduce_range) on such CPUs. So
  each block of 8 columns x 4 k is sign-extended to int16 (vpmovsxbw; its bytes are the k pair
  (0, 1) of the 8 columns, then the pair (2, 3)), each int16 pair of u is one broadcast 32-bit
  load, and two vpmaddwd (int16 pairs into int32, exact) replace the vpdpbusd. With u = x - x_zp
  there is no +128 to correct for, and the requant runs without 64-bit multiplies
  (_requant_avx2).

Written by hand because TVM 0.27.0.post1's `tensorize` segfaults (with its own VNNI
intrinsic, on the canonical packed-layout example).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Isa:
    """An instruction set the kernel is written for: int32 lanes per vector, the register tile
    (rows x column blocks, the column-block counts tried largest first where n is static)."""
    name: str
    lanes: int
    cols: tuple
    rows: int
    act: str  # u's dtype: uint8 (x + 128, vpdpbusd's unsigned side) or int16 (x - x_zp)
    chunk: int = 0  # linears: bytes of u per row chunk (0: none), see kernel

    def pos(self, c, r):
        """Where column c's byte for k % 4 == r lies in a packed block (ints or TIR strings):
        VNNI 4c + r; AVX2 (k pairs) 2L (r // 2) + 2c + r % 2."""
        L2 = 2 * self.lanes
        if self.act == "uint8":
            return f"({c}) * 4 + ({r})" if isinstance(c, str) else c * 4 + r
        return (f"({r}) // 2 * {L2} + ({c}) * 2 + ({r}) % 2" if isinstance(c, str) else
                r // 2 * L2 + c * 2 + r % 2)

    def col_row(self, q: str) -> tuple[str, str]:
        """TIR strings (column, k % 4) of byte q of a packed block (pos's inverse)."""
        L2 = 2 * self.lanes
        if self.act == "uint8":
            return f"{q} // 4", f"{q} % 4"
        return f"{q} % {L2} // 2", f"{q} // {L2} * 2 + {q} % 2"


VNNI = Isa("avx512vnni", 16, (4, 3, 2, 1), 4, "uint8")
AVX2 = Isa("avx2", 8, (2, 1), 4, "int16", 128 << 10)
# AVX2 for weights of at most 7 bits (|w| <= 64, checked on the constant weights): vpmaddubsw's
# int16 pair sums are then exact (255 x 64 x 2 = 32640), and vpmaddubsw + vpmaddwd by ones is
# vpdpbusd, half the multiplies of the int16 path; u and the block layout are VNNI's
AVX2_S7 = Isa("avx2-s7", 8, (2, 1), 4, "uint8", 128 << 10)
S7_MAX = 64  # the largest |w| AVX2_S7 takes


def isa_of(dot: str) -> Isa:
    """The kernel's instruction set for build.int8_dot's name ("vnni" and "amx" use VNNI)."""
    return AVX2 if dot == "avx2" else VNNI


def pack(w: np.ndarray, isa: Isa) -> np.ndarray:
    """A linear's int8 weight [N, K] (N % lanes == 0, K % 4 == 0) in the kernel's packed layout
    [1, N/L, K/4, 4L]."""
    n, k = w.shape
    L = isa.lanes
    blocks = w.reshape(n // L, L, k // 4, 4).transpose(0, 2, 1, 3)  # [N/L, K/4, column, k % 4]
    out = np.empty((n // L, k // 4, 4 * L), np.int8)
    for c in range(L):
        for r in range(4):
            out[:, :, isa.pos(c, r)] = blocks[:, :, c, r]
    return out[None]


def _llvm_major() -> int:
    import tvm
    return int(tvm.target.codegen.llvm_version_major())


@dataclass(frozen=True)
class Requant:
    """The requant computed on each int32 tile before it is stored:
    y = clamp(rshift_round((acc - colsum_mult * sum_k w[k, j] + e[0, j]) * e[1, j], e[2, j]) + out_zp)
    with e the kernel's int64 [4, n or 1] argument (offset, multiplier, shift, rounding
    2^(shift-1) or 0), per column or, with one column, for all; colsum_mult != 0 only for
    unpacked w (the kernel sums each packed panel's columns with the same instructions)."""
    out_dtype: str
    out_zp: int
    qmin: int
    qmax: int
    per_channel: bool
    colsum_mult: int = 0


def _dot(isa: Isa, acc: str, a: tuple, w) -> str:
    """acc + the 4-way dot of 4 k-steps of one row of u with a packed block: `a` holds u's 4
    values as int32 words (VNNI: one, the 4 bytes; AVX2: two, the int16 pairs), each broadcast
    to every lane; w(lo, ln) is the load of the block's bytes [lo, lo + ln)."""
    L = isa.lanes
    if isa is AVX2_S7:  # u8 x s8 pairs into int16 (exact for |w| <= 64), then pairs of those into int32
        pairs = (f'T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", '
                 f'T.reinterpret("int8x32", T.broadcast({a[0]}, 8)), {w(0, 32)})')
        return (f'{acc} + T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", {pairs}, '
                f'T.broadcast(T.int16(1), 16))')
    if isa.act == "uint8":
        # LLVM >= 20 declares vpdpbusd's multiplicands as <64 x i8>, older releases as <16 x i32>
        bty = "int8x64" if _llvm_major() >= 20 else "int32x16"
        wv = w(0, 64) if bty == "int8x64" else f'T.reinterpret("int32x16", {w(0, 64)})'
        return (f'T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", {acc}, '
                f'T.reinterpret("{bty}", T.broadcast({a[0]}, 16)), {wv})')
    # u's int16 pairs (0, 1) and (2, 3) broadcast (vpbroadcastd from memory); w's halves
    # sign-extended to int16 (vpmovsxbw)
    madd = lambda h: (f'T.call_llvm_pure_intrin("int32x{L}", "llvm.x86.avx2.pmadd.wd", '
                      f'T.reinterpret("int16x{2 * L}", T.broadcast({a[h]}, {L})), '
                      f'T.Cast("int16x{2 * L}", {w(2 * L * h, 2 * L)}))')
    return f"{acc} + {madd(0)} + {madd(1)}"


def kernel(k: int | None, n: int | None, packed: bool = True, ep: Requant | None = None, isa: Isa = VNNI):
    """The PrimFunc for reduction length k (static and k % 4 == 0, or None: symbolic, u's last
    word read byte by byte) and n outputs (static, or None: a last partial column block),
    batch and rows symbolic. packed: w is given packed, [B, ceil(n/L), ceil(k/4), 4L] (`pack`);
    else w is [B, k, n] and each (batch, panel) packs its own columns first. ep: the requant
    of the epilogue (arguments u, w, e, c), else c is the int32 product (u, w, c).

    (batch, column panel of cols x L) pairs run in parallel; within a panel (its packed
    weights, k x L x cols bytes, stay in L1/L2) row blocks of rows accumulate rows x cols x L
    int32 in registers: per 4 k-steps, rows broadcasts and cols weight loads feed rows x cols
    dot products. A last partial row block re-reads (and rewrites, with the same values) row
    m - 1 in place of rows >= m; columns past n are not stored."""
    import tvm
    L, B = isa.lanes, 4 * isa.lanes
    if n is not None and n % L == 0:
        cols = next(c for c in isa.cols + (1,) if (n // L) % c == 0)
        rows = isa.rows
    else:
        cols, rows = 1, 2 * isa.rows
    nb = "nb" if n is None else str(-(-n // L))
    kb = "kb" if k is None else str(k // 4)
    kk, nn = ("k" if k is None else k), ("n" if n is None else n)
    syms = [v for v, d in (("n", n), ("k", k)) if d is None] + [v for v, d in (("nb", n), ("kb", k)) if d is None and packed]
    decl = "".join(f"    {v} = T.int64()\n" for v in syms)
    colsum = ep is not None and ep.colsum_mult != 0
    if packed:
        wdecl = f'    wp = T.match_buffer(var_w, (bt, {nb}, {kb}, {B}), "int8")\n'
        wsrc = lambda lo, ln: f"wp[b, jq * {cols} + t, ko, T.ramp({lo}, 1, {ln})]"
        prologue = ""
    else:
        kb = "((k + 3) // 4)" if k is None else kb
        nb = f"((n + {L - 1}) // {L})" if n is None else nb
        wdecl = f'    w = T.match_buffer(var_w, (bt, {kk}, {nn}), "int8")\n'
        wsrc = lambda lo, ln: f"wl[t, ko, T.ramp({lo}, 1, {ln})]"
        src_of = {isa.pos(c, r): r * L + c for c in range(L) for r in range(4)}
        idx = ", ".join(str(src_of[q]) for q in range(B))
        rows4 = ", ".join(f"w[b, kq * 4 + {r}, T.ramp(jb * {L}, 1, {L})]" for r in range(4))
        # u = 1 at every k: a dot with it sums 4 rows of w (bytes 1, 1, 1, 1; int16 pairs 1, 1)
        ones = ("T.int32(16843009)",) if isa.act == "uint8" else ("T.int32(65537)",) * 2
        sums = (f"\n                cs[t, T.ramp(0, 1, {L})] = "
                + _dot(isa, f"cs[t, T.ramp(0, 1, {L})]", ones, lambda lo, ln: f"wl[t, kq, T.ramp({lo}, 1, {ln})]")
                if colsum else "")
        qc, qr = isa.col_row("q")
        prologue = f"""
        wl = T.alloc_buffer(({cols}, {kb}, {B}), "int8")
        cs = T.alloc_buffer(({cols}, {L}), "int32", scope="global")
        for t in range({cols}):
            cs[t, T.ramp(0, 1, {L})] = T.broadcast(T.int32(0), {L})
            for kq in range({kb}):
                if kq * 4 + 4 <= {kk} and jb * {L} + {L} <= {nn}:
                    wl[t, kq, T.ramp(0, 1, {B})] = T.Shuffle([{rows4}], [{idx}])
                else:
                    for q in range({B}):
                        wl[t, kq, q] = T.if_then_else(kq * 4 + {qr} < {kk} and jb * {L} + {qc} < {nn},
                                                      w[b, T.min(kq * 4 + {qr}, {kk} - 1), T.min(jb * {L} + {qc}, {nn} - 1)],
                                                      T.int8(0)){sums}"""
    col0 = f"(jq * {cols} + t) * {L}"
    row = f"T.min(rb * {rows} + i, m - 1)"
    ch = 0  # rows per chunk
    if packed and k is not None and isa.chunk:
        ch = rows * max(1, isa.chunk // (k * np.dtype(isa.act).itemsize * rows))
    nch = f"((m + {ch - 1}) // {ch})" if ch else "1"
    nrb = f"((m + {rows - 1}) // {rows})"
    # the chunks' row blocks split evenly (m / ch rounded up, chunks of equal size): with chunks
    # of ch rows the last one is short, and the threads' equal shares of tasks unequal work
    cb = f"(((m + {nch} - 1) // {nch} + {rows - 1}) // {rows})"
    rbs = f"chunk * {cb}, T.min({nrb}, chunk * {cb} + {cb})" if ch else nrb
    out_dt = "int32" if ep is None else ep.out_dtype
    val = f"acc[i, t, T.ramp(0, 1, {L})]"
    edecl = ""
    if ep is not None:
        edecl = f'    e = T.match_buffer(var_e, ({TABLE_ROWS[L]}, {nn if ep.per_channel else 1}), "int64")\n'
        sub = (f' - T.Cast("int64x{L}", cs[t, T.ramp(0, 1, {L})]) * T.broadcast(T.int64({ep.colsum_mult}), {L})'
               if colsum else "")
        rq = requant_vec(ep, val, col0, sub, L) if L == 16 else _requant_avx2(ep, val, col0)
        eps = f"yv[T.ramp(0, 1, {L})] = {rq}\n{' ' * 20}"
        val = f"yv[T.ramp(0, 1, {L})]"
    else:
        edecl, eps = "", ""
    lane = "acc[i, t, l]" if ep is None else "yv[l]"
    if n is not None and n % L == 0:
        store = f"{eps}c[b, {row}, T.ramp({col0}, 1, {L})] = {val}"
    else:
        store = (f"{eps}if {col0} + {L} <= {nn}:\n"
                 f"{' ' * 24}c[b, {row}, T.ramp({col0}, 1, {L})] = {val}\n"
                 f"{' ' * 20}else:\n"
                 f"{' ' * 24}for l in range({L}):\n"
                 f"{' ' * 28}if {col0} + l < {nn}:\n"
                 f"{' ' * 32}c[b, {row}, {col0} + l] = {lane}")
    per = 4 if isa.act == "uint8" else 2  # u's values per int32 word
    bits, mask = 32 // per, (1 << 32 // per) - 1
    words, tails = [], []
    for h in range(4 // per):
        word = f'T.reinterpret("int32", u[b, {row}, T.ramp(ko * 4 + {h * per}, 1, {per})])'
        words.append(word)
        if k is None:  # the last word of a row whose length is not a multiple of 4: values past k are 0
            tail = " | ".join(f'((T.Cast("int32", T.if_then_else(ko * 4 + {h * per + e} < k, '
                              f'u[b, {row}, T.min(ko * 4 + {h * per + e}, k - 1)], T.{isa.act}(0))) & {mask}) << {bits * e})'
                              for e in range(per))
            tails.append(f"T.if_then_else(ko * 4 + {h * per + per} <= k, {word}, {tail})")
    names = tuple(f"a{h}" for h in range(len(words)))
    bind = lambda ws: f"\n{' ' * 20}".join(f"{nm} = {wd}" for nm, wd in zip(names, ws))  # noqa: E731
    dot = _dot(isa, f"acc[i, t, T.ramp(0, 1, {L})]", names, wsrc)
    kloop = lambda lo, hi, ws: f"""
            for ko in range({lo}{hi}):
                for i in T.unroll({rows}):
                    {bind(ws)}
                    for t in T.unroll({cols}):
                        acc[i, t, T.ramp(0, 1, {L})] = {dot}"""  # noqa: E731
    # symbolic k: the whole words first, then the last one (if k % 4) read value by value
    kloops = kloop("", kb, words)
    if k is None:
        kloops = kloop("", "k // 4", words) + kloop("k // 4, ", kb, tails)
    scratch = "" if ep is None else f"""
            yv = T.alloc_buffer(({L},), "{out_dt}", scope="global")"""
    src = f"""

@T.prim_func
def qc_dot(var_u: T.handle, var_w: T.handle, {'var_e: T.handle, ' if ep else ''}var_c: T.handle):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    bt = T.int64()
    m = T.int64()
{decl}{wdecl}{edecl}    u = T.match_buffer(var_u, (bt, m, {kk}), "{isa.act}")
    c = T.match_buffer(var_c, (bt, m, {nn}), "{out_dt}")
    for bj in T.parallel(bt * {nch} * ({nb} // {cols})):
{prologue}
        for rb in range({rbs}):
            acc = T.alloc_buffer(({rows}, {cols}, {L}), "int32", scope="global"){scratch}
            for i in T.unroll({rows}):
                for t in T.unroll({cols}):
                    acc[i, t, T.ramp(0, 1, {L})] = T.broadcast(T.int32(0), {L})
{kloops}
            for i in T.unroll({rows}):
                for t in T.unroll({cols}):
                    {store}
"""
    # no named scalars: TVM 0.27 lowers a scalar assigned inside a loop to a workspace allocation
    for name, expr in (("jb", f"(jq * {cols} + t)"), ("b", f"(bj // ({nch} * ({nb} // {cols})))"),
                       ("chunk", f"(bj // ({nb} // {cols}) % {nch})"), ("jq", f"(bj % ({nb} // {cols}))")):
        src = re.sub(rf"\b{name}\b", expr, src)
    return tvm.script.from_source(src)


def requant_vec(ep: Requant, acc: str, col0: str, sub: str = "", lanes: int = 16) -> str:
    """The TVMScript expression of Requant `ep` on `lanes` int32 lanes `acc` (columns col0 ...),
    minus `sub` (an int64 vector expression, or ""), reading the kernel's argument e."""
    L = lanes
    ev = (lambda r: f"e[{r}, T.ramp({col0}, 1, {L})]") if ep.per_channel else (lambda r: f"T.broadcast(e[{r}, 0], {L})")
    c64 = lambda v: f"T.broadcast(T.int64({v}), {L})"
    p = f'((T.Cast("int64x{L}", {acc}) + {ev(0)}{sub}) * {ev(1)})'
    # rshift_round: (p + 2^(c-1) - [p < 0]) >> c for c > 0, p for c = 0 (e[3] is 2^(c-1) or 0)
    r = (f'T.shift_right({p} + {ev(3)} - T.Cast("int64x{L}", {p} < {c64(0)}) * T.Cast("int64x{L}", {ev(2)} > {c64(0)}), '
         f"{ev(2)})")
    return f'T.Cast("{ep.out_dtype}x{L}", T.max(T.min({r} + {c64(ep.out_zp)}, {c64(ep.qmax)}), {c64(ep.qmin)}))'


TABLE_ROWS = {16: 4, 8: 6}  # rows of the e argument, by Isa.lanes (8: _requant_avx2's)


def _requant_avx2(ep: Requant, acc: str, col0: str) -> str:
    """Requant's expression on 8 int32 lanes without the 64-bit multiply and arithmetic shift
    that AVX2 lacks (LLVM would build each from several instructions), from the e rows of
    epilogue_table(..., AVX2): offset x multiplier, multiplier, shift, 2^(shift-1) (0 at shift
    0), [shift > 0], 2^(63-shift) - out_zp. The product is acc x m (vpmuldq: both fit 32 bits)
    plus offset x m, the same integer p as (acc + offset) x m; the rounding shift of p is a
    logical shift of p + 2^63 (its sign bit flipped), which adds 2^(63-shift) to the result
    (2^63 is a multiple of 2^shift for shift <= 62), taken away with out_zp in one subtraction."""
    assert ep.colsum_mult == 0, "the AVX2 epilogue takes no column sums (u = x - x_zp, or packed weights)"
    ev = (lambda r: f"e[{r}, T.ramp({col0}, 1, 8)]") if ep.per_channel else (lambda r: f"T.broadcast(e[{r}, 0], 8)")
    c64 = lambda v: f"T.broadcast(T.int64({v}), 8)"
    p = f'(T.Cast("int64x8", {acc}) * T.Cast("int64x8", T.Cast("int32x8", {ev(1)})) + {ev(0)})'
    t = f'({p} + {ev(3)} - T.bitwise_and(T.Cast("int64x8", {p} < {c64(0)}), {ev(4)}))'
    r = (f'(T.reinterpret("int64x8", T.shift_right(T.reinterpret("uint64x8", T.bitwise_xor({t}, {c64(-(1 << 63))})), '
         f'T.reinterpret("uint64x8", {ev(2)}))) - {ev(5)})')
    return f'T.Cast("{ep.out_dtype}x8", T.max(T.min({r}, {c64(ep.qmax)}), {c64(ep.qmin)}))'


def epilogue_table(offset: np.ndarray, mult: np.ndarray, shift: np.ndarray, isa: Isa = VNNI,
                   out_zp: int = 0) -> np.ndarray:
    """Requant's e argument, int64, broadcast to one length: rows offset, multiplier, shift and
    rounding term 2^(shift-1) (0 where shift is 0); for AVX2 (_requant_avx2) offset x multiplier,
    multiplier, shift, the rounding term, [shift > 0] and 2^(63-shift) - out_zp (mod 2^64)."""
    off, m, c = np.broadcast_arrays(*(np.asarray(v, np.int64).reshape(-1) for v in (offset, mult, shift)))
    rnd = np.where(c > 0, np.left_shift(np.int64(1), np.maximum(c - 1, 0)), 0)
    if isa.lanes == 16:
        return np.stack([off, m, c, rnd]).astype(np.int64)
    assert np.abs(off).max(initial=0) < 2**32 and np.abs(m).max(initial=0) < 2**31, "offset x multiplier overflows"
    wrap = lambda v: (int(v) + (1 << 63)) % (1 << 64) - (1 << 63)  # noqa: E731
    top = np.array([wrap((1 << (63 - int(ci))) - out_zp) for ci in c], np.int64)
    return np.stack([off * m, m, c, rnd, (c > 0).astype(np.int64), top]).astype(np.int64)
