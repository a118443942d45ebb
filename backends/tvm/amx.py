"""The int8 GEMM of linears on Intel AMX (AMX-INT8 tile multiplies), written directly in TIR:
C[r, j] = sum_k u[r, k] w[j, k] with u uint8 [1, m, k] and w int8 in vnni.py's packed layout
[1, n/16, k/4, 64], which is exactly the layout of an AMX B tile (16 rows of k/4 groups, each
row 16 columns x 4 bytes); the requant of vnni.Requant in the epilogue. TDPBUSD adds u8 x s8
products into int32 lanes without saturation: the exact integer dot product, as vpdpbusd.

Each parallel task is a 32-column panel (its packed weights stay in L1/L2): for each block of
32 rows, four C tiles (2 x 2 of 16 x 16 int32) accumulate over k in steps of 64 (two A tiles
of 16 rows x 64 bytes, two B tiles), are stored to a 32 x 32 scratch and requantized from
there 16 lanes at a time. A last partial block of rows is copied to a zero-padded scratch
first (tile loads read 16 whole rows). Needs k % 64 == 0 and n % 32 == 0. (Measured and not
kept: row blocks as the outer task order, and software prefetch of the next block's rows;
both slower.)

AMX state needs the kernel's permission (arch_prctl ARCH_REQ_XCOMP_PERM, once per process:
runtime.request_amx_permission) and a tile configuration per thread (ldtilecfg at the start
of each task).
"""
from __future__ import annotations

from .vnni import Requant, requant_vec


def fits(k: int, n: int) -> bool:
    return k % 64 == 0 and n % 32 == 0


def kernel(k: int, n: int, ep: Requant | None = None):
    """The PrimFunc (u [1, m, k], wp [1, n/16, k/4, 64], [e [4, n or 1] int64], c [1, m, n]), m symbolic."""
    import tvm
    assert fits(k, n)
    out_dt = "int32" if ep is None else ep.out_dtype
    intrin = lambda name, *a: f'T.evaluate(T.call_llvm_intrin("void", "llvm.x86.{name}", {", ".join(a)}))'
    i8 = lambda v: f"T.int8({v})"

    def kloop(src: str, stride: str, ind: int) -> str:
        pad = " " * ind
        return "\n".join(pad + ln for ln in [
            f"for ko in range({k // 64}):",
            "    " + intrin("tileloadd64", i8(4), f"T.address_of({src.format(row=0)})", stride),
            "    " + intrin("tileloadd64", i8(5), f"T.address_of({src.format(row=16)})", stride),
            "    " + intrin("tileloadd64", i8(6), "T.address_of(wp[0, jp * 2, ko * 16, 0])", "T.int64(64)"),
            "    " + intrin("tileloadd64", i8(7), "T.address_of(wp[0, jp * 2 + 1, ko * 16, 0])", "T.int64(64)"),
            "    " + intrin("tdpbusd", i8(0), i8(4), i8(6)),
            "    " + intrin("tdpbusd", i8(1), i8(4), i8(7)),
            "    " + intrin("tdpbusd", i8(2), i8(5), i8(6)),
            "    " + intrin("tdpbusd", i8(3), i8(5), i8(7))])
    full = kloop("u[0, rb * 32 + {row}, ko * 64]", f"T.int64({k})", 16)
    part = kloop("ua[{row}, ko * 64]", f"T.int64({k})", 16)
    col0 = "jp * 32 + t * 16"
    val = "ct[i, T.ramp(t * 16, 1, 16)]"
    out = val if ep is None else requant_vec(ep, val, col0)
    edecl = "" if ep is None else f'    e = T.match_buffer(var_e, (4, {n if ep.per_channel else 1}), "int64")\n'
    cfg = "\n".join(f"        cfg[{i}] = T.uint8({v})" for i, v in
                    [(0, 1)] + [(16 + 2 * t, 64) for t in range(8)] + [(48 + t, 16) for t in range(8)])
    src = f'''

@T.prim_func
def qc_amx_dot(var_u: T.handle, var_w: T.handle, {'var_e: T.handle, ' if ep else ''}var_c: T.handle):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    m = T.int64()
    wp = T.match_buffer(var_w, (1, {n // 16}, {k // 4}, 64), "int8")
{edecl}    u = T.match_buffer(var_u, (1, m, {k}), "uint8")
    c = T.match_buffer(var_c, (1, m, {n}), "{out_dt}")
    for jp in T.parallel({n // 32}):
        cfg = T.alloc_buffer((64,), "uint8", scope="global")
        ct = T.alloc_buffer((32, 32), "int32", scope="global")
        ua = T.alloc_buffer((32, {k}), "uint8", scope="global")
        for q in range(64):
            cfg[q] = T.uint8(0)
{cfg}
        {intrin("ldtilecfg", "T.address_of(cfg[0])")}
        for rb in range((m + 31) // 32):
            {intrin("tilezero", i8(0))}
            {intrin("tilezero", i8(1))}
            {intrin("tilezero", i8(2))}
            {intrin("tilezero", i8(3))}
            if rb * 32 + 32 <= m:
{full}
            else:
                for i, q in T.grid(32, {k}):
                    ua[i, q] = T.if_then_else(rb * 32 + i < m, u[0, T.min(rb * 32 + i, m - 1), q], T.uint8(0))
{part}
            {intrin("tilestored64", i8(0), "T.address_of(ct[0, 0])", "T.int64(128)")}
            {intrin("tilestored64", i8(1), "T.address_of(ct[0, 16])", "T.int64(128)")}
            {intrin("tilestored64", i8(2), "T.address_of(ct[16, 0])", "T.int64(128)")}
            {intrin("tilestored64", i8(3), "T.address_of(ct[16, 16])", "T.int64(128)")}
            for i in range(T.min(32, m - rb * 32)):
                for t in T.unroll(2):
                    c[0, rb * 32 + i, T.ramp({col0}, 1, 16)] = {out}
        {intrin("tilerelease")}
'''
    return tvm.script.from_source(src)
