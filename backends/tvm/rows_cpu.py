"""Row kernels for CPUs, written directly in TIR: the integer softmax of a whole row in one
pass over memory (TVM's generic lowering writes the int64 exponentials of every row to memory
and reads them back twice, in four kernels, none of them vectorized: the row length is
symbolic, and TVM vectorizes static extents only).

Rows run in parallel (chunks of CHUNK); each row is read twice while it sits in L1: its
maximum, then its table exponentials (kept in a row buffer) and their sum; the outputs are
computed from the row buffer. Each pass runs 16 lanes at a time (explicit
vectors, the table read by a gather; lane types in `softmax`) and the row's last n % 16
entries one by one, with the same expressions. Integer semantics are int_ops.int_softmax's, as translate's
generic softmax: masked entries excluded from the max and given e = 0; the division by the row
sum exact without an integer division (translate._floordiv_small_quotient) where the quotient
bound allows.
"""
from __future__ import annotations

I64_MIN_HALF = -(1 << 62)
LANES = 16
SUM = LANES + 1  # where the row's sum sits in the scratch, after the lanes
CHUNK = 32  # rows per parallel task (its scratch allocated once; no named scalars in the loops:
            # TVM 0.27 lowers a named scalar assigned inside a loop to a workspace allocation)


class _Lanes:
    """TVMScript expression strings for `lanes` lanes: entry j (1 lane) or entries 16 jv ... (16)."""

    def __init__(self, lanes: int):
        self.n = lanes

    def ty(self, dt: str) -> str:
        return dt if self.n == 1 else f"{dt}x{self.n}"

    def c(self, v: int, dt: str = "int64") -> str:
        return f"T.{dt}({v})" if self.n == 1 else f"T.broadcast(T.{dt}({v}), {self.n})"

    def s(self, e: str) -> str:  # a scalar value in every lane
        return e if self.n == 1 else f"T.broadcast({e}, {self.n})"

    def cast(self, dt: str, e: str) -> str:
        return f'T.Cast("{self.ty(dt)}", {e})'

    def at(self, buf: str, row: str) -> str:
        return f"{buf}[{row}, j]" if self.n == 1 else f"{buf}[{row}, T.ramp(jv * {self.n}, 1, {self.n})]"


