"""An int8 GEMM kernel for AVX-512 VNNI written directly in TIR: C[m, N] = sum_k u[m, k] w[n, k]
with u uint8, w int8 packed as [N/16, K/4, 16, 4] (flat), one vpdpbusd per 16 columns x 4 k.

Written by hand because TVM 0.27.0.post1's `tensorize` segfaults (with its own VNNI
intrinsic, on the canonical packed-layout example). vpdpbusd adds the four u8 x s8 products
to the int32 lane without saturation, so the result is the exact integer dot product.
Rows run in parallel; each row computes COLS x 16 columns at once (independent accumulator
chains sharing the broadcast activation word).
"""
from __future__ import annotations

COLS = 4  # 16-column blocks per inner step


def _llvm_major() -> int:
    import tvm
    return int(tvm.target.codegen.llvm_version_major())


def kernel(k: int, n: int):
    """The PrimFunc (m symbolic) for reduction length k (k % 4 == 0) and n outputs (n % 16 == 0)."""
    import tvm
    nb, kb = n // 16, k // 4
    cols = COLS if nb % COLS == 0 else 1
    # LLVM >= 20 declares vpdpbusd's multiplicands as <64 x i8>, older releases as <16 x i32>
    w = f"wp[T.ramp(((jq * {cols} + t) * {kb} + ko) * 64, 1, 64)]"
    bty, wref = ("int8x64", w) if _llvm_major() >= 20 else ("int32x16", f'T.reinterpret("int32x16", {w})')
    src = f'''

@T.prim_func
def qc_vnni_dot(var_u: T.handle, var_w: T.handle, var_c: T.handle):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    m = T.int64()
    wp = T.match_buffer(var_w, ({nb * kb * 64},), "int8")
    u = T.match_buffer(var_u, (m, {k}), "uint8")
    c = T.match_buffer(var_c, (m, {n}), "int32")
    for r in T.parallel(m):
        for jq in range({nb // cols}):
            acc = T.alloc_buffer(({cols}, 16), "int32", scope="local")
            for t in T.unroll({cols}):
                acc[t, T.ramp(0, 1, 16)] = T.broadcast(T.int32(0), 16)
            for ko in range({kb}):
                a = T.reinterpret("int32", u[r, T.ramp(ko * 4, 1, 4)])
                for t in T.unroll({cols}):
                    acc[t, T.ramp(0, 1, 16)] = T.call_llvm_pure_intrin(
                        "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[t, T.ramp(0, 1, 16)],
                        T.reinterpret("{bty}", T.broadcast(a, 16)),
                        {wref})
            for t in T.unroll({cols}):
                c[r, T.ramp((jq * {cols} + t) * 16, 1, 16)] = acc[t, T.ramp(0, 1, 16)]
'''
    return tvm.script.from_source(src)