def softmax(x_dtype: str, masked: bool, top: int, tab_dtype: str, mult: int, shift: int, out_zp: int,
            qmin: int, qmax: int, out_dtype: str, exact_div: bool, float_div: bool = False):
    """The PrimFunc (x [rows, n], [mask [mrows, n] int8, rows a multiple of mrows], table
    [top + 1], y [rows, n]), rows and n symbolic.

    Lane types: the max and the table index in int32 where x is 8 or 16 bits and the table
    int32 (AVX2 has no 64-bit max, and gathers 8 int32 indices at once), else int64; the sum in
    int64. float_div (0 <= e x mult < 2^49 for every table entry e: translate._softmax_float_div):
    the output stage in float64 lanes, where AVX2 has no 64-bit multiply, arithmetic shift or
    int64 <-> float64 conversion for the int64 stage to use. It is exact: where the row sum S is
    below 2^52, e x mult, S, the quotient's estimate (within one of it, as in
    translate._floordiv_small_quotient), the fix-up products (below e x mult + S < 2^53) and the
    rounding shift (t + 2^(shift-1)) 2^-shift of t >= 0 are integers float64 holds exactly;
    where S >= 2^52 > e x mult, the quotient is 0, and so are the estimate and both fix-ups
    (fl(S) >= 2^52 too)."""
    import tvm
    narrow = x_dtype in ("int8", "uint8", "int16") and tab_dtype == "int32" and top < 2**31
    it = "int32" if narrow else "int64"  # the lane type of the max and the index
    low = -(1 << 30) if narrow else I64_MIN_HALF  # below every x: a masked entry's value for the max

    def exprs(v: _Lanes):
        row = f"c * {CHUNK} + rr"
        valid = f"{v.at('mask', f'({row}) // (rows // mrows)')} != {v.c(0, 'int8')}" if masked else None
        xv = v.cast(it, v.at("x", row))
        xm = f"T.Select({valid}, {xv}, {v.c(low, it)})" if masked else xv
        # the index clamped below too: a masked entry may exceed the row's max (its load is unused)
        idx = f"T.max(T.min({v.s(f'mx[0]')} - {xv}, {v.c(top, it)}), {v.c(0, it)})"
        ex = f"tab[{idx}]"
        e = f"T.Select({valid}, {ex}, {v.c(0, tab_dtype)})" if masked else ex
        # pass 3 reads the row's exponentials back from es
        es = "es[j]" if v.n == 1 else f"es[T.ramp(jv * {v.n}, 1, {v.n})]"
        num, den = f"({v.cast('int64', es)} * {v.c(mult)})", v.s(f"T.max(acc[{SUM}], T.int64(1))")
        if exact_div:  # as translate._floordiv_small_quotient, with the row's reciprocal 1 / fl(d)
            q0 = v.cast("int64", f"T.floor({v.cast('float64', num)} * {v.s('rc[0]')})")
            q1 = f"({q0} - {v.cast('int64', f'{q0} * {den} > {num}')})"
            t = f"({q1} + {v.cast('int64', f'({q1} + {v.c(1)}) * {den} <= {num}')})"
        else:
            t = f"T.floordiv({num}, {den})"
        if shift:
            t = f"T.shift_right({t} + {v.c(1 << (shift - 1))} - {v.cast('int64', f'{t} < {v.c(0)}')}, {v.c(shift)})"
        out = v.cast(out_dtype, f"T.max(T.min({t} + {v.c(out_zp)}, {v.c(qmax)}), {v.c(qmin)})")
        # the same in float64 (float_div): rc[1] is fl(max(sum, 1))
        f = lambda x: v.c(float(x), "float64")  # noqa: E731
        fnum = f"({v.cast('float64', es)} * {f(mult)})"
        fden = v.s("rc[1]")
        fq0 = f"T.floor({fnum} * {v.s('rc[0]')})"
        fq1 = f"({fq0} - {v.cast('float64', f'{fq0} * {fden} > {fnum}')})"
        ft = f"({fq1} + {v.cast('float64', f'({fq1} + {f(1)}) * {fden} <= {fnum}')})"
        if shift:
            ft = f"T.floor(({ft} + {f(1 << (shift - 1))}) * {f(2.0 ** -shift)})"
        fout = v.cast(out_dtype, v.cast("int32", f"T.max(T.min({ft} + {f(out_zp)}, {f(qmax)}), {f(qmin)})"))
        return xm, e, es, out, fout
    vm, ve, ves, vo, vfo = exprs(_Lanes(LANES))
    sm_, se, ses, so, sfo = exprs(_Lanes(1))
    mdecl = '    mrows = T.int64()\n    mask = T.match_buffer(var_m, (mrows, n), "int8")\n' if masked else ""

    def out_loops(vec: str, one: str, ind: int) -> str:
        pad = " " * ind
        return (f"{pad}for jv in range(n // {LANES}):\n"
                f"{pad}    y[c * {CHUNK} + rr, T.ramp(jv * {LANES}, 1, {LANES})] = {vec}\n"
                f"{pad}for j in range(n // {LANES} * {LANES}, n):\n"
                f"{pad}    y[c * {CHUNK} + rr, j] = {one}\n")
    outs = out_loops(vfo, sfo, 12) if float_div else out_loops(vo, so, 12)
    body = f'''

@T.prim_func
def qc_softmax_rows(var_x: T.handle, {"var_m: T.handle, " if masked else ""}var_t: T.handle, var_y: T.handle):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    rows = T.int64()
    n = T.int64()
    x = T.match_buffer(var_x, (rows, n), "{x_dtype}")
{mdecl}    tab = T.match_buffer(var_t, ({top + 1},), "{tab_dtype}")
    y = T.match_buffer(var_y, (rows, n), "{out_dtype}")
    for c in T.parallel((rows + {CHUNK - 1}) // {CHUNK}):
        acc = T.alloc_buffer(({LANES + 2},), "int64", scope="global")  # lanes, then the max and the sum
        mx = T.alloc_buffer(({LANES + 1},), "{it}", scope="global")  # the row's max: slot 0, then lanes
        rc = T.alloc_buffer((2,), "float64", scope="global")  # 1 / the row sum, the row sum
        es = T.alloc_buffer((n,), "{tab_dtype}", scope="global")  # the row's exponentials
        for rr in range(T.min({CHUNK}, rows - c * {CHUNK})):
            mx[T.ramp(1, 1, {LANES})] = T.broadcast(T.{it}({low}), {LANES})
            for jv in range(n // {LANES}):
                mx[T.ramp(1, 1, {LANES})] = T.max(mx[T.ramp(1, 1, {LANES})], {vm})
            mx[0] = T.{it}({low})
            for l in range({LANES}):
                mx[0] = T.max(mx[0], mx[l + 1])
            for j in range(n // {LANES} * {LANES}, n):
                mx[0] = T.max(mx[0], {sm_})
            acc[T.ramp(0, 1, {LANES})] = T.broadcast(T.int64(0), {LANES})
            for jv in range(n // {LANES}):
                {ves} = {ve}
                acc[T.ramp(0, 1, {LANES})] = acc[T.ramp(0, 1, {LANES})] + T.Cast("int64x{LANES}", {ves})
            acc[{SUM}] = T.int64(0)
            for l in range({LANES}):
                acc[{SUM}] = acc[{SUM}] + acc[l]
            for j in range(n // {LANES} * {LANES}, n):
                {ses} = {se}
                acc[{SUM}] = acc[{SUM}] + T.Cast("int64", {ses})
            rc[1] = T.Cast("float64", T.max(acc[{SUM}], T.int64(1)))
            rc[0] = T.float64(1) / rc[1]
{outs}'''
    return tvm.script.from_source(body)
