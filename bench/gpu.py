"""GPU speed of qcompiler's integer-only tvm-cuda artifacts against PyTorch, on an NVIDIA Hopper GPU.

Two steps, because the GPU machine has no TVM (and no network):

    .venv/bin/python bench/gpu.py prepare --out .gpu --pack   (here: builds everything it will run)
    python3 bench/gpu.py run --prebuilt .gpu.tar.xz           (on the GPU machine; writes bench/results/gpu.json)

`prepare` builds the kernel library (backends/tvm/kernels, CUTLASS + nvcc, sm_90a) and, per
model, the tvm-cuda artifact plus the reference backend's outputs on fixed inputs.
`run` prints and writes:
- a kernel table: each int8 GEMM shape of the models (and 4096^3, 8192^3) through qcompiler's
  fused GEMM + requant kernel, in TOP/s of device time (the kernels' own duration, from CUPTI)
  and % of the int8 dense peak, beside torch._int_mm (int32 out, no requant) and a bf16 matmul
  at the same shape; every shape's output is checked
  bit for bit against qc::requant's reference arithmetic (qcompiler/int_ops.py) run by torch;
- the models (when prepared): PyTorch FP32, bf16 eager, bf16 torch.compile, qcompiler's W8A8
  fake-quant graph, and the tvm-cuda integer artifact, with ratios to bf16 torch.compile, and
  the artifact's outputs compared bit for bit with the reference backend's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
INT8_PEAK_TOPS = {"H100": 1979.0, "H200": 1979.0}  # dense int8 tensor-core peak (SXM), TOP/s

# (M, N, K) of the int8 GEMMs: MiniLM / BERT-base at batch 32 x seq 128, DeiT-S at batch 64 (197 tokens)
GEMM_SHAPES = {
    "MiniLM qkv/out": (4096, 384, 384), "MiniLM ffn up": (4096, 1536, 384), "MiniLM ffn down": (4096, 384, 1536),
    "BERT-base qkv/out": (4096, 768, 768), "BERT-base ffn up": (4096, 3072, 768),
    "BERT-base ffn down": (4096, 768, 3072),
    "DeiT-S qkv": (12608, 1152, 384), "DeiT-S proj": (12608, 384, 384), "DeiT-S ffn up": (12608, 1536, 384),
    "DeiT-S ffn down": (12608, 384, 1536),
    "large 4096^3": (4096, 4096, 4096), "large 8192^3": (8192, 8192, 8192),
}
# edge cases checked for exactness only: partial tiles, one row, no rows
EDGE_SHAPES = [(77, 384, 384), (1, 128, 256), (1000, 1536, 384), (0, 384, 384)]


CHECK_ONLY = False


def _kernels_per_call(fn, iters: int, warmup: int) -> list[dict]:
    """The CUDA kernels fn() launches (CUPTI, through torch.profiler: TVM's, ours and torch's alike),
    each with its device milliseconds and launches per call of fn, over `iters` calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            rows.append({"kernel": e.key[:120], "ms per run": us / 1e3 / iters, "calls per run": e.count / iters})
    return rows


def _device_ms(fn, iters: int = 30, warmup: int = 5) -> float:
    """Device milliseconds of one fn(): the summed duration of the CUDA kernels it launches. Unlike
    events around a lone launch, this leaves out the launch latency (a few microseconds, the whole
    story for a small GEMM): it is the time a kernel takes where the host runs ahead of the GPU, as
    in a model."""
    if CHECK_ONLY:  # under ncu or compute-sanitizer, which hold CUPTI themselves
        return float("nan")
    ms = sum(r["ms per run"] for r in _kernels_per_call(fn, iters, warmup))
    if ms <= 0:
        raise RuntimeError("the profiler saw no CUDA kernel")
    return ms


def load_kernels(prebuilt: Path):
    """dlopen the kernel library (it registers qc.cuda.* in tvm_ffi's global table)."""
    import ctypes
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    import tvm_ffi
    ctypes.CDLL(str(prebuilt / "libqc_kernels_cuda.so"), mode=ctypes.RTLD_GLOBAL)
    return tvm_ffi


def gemm_case(torch, m, n, k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda", generator=g)
    bias = torch.randint(-2**20, 2**20, (n,), dtype=torch.int32, device="cuda", generator=g)
    mult = torch.randint(2**30, 2**31 - 1, (n,), dtype=torch.int32, device="cuda", generator=g)
    # shifts that put outputs across the int8 range (some saturate); a few tiny shifts hit exact ties
    base = int(np.ceil(np.log2(max(1.0, 127 * 127 * np.sqrt(k))))) + 31 - 6
    shift = torch.randint(base - 2, base + 3, (n,), dtype=torch.int32, device="cuda", generator=g)
    shift[:4] = torch.tensor([0, 1, 2, 31], dtype=torch.int32)[: min(4, n)]
    return x, w, bias, mult, shift


def reference_gemm(torch, x, w, bias, mult, shift, out_zp, qmin=-128, qmax=127):
    from qcompiler import int_ops
    if x.shape[0] == 0:
        return torch.empty((0, w.shape[0]), dtype=int_ops.int_dtype(qmin, qmax), device=x.device)
    if x.shape[0] > 16:
        acc = torch._int_mm(x, w.t())
    else:  # _int_mm needs more than 16 rows
        acc = (x.double() @ w.double().t()).to(torch.int32)  # |acc| < 2^31 < 2^53: exact
    return int_ops.requant(acc + bias, 0, mult.long(), shift.long(), out_zp, qmin, qmax, -1)


def kernel_table(prebuilt: Path, peak: float) -> list[dict]:
    import torch
    ffi = load_kernels(prebuilt)
    from qcompiler.backends.tvm.cuda_kernels import GEMM_TILES, HI_SHIFTS, gemm_func
    # (output dtype, row-key suffix, torch dtype, clamp, extra shift bits, tiles timed): int16 out
    # is the requants before residual adds, LUTs and softmax; timed with one tile
    outs = [("int8", "", torch.int8, (-128, 127), 0, tuple(GEMM_TILES)),
            ("int16", " i16", torch.int16, (-32768, 32767), 8, ("128x128",))]
    # each configuration with both epilogues: general (int64, any shift) and hi (int32 words, every
    # shift 32..62: run with the case's shifts raised into that range)
    variants = [(t, hi) for t in GEMM_TILES for hi in (False, True)]
    name = lambda t, hi: f"hi {t}" if hi else t  # noqa: E731
    fns = {(o[0], t, hi): ffi.get_global_func(gemm_func(t, o[0], hi)) for o in outs for t, hi in variants}
    rows = []
    for label, (m, n, k) in [*[(f"edge {s}", s) for s in EDGE_SHAPES], *GEMM_SHAPES.items()]:
        edge = label.startswith("edge")
        x, w, bias, mult, shift = gemm_case(torch, m, n, k, seed=m + n + k)
        out_zp = 3
        row = {"shape": label, "M": m, "N": n, "K": k}
        for out, sfx, dt, (lo, hi_q), keep, timed in outs:
            for hi in (False, True):
                sh = (shift - keep).clamp(min=0)  # `keep` more bits: outputs across the wider range
                if hi:
                    sh = sh.clamp(HI_SHIFTS[0], HI_SHIFTS[1])
                ref = reference_gemm(torch, x, w, bias, mult, sh, out_zp, lo, hi_q)
                args = [ffi.from_dlpack(t) for t in (x, w, bias, mult, sh)]
                for tile in GEMM_TILES:
                    fn, key = fns[(out, tile, hi)], f"qc {name(tile, hi)}{sfx}"
                    y = torch.empty((m, n), dtype=dt, device="cuda")
                    yt = ffi.from_dlpack(y)
                    try:
                        fn(*args, out_zp, lo, hi_q, yt)
                        torch.cuda.synchronize()
                    except Exception as e:  # report, keep measuring the rest
                        row[f"{key} error"] = str(e).splitlines()[0][:200]
                        continue
                    row[f"{key} exact"] = bool(torch.equal(y, ref))
                    if not row[f"{key} exact"]:
                        row[f"{key} mismatches"] = int((y != ref).sum())
                    if not edge and tile in timed:
                        ms = _device_ms(lambda: fn(*args, out_zp, lo, hi_q, yt))
                        row[f"{key} ms"] = ms
                        row[f"{key} TOP/s"] = 2 * m * n * k / ms / 1e9
        if not edge:
            wt = w.t()
            row["torch._int_mm ms"] = _device_ms(lambda: torch._int_mm(x, wt))
            row["torch._int_mm TOP/s"] = 2 * m * n * k / row["torch._int_mm ms"] / 1e9
            xb, wb = x.bfloat16(), w.bfloat16().t()
            row["bf16 matmul ms"] = _device_ms(lambda: xb @ wb)
            row["bf16 TFLOP/s"] = 2 * m * n * k / row["bf16 matmul ms"] / 1e9
            for tag, hi in (("", False), (" hi", True)):
                best = max((row.get(f"qc {name(t, hi)} TOP/s", 0.0), t) for t in GEMM_TILES)
                row[f"qc{tag} best tile"], row[f"qc{tag} best TOP/s"] = best[1], best[0]
            top = max(row["qc best TOP/s"], row["qc hi best TOP/s"])
            row["qc % of int8 peak"] = 100 * top / peak
            row["qc / _int_mm"] = top / row["torch._int_mm TOP/s"]
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def row_kernel_checks(prebuilt: Path) -> list[dict]:
    """qcompiler's row and table kernels (backends/tvm/kernels/int_rows.cu) against the reference
    kernels (qcompiler/int_ops.py) run by torch, bit for bit: softmax with masked and fully masked
    rows, ties, padded input and output rows (DeiT's 197 tokens), LUT with and without the
    per-channel requant after it, LayerNorm at zero and largest variance; each timed at a model's shape."""
    import torch
    ffi = load_kernels(prebuilt)
    from qcompiler import int_ops as I
    from qcompiler.backends.tvm import cuda_kernels as K
    from qcompiler.backends.tvm.translate import layer_norm_params, softmax_table
    f = ffi.get_global_func
    d = ffi.from_dlpack
    g = torch.Generator().manual_seed(0)
    rows = []

    def record(name, shape, ok, fn):
        ms = _device_ms(fn)
        rows.append({"kernel": name, "shape": shape, "bit-exact": bool(ok), "ms": ms})
        print(f"  {name:<34} {shape:<22} bit-exact {str(bool(ok)):<5}  {ms * 1e3:8.1f} us")

    def run_and_record(name, shape, call, ok):
        """call() once, then record it with ok() (its outputs against the reference) and its time"""
        call()
        torch.cuda.synchronize()
        record(name, shape, ok(), call)

    print("\nrow / table kernels (int_rows.cu) vs the reference kernels")
    for (b, h, s, n, ld) in ((32, 12, 128, 128, 128), (64, 6, 197, 197, 208), (2, 2, 5, 1000, 1008)):
        for masked in (True, False):
            x = torch.randint(-4000, 4000, (b, h, s, ld), dtype=torch.int16, generator=g)
            x[0, 0, 0] = 7  # ties
            keep = torch.rand(b, n, generator=g) > 0.25
            keep[min(1, b - 1)] = False  # fully masked rows
            tab = I.exp_table(0.004 if n != 1000 else 0.05, 65536)
            for mult, shift, out in ((2130706440, 24, (-128, 127)), (1428102791, 18, (-128, 127)),
                                     (12345, 0, (0, 255))):
                ref = I.int_softmax(x[..., :n], keep.view(b, 1, 1, n) if masked else None, tab, -1, mult, shift,
                                    out[0], *out)
                dt = I.int_dtype(*out)
                y = torch.full((b * h * s, ld), 99, dtype=dt, device="cuda")
                xg, tg = x.view(-1, ld).cuda(), torch.from_numpy(softmax_table(tab.numpy())).cuda()
                if masked:
                    mg = keep.cuda()
                    call = lambda: f(K.SOFTMAX_MASKED_FUNC)(d(xg), d(mg), d(tg), n, h * s, b, mult, shift, out[0],  # noqa
                                                            *out, d(y))
                else:
                    call = lambda: f(K.SOFTMAX_FUNC)(d(xg), d(tg), n, mult, shift, out[0], *out, d(y))  # noqa: E731
                call()
                torch.cuda.synchronize()
                yc = y.cpu()
                ok = torch.equal(yc[:, :n], ref.reshape(-1, n)) and not yc[:, n:].any()
                if mult == 2130706440:
                    record(f"int_softmax{' masked' if masked else ''}", f"{b * h * s}x{n} (ld {ld})", ok, call)
                elif not ok:
                    record(f"int_softmax mult {mult}", f"{b * h * s}x{n}", ok, call)
    for (m, c) in ((4096, 1536), (12608, 1536), (77, 96), (77, 100)):  # 100: not 8 | cols, the L1 kernel
        x = torch.randint(-32768, 32768, (m, c), dtype=torch.int16, generator=g)
        table = torch.randint(-32768, 32768, (65536,), dtype=torch.int16, generator=g)
        mu = torch.randint(2**30, 2**31 - 1, (c,), dtype=torch.int64, generator=g)
        sh = torch.randint(10, 30, (c,), dtype=torch.int64, generator=g)
        sh[:3] = torch.tensor([0, 1, 40])
        ref = I.requant(I.int_lut(x, table, -32768), 3, mu, sh, -2, -128, 127, -1)
        xg, tg, y = x.cuda(), table.cuda(), torch.empty(m, c, dtype=torch.int8, device="cuda")
        mg, sg = mu.cuda(), sh.cuda()
        call = lambda: f(K.LUT_REQUANT_FUNC)(d(xg), d(tg), -32768, 3, d(mg), d(sg), -2, -128, 127, d(y))  # noqa: E731
        call()
        torch.cuda.synchronize()
        record("int_lut + requant", f"{m}x{c}", torch.equal(y.cpu(), ref), call)
        # the hi variant (every shift 32..62, as cuda_kernels.lut_hi_ok admits): per channel and per tensor
        for per_channel in (True, False):
            sh_hi = torch.randint(32, 46, (c if per_channel else 1,), dtype=torch.int64, generator=g)
            sh_hi[:2] = torch.tensor([32, 62])[:sh_hi.numel()]
            mu_hi = mu if per_channel else mu[:1].clone()
            assert K.lut_hi_ok(3, mu_hi.numpy(), sh_hi.numpy(), -2)
            ref = I.requant(I.int_lut(x, table, -32768), 3, mu_hi, sh_hi, -2, -128, 127, -1)
            mg2, sg2 = mu_hi.cuda(), sh_hi.cuda()
            y.fill_(99)
            call = lambda: f(K.row_func(K.LUT_REQUANT_FUNC, True))(d(xg), d(tg), -32768, 3, d(mg2), d(sg2), -2,  # noqa
                                                                   -128, 127, d(y))
            call()
            torch.cuda.synchronize()
            if per_channel or not torch.equal(y.cpu(), ref):
                record(f"int_lut + requant (hi{'' if per_channel else ', per tensor'})", f"{m}x{c}",
                       torch.equal(y.cpu(), ref), call)
        y16 = torch.empty(m, c, dtype=torch.int16, device="cuda")
        call = lambda: f(K.LUT_FUNC)(d(xg), d(tg), -32768, d(y16))  # noqa: E731
        call()
        torch.cuda.synchronize()
        record("int_lut", f"{m}x{c}", torch.equal(y16.cpu(), I.int_lut(x, table, -32768)), call)
    for (m, c, out) in ((4096, 384, (-32768, 32767)), (12608, 384, (-128, 127)), (4096, 768, (-32768, 32767))):
        eps, k, gamma, beta, shift = I.layer_norm_consts(torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g),
                                                         c, 1e-5, 0.01, 0.05, in_levels=65536)
        x = torch.randint(-32768, 32768, (m, c), dtype=torch.int16, generator=g)
        x[0], x[1] = 5, torch.where(torch.arange(c) % 2 == 1, 32767, -32768)
        ref = I.int_layer_norm(x, 5, eps, k, gamma, beta, shift, 0, *out)
        xg, gg, bg = x.cuda(), gamma.cuda(), beta.cuda()
        y = torch.empty(m, c, dtype=I.int_dtype(*out), device="cuda")
        none = torch.zeros(c, dtype=torch.int64, device="cuda")
        prm = torch.from_numpy(layer_norm_params(None, [5, eps, k, shift, 0, *out], [0] * 4)).cuda()
        call = lambda: f(K.LAYER_NORM_FUNC)(d(xg), d(xg), d(prm), d(gg), d(bg), d(none), d(none), d(y))  # noqa: E731
        call()
        torch.cuda.synchronize()
        record("int_layer_norm", f"{m}x{c} -> {y.dtype}".replace("torch.", ""), torch.equal(y.cpu(), ref), call)
        assert K.ln_hi_ok(prm.cpu().numpy(), gamma.numpy(), c)
        y.fill_(99)
        call = lambda: f(K.row_func(K.LAYER_NORM_FUNC, True))(d(xg), d(xg), d(prm), d(gg), d(bg), d(none),  # noqa
                                                              d(none), d(y))
        run_and_record("int_layer_norm (hi)", f"{m}x{c} -> {y.dtype}".replace("torch.", ""), call,
                       lambda: torch.equal(y.cpu(), ref))
        # with the residual int_add before it and the per-channel int8 requant after it
        b = torch.randint(-32768, 32768, (m, c), dtype=torch.int16, generator=g)
        add = [3, 1439302324, -2, -881062436, 31, 1, -32768, 32767]
        x2 = I.int_add(x, add[0], add[1], b, *add[2:])
        ref = I.int_layer_norm(x2, 5, eps, k, gamma, beta, shift, 0, *out)
        mu = torch.randint(2**29, 2**31 - 1, (c,), dtype=torch.int64, generator=g)
        sh = torch.randint(10, 40, (c,), dtype=torch.int64, generator=g)
        sh[:2] = torch.tensor([0, 1])
        ref2 = I.requant(ref, 1, mu, sh, -3, -128, 127, -1)
        y2 = torch.empty(m, c, dtype=torch.int8, device="cuda")
        bg2, mg, sg = b.cuda(), mu.cuda(), sh.cuda()
        prm2 = torch.from_numpy(layer_norm_params(add, [5, eps, k, shift, 0, *out], [1, -3, -128, 127])).cuda()
        call = lambda: f(K.LAYER_NORM_REQUANT_FUNC)(d(xg), d(bg2), d(prm2), d(gg), d(bg), d(mg), d(sg), d(y),  # noqa
                                                    d(y2))
        call()
        torch.cuda.synchronize()
        record("int_add + int_layer_norm + requant", f"{m}x{c} -> {y.dtype}, int8".replace("torch.", ""),
               torch.equal(y.cpu(), ref) and torch.equal(y2.cpu(), ref2), call)
        # the hi variant: every shift 32..62 (cuda_kernels.ln_hi_ok), with and without the sum stored
        add_hi = [3, 1439302324, -2, -881062436, 33, 1, -32768, 32767]
        x3 = I.int_add(x, add_hi[0], add_hi[1], b, *add_hi[2:])
        ref = I.int_layer_norm(x3, 5, eps, k, gamma, beta, shift, 0, *out)
        sh3 = torch.randint(32, 50, (c,), dtype=torch.int64, generator=g)
        sh3[:2] = torch.tensor([32, 62])
        ref2 = I.requant(ref, 1, mu, sh3, -3, -128, 127, -1)
        prm3 = torch.from_numpy(layer_norm_params(add_hi, [5, eps, k, shift, 0, *out], [1, -3, -128, 127])).cuda()
        assert K.ln_hi_ok(prm3.cpu().numpy(), gamma.numpy(), c, mu.numpy(), sh3.numpy())
        sg3 = sh3.cuda()
        y.fill_(99), y2.fill_(99)
        call = lambda: f(K.row_func(K.LAYER_NORM_REQUANT_FUNC, True))(d(xg), d(bg2), d(prm3), d(gg), d(bg), d(mg),  # noqa
                                                                      d(sg3), d(y), d(y2))
        run_and_record("int_add + int_layer_norm + requant (hi)", f"{m}x{c} -> {y.dtype}, int8".replace("torch.", ""),
                       call, lambda: torch.equal(y.cpu(), ref) and torch.equal(y2.cpu(), ref2))
        xs = torch.empty(m, c, dtype=torch.int16, device="cuda")
        y.fill_(99)
        call = lambda: f(K.row_func(K.ADD_LAYER_NORM_FUNC, True))(d(xg), d(bg2), d(prm3), d(gg), d(bg), d(none),  # noqa
                                                                  d(none), d(xs), d(y))
        run_and_record("int_add (stored) + int_layer_norm (hi)", f"{m}x{c} -> {y.dtype}".replace("torch.", ""),
                       call, lambda: torch.equal(y.cpu(), ref) and torch.equal(xs.cpu(), x3))
    return rows


def attention_checks(prebuilt: Path) -> list[dict]:
    """qcompiler's fused attention kernel (backends/tvm/kernels/int_attention.cu) against the
    reference kernels run op by op by torch (int_matmul, requant, int_softmax, int_matmul, requant,
    the heads' merge, the per-channel requant), bit for bit: MiniLM / BERT-base / DeiT-S shapes
    (q, k, v read from the linears' layouts, DeiT's from one fused qkv tensor), fully masked rows,
    a query-dependent mask, saturating requants, int16 output; timed at each model's shape. The
    softmax table is int_ops.exp_table at the models' score scale (2e-4: about 59000 entries after
    the cut, more than L1 holds as int32), or a shorter one for the edge cases; the hi kernel's
    factor tables come from fuse_attention.exp_factors, with its margin k forced down to 2 in one
    edge case so that about half the entries take the kernel's gather path."""
    import torch
    ffi = load_kernels(prebuilt)
    from qcompiler import int_ops as I
    from qcompiler.backends.tvm import cuda_kernels as K
    from qcompiler.backends.tvm.fuse_attention import exp_factors, hi_ok, params
    from qcompiler.backends.tvm.translate import softmax_table
    f, d = ffi.get_global_func, ffi.from_dlpack
    g = torch.Generator().manual_seed(0)
    rows = []
    print("\nfused attention (int_attention.cu) vs the reference kernels op by op")
    # (name, batch, heads, seq, d, mask: None / "keys" / "rows", fused qkv, requant3, r1 range, timed,
    #  the table's scale, attention_hi's margin k: None as exp_factors chooses it)
    cases = [("MiniLM", 32, 12, 128, 32, "keys", False, False, (-32768, 32767), True, 2e-4, None),
             ("BERT-base", 32, 12, 128, 64, "keys", False, True, (-32768, 32767), True, 2e-4, None),
             ("DeiT-S", 64, 6, 197, 64, None, True, True, (-32768, 32767), True, 2e-4, None),
             ("edge", 3, 2, 77, 64, "rows", False, True, (-128, 127), False, 0.004, None),
             ("edge", 2, 3, 256, 32, None, True, False, (-32768, 32767), False, 2e-4, 2),
             ("edge", 2, 2, 33, 32, "keys", False, True, (-32768, 32767), False, 0.004, 2)]
    for name, b, h, s, dh, masked, fused, with_r3, r1_range, timed, tscale, kforce in cases:
        c = h * dh
        if fused:  # one [b, s, 3, h, dh] tensor, as a qkv linear writes it
            qkv = torch.randint(-128, 128, (b, s, 3 * c), dtype=torch.int8, generator=g)
            q4, k4, v4 = qkv.view(b, s, 3, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
            views = [[i * c, s * 3 * c, dh, 3 * c] for i in range(3)]
            srcs = [qkv] * 3
        else:
            srcs = [torch.randint(-128, 128, (b, s, c), dtype=torch.int8, generator=g) for _ in range(3)]
            q4, k4, v4 = (t.view(b, s, h, dh).transpose(1, 2) for t in srcs)
            views = [[0, s * c, dh, c]] * 3
        mask = None
        if masked == "keys":
            mask = torch.rand(b, 1, 1, s, generator=g) > 0.3
            mask[0] = False  # fully masked rows
            mstr = [s, 0, 0, 1]
        elif masked == "rows":
            mask = torch.rand(b, 1, s, s, generator=g) > 0.5
            mask[0, 0, :5] = False
            mstr = [s * s, 0, s, 1]
        else:
            mstr = [0, 0, 0, 0]
        tab = I.exp_table(tscale, 65536)
        tg = torch.from_numpy(softmax_table(tab.numpy())).cuda()
        fac, k, e0 = exp_factors(tg.cpu().numpy())
        k = kforce or k  # a smaller margin takes a subset of the entries exp_factors checked
        dev = [t.cuda() for t in srcs]
        mg = mask.cuda() if mask is not None else None
        for hi in (False, True):
            # hi: constants as fuse_attention.hi_ok admits them (in_zp 0, shifts 32..62), the kernel
            # attention_hi; otherwise requant1 with in_zp 3 and shifts below 32, attention_kernel
            if hi:
                c1 = [0, 1518500250, 36 if r1_range[1] > 127 else 40, -1, *r1_range]
                c2 = [0, 1398101333, 36 if with_r3 else 33, 0, -32768, 32767]
                s3 = torch.randint(32, 40, (c,), dtype=torch.int64, generator=g)
                s3[:2] = torch.tensor([32, 62])
            else:
                c1 = [3, 1518500250, 22 if r1_range[1] > 127 else 27, -1, *r1_range]
                c2 = [0, 1398101333, 28 if with_r3 else 24, 0, -32768, 32767]
                s3 = torch.randint(28, 36, (c,), dtype=torch.int64, generator=g)
                s3[:2] = torch.tensor([0, 1])  # saturating, exact ties
            sm = [2130706440, 24, 0, -128, 127]
            m3 = torch.randint(2**29, 2**31 - 1, (c,), dtype=torch.int64, generator=g)
            c3 = [1, m3, s3, -3, -128, 127] if with_r3 else None
            sc = I.requant(I.int_matmul(q4, 0, k4.transpose(-2, -1), 0), c1[0], torch.tensor(c1[1]),
                           torch.tensor(c1[2]), *c1[3:], -1)
            p = I.int_softmax(sc, mask, tab, -1, *sm[:3], *sm[3:])
            o = I.requant(I.int_matmul(p, 0, v4, 0), c2[0], torch.tensor(c2[1]), torch.tensor(c2[2]), *c2[3:], -1)
            ref = o.transpose(1, 2).reshape(b, s, c)
            if with_r3:
                ref = I.requant(ref, c3[0], m3, s3, -3, -128, 127, -1)
            prm = torch.from_numpy(params(*views, [0, s * c, dh, c], mstr, c1, sm, c2, c3, (k, e0) if hi else (0, 0)))
            m3c = m3 if with_r3 else torch.zeros(1, dtype=torch.int64)
            s3c = s3 if with_r3 else torch.zeros(1, dtype=torch.int64)
            assert hi_ok(prm.numpy(), m3c.numpy(), s3c.numpy()) == hi
            y = torch.full((b, s, c), 77, dtype=ref.dtype, device="cuda")
            pg, m3g, s3g = prm.cuda(), m3c.cuda(), s3c.cuda()
            fg = torch.from_numpy(fac).cuda()
            tail = [d(tg)] + ([d(fg)] if hi else []) + [d(pg), d(m3g), d(s3g), b, h, s, s, dh, d(y)]
            fn = f(K.attention_func(mask is not None, hi))
            if mask is not None:
                call = lambda: fn(*[d(t) for t in dev], d(mg), *tail)  # noqa: E731
            else:
                call = lambda: fn(*[d(t) for t in dev], *tail)  # noqa: E731
            call()
            torch.cuda.synchronize()
            ok = torch.equal(y.cpu(), ref)
            shape = f"{b}x{h}x{s}x{dh}" + (" qkv" if fused else "") + (f" mask/{masked}" if mask is not None else "") + \
                (f" k={k}" if hi and kforce else "")
            ms = _device_ms(call) if timed else None
            label = f"int_attention {name}" + (" (hi)" if hi else "")
            rows.append({"kernel": label, "shape": shape, "bit-exact": bool(ok), "ms": ms})
            print(f"  {label:<34} {shape:<30} bit-exact {str(bool(ok)):<5}"
                  + (f"  {ms * 1e3:8.1f} us" if ms is not None else ""))
    return rows


def print_kernel_table(rows, peak):
    print(f"\nint8 GEMM + fused requant (qcompiler, CUTLASS WGMMA; general / hi epilogue, best tile each) vs "
          f"torch._int_mm (int32 out) and bf16; TOP/s of device time; int8 dense peak {peak:.0f} TOP/s")
    print(f"{'shape':<20}{'M x N x K':>17}{'exact':>7}{'qc general':>19}{'qc hi':>19}{'% peak':>8}{'_int_mm':>9}"
          f"{'qc/_int_mm':>11}{'bf16 TF/s':>10}")
    for r in rows:
        exact = all(v for key, v in r.items() if key.endswith("exact")) and not any(key.endswith("error") for key in r)
        mnk = f"{r['M']}x{r['N']}x{r['K']}"
        if "qc best TOP/s" not in r:
            print(f"{r['shape']:<20}{mnk:>17}{str(exact):>7}")
            continue
        gen = f"{r['qc best TOP/s']:.0f} {r['qc best tile']}"
        hi = f"{r['qc hi best TOP/s']:.0f} {r['qc hi best tile']}"
        print(f"{r['shape']:<20}{mnk:>17}{str(exact):>7}{gen:>19}{hi:>19}{r['qc % of int8 peak']:>7.0f}%"
              f"{r['torch._int_mm TOP/s']:>9.0f}{r['qc / _int_mm']:>10.2f}x{r['bf16 TFLOP/s']:>10.0f}")


# -- models ---------------------------------------------------------------------------------------
MODELS = {"minilm": 32, "bert-base": 32, "deit-s": 64}  # name -> batch (static shapes: TVM's GPU schedules need them)
SEQ = 128


def build_module(name: str, real_weights: bool):
    """The model, seeded. MiniLM: all-MiniLM-L6-v2's real weights where `real_weights` (here),
    else the same architecture seeded (the GPU machine lacks the weights package; speed does not
    depend on the values). BERT-base-size: 12 x 768, 12 heads, FFN 3072, vocab 2048 (the vocab
    only sizes the embedding gather). DeiT-S-size: 224^2 x 3 images, 16^2 patches (197 tokens),
    12 x 384, 6 heads, MLP x4, 1000 classes. `real_weights` (prepare, here) also means, for the
    two random-weight models, the row-repeated weights of _tile_rows that their artifacts carry."""
    import torch
    from qcompiler.models.fashion import FashionViT
    from qcompiler.models.minilm import MiniLMEncoder
    torch.manual_seed(0)
    if name == "minilm":
        if real_weights:
            from qcompiler.models import zoo
            return zoo.get("minilm").module
        m = MiniLMEncoder()
    elif name == "bert-base":
        m = MiniLMEncoder(vocab=2048, dim=768, layers=12, heads=12, hidden=3072)
    elif name == "deit-s":
        m = FashionViT(patch=16, dim=384, depth=12, heads=6, mlp_ratio=4, classes=1000, size=224, channels=3)
    else:
        raise KeyError(name)
    if name != "minilm" and real_weights:
        _tile_rows(m)
    return m.eval()


TILE_ROWS = 16


def _tile_rows(m):
    """Random weights repeated every TILE_ROWS output rows (and embedding rows), for the artifacts
    `prepare` builds of the random-weight models: their int8 weights then compress ~TILE_ROWS-fold,
    so the prepared directory fits the GPU machine's 64 MiB transfer. Integer GEMM speed does not
    depend on the values (no sparsity); the torch rows use plain seeded random weights."""
    import torch
    with torch.no_grad():
        for mod in m.modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.nn.Parameter) and w.dim() >= 2 and w.shape[0] > TILE_ROWS:
                w.copy_(w[:TILE_ROWS].repeat(-(-w.shape[0] // TILE_ROWS), *[1] * (w.dim() - 1))[: w.shape[0]])


def model_inputs(name: str, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "deit-s":
        return {"image": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
    vocab = 2048 if name == "bert-base" else 30522
    ids = rng.integers(1000 if vocab > 1000 else 1, vocab, (batch, SEQ)).astype(np.int64)
    mask = np.ones((batch, SEQ), np.int64)
    mask[: batch // 2, SEQ * 3 // 4:] = 0  # half the rows padded: the masked softmax path runs too
    return {"input_ids": ids, "attention_mask": mask}


def _input_names(name):
    return ["image"] if name == "deit-s" else ["input_ids", "attention_mask"]


def _calib(name: str, n: int = 32):
    if name == "minilm":  # real sentences, padded to the static sequence length
        from qcompiler.models import zoo
        c = zoo.get("minilm").calib(n)
        return {k: np.pad(v, ((0, 0), (0, SEQ - v.shape[1]))) for k, v in c.items()}
    return model_inputs(name, n, seed=1)


def prepare_model(name: str, out: Path) -> dict:
    import torch
    import qcompiler
    mod = build_module(name, real_weights=True)
    names = _input_names(name)
    ex = model_inputs(name, MODELS[name], seed=2)
    g = qcompiler.trace(mod, tuple(torch.from_numpy(ex[k]) for k in names), input_names=names, dynamic=None)
    calib = _calib(name, MODELS[name])  # one batch of the static shape
    cfg = dict(calib_batch_size=MODELS[name])
    t0 = time.perf_counter()
    art = qcompiler.compile(g.copy(), calib, config=qcompiler.Config(target="tvm-cuda", **cfg))
    build_s = time.perf_counter() - t0
    art.save(out / name)
    ref = qcompiler.compile(g.copy(), calib, config=qcompiler.Config(target="reference", integer=True, **cfg))
    check = model_inputs(name, MODELS[name], seed=CHECK_SEED)
    with tempfile.TemporaryDirectory() as d:
        got = qcompiler.load(ref.save(Path(d) / "ref"))(check)
    # the inputs are regenerated from their seed on the GPU machine (DeiT-S's images are 38 MB of
    # incompressible floats); their sha256 here guards that numpy draws the same numbers there
    np.savez(out / name / "check.npz", **{f"sha.{k}": np.array(_sha(v)) for k, v in check.items()},
             **{f"out.{k}": v for k, v in got.items()})
    sizes = {f: (out / name / f).stat().st_size for f in art.manifest["files"]}
    kernels = sum(1 for f in sizes if f.startswith("libqc"))
    print(f"{name}: built in {build_s:.0f} s, files {sizes}, kernel library {'yes' if kernels else 'no'}")
    return {"build_s": build_s, "files": sizes}


CHECK_SEED = 3


def _sha(a: np.ndarray) -> str:
    import hashlib
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _check_inputs(name: str, chk) -> dict[str, np.ndarray]:
    feeds = model_inputs(name, MODELS[name], seed=CHECK_SEED)
    for k, v in feeds.items():
        if _sha(v) != str(chk[f"sha.{k}"]):
            raise RuntimeError(f"check input {k}: numpy here draws other numbers from seed {CHECK_SEED} than at prepare")
    return feeds


def _time_host(fn, sync, iters: int = 30, warmup: int = 5) -> float:
    """Median ms of fn() then sync(), wall clock (what a caller of the model sees)."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return float(np.median(ts))


PROFILE = False  # run --profile: where the artifact's time goes, per CUDA kernel


def _kernel_profile(fn, runs: int = 10, top: int = 12) -> list[dict]:
    """fn()'s CUDA kernels by device time per run, largest first, after their total."""
    rows = sorted(_kernels_per_call(fn, runs, warmup=1), key=lambda r: -r["ms per run"])
    total = sum(r["ms per run"] for r in rows)
    print(f"    kernels: {total:.2f} ms of device time per run; the largest:")
    for r in rows[:top]:
        print(f"    {r['ms per run']:8.3f} ms {r['calls per run']:5.0f}x  {r['kernel'][:90]}")
    return [{"total device ms per run": total}] + rows[:40]


def _to_cuda(gm):
    """A traced GraphModule on the GPU: parameters, buffers, plain tensor attributes, and the
    `device=` of tensors it creates (torch.export records the tracing device, the CPU)."""
    import torch
    gm = gm.cuda()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            obj = gm
            *path, last = n.target.split(".")
            for p in path:
                obj = getattr(obj, p)
            t = getattr(obj, last)
            if isinstance(t, torch.Tensor) and not t.is_cuda and not isinstance(t, torch.nn.Parameter):
                setattr(obj, last, t.cuda())
        if isinstance(n.kwargs.get("device"), torch.device) and n.kwargs["device"].type == "cpu":
            n.kwargs = {**n.kwargs, "device": torch.device("cuda")}
    gm.recompile()
    return gm


class _Skipped(Exception):
    pass


COMPILE_ONLY = False  # run --baselines compile: bf16 torch.compile alone beside the artifact


def model_rows(prebuilt: Path, name: str) -> dict:
    import torch
    import qcompiler
    batch = MODELS[name]
    names = _input_names(name)
    feeds = model_inputs(name, batch, seed=4)
    row = {"model": name, "batch": batch}
    sync = torch.cuda.synchronize
    mod = build_module(name, real_weights=False).cuda()
    xs = [torch.from_numpy(feeds[k]).cuda() for k in names]
    with torch.no_grad():
        mb = build_module(name, real_weights=False).cuda().to(torch.bfloat16)
        xb = [x.to(torch.bfloat16) if x.is_floating_point() else x for x in xs]
        if not COMPILE_ONLY:
            row["fp32 eager ms"] = _time_host(lambda: mod(*xs), sync)
            row["bf16 eager ms"] = _time_host(lambda: mb(*xb), sync)
        try:
            mc = torch.compile(mb)
            row["bf16 torch.compile ms"] = _time_host(lambda: mc(*xb), sync)
            # device time too: the wall clock of a launch-bound baseline moves with the host's load
            row["bf16 torch.compile device ms"] = _device_ms(lambda: mc(*xb), iters=10)
        except Exception as e:
            row["bf16 torch.compile error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        try:  # qcompiler's W8A8 fake-quant graph, calibrated here on the seeded model, run by torch on the GPU
            if COMPILE_ONLY:
                raise _Skipped
            g = qcompiler.trace(build_module(name, real_weights=False), tuple(torch.from_numpy(model_inputs(name, batch, 2)[k])
                                for k in names), input_names=names, dynamic=None)
            from qcompiler.calib import CalibData
            _, qg, _ = qcompiler.compiler.quantize(g, CalibData(model_inputs(name, batch, 1), batch_size=batch),
                                                   qcompiler.Config(calib_batch_size=batch))
            gm = _to_cuda(qg.gm)
            row["qcompiler W8A8 fake-quant (torch eager) ms"] = _time_host(lambda: gm(*xs), sync)
        except _Skipped:
            pass
        except Exception as e:
            row["fake-quant error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    del mod, mb
    torch.cuda.empty_cache()
    art_dir = prebuilt / name
    if (art_dir / "model.so").is_file():
        try:
            cm = qcompiler.load(art_dir)
            r = cm.runner
            chk = np.load(art_dir / "check.npz")
            got = r.run(_check_inputs(name, chk))
            row["tvm-cuda bit-exact vs reference"] = all(np.array_equal(got[k], chk[f"out.{k}"]) for k in got)
            if not row["tvm-cuda bit-exact vs reference"]:
                row["tvm-cuda max abs diff"] = float(max(np.abs(got[k].astype(np.float64) - chk[f"out.{k}"]).max()
                                                         for k in got))
            dev = [r.to_device(feeds[k]) for k in names]
            row["qcompiler tvm-cuda integer ms"] = _time_host(lambda: r.fn(*dev), sync)
            if PROFILE:  # one profile gives both the kernel list and the device time
                row["tvm-cuda kernels"] = _kernel_profile(lambda: r.fn(*dev))
                row["qcompiler tvm-cuda integer device ms"] = row["tvm-cuda kernels"][0]["total device ms per run"]
            else:
                row["qcompiler tvm-cuda integer device ms"] = _device_ms(lambda: r.fn(*dev), iters=10)
        except Exception as e:
            row["tvm-cuda error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    base = row.get("bf16 torch.compile ms")
    if base:
        for k in list(row):
            if k.endswith(" ms") and not k.endswith(" device ms"):
                row[k.replace(" ms", " speedup vs bf16 compile")] = base / row[k]
    if row.get("bf16 torch.compile device ms") and row.get("qcompiler tvm-cuda integer device ms"):
        row["tvm-cuda device-time speedup vs bf16 compile"] = (row["bf16 torch.compile device ms"] /
                                                               row["qcompiler tvm-cuda integer device ms"])
    return row


def print_model_rows(rows):
    cols = ["fp32 eager", "bf16 eager", "bf16 torch.compile", "qcompiler W8A8 fake-quant (torch eager)",
            "qcompiler tvm-cuda integer"]
    print("\nend to end, median ms (speedup vs bf16 torch.compile)")
    print(f"{'model':<11}{'batch':>6}" + "".join(f"{c[:26]:>28}" for c in cols) + f"{'bit-exact':>11}")
    for r in rows:
        cells = []
        for c in cols:
            ms = r.get(f"{c} ms")
            cells.append(f"{ms:.2f} ({r[c + ' speedup vs bf16 compile']:.2f}x)" if ms and
                         f"{c} speedup vs bf16 compile" in r else (f"{ms:.2f}" if ms else "-"))
        print(f"{r['model']:<11}{r['batch']:>6}" + "".join(f"{c:>28}" for c in cells) +
              f"{str(r.get('tvm-cuda bit-exact vs reference', '-')):>11}")
        if "tvm-cuda device-time speedup vs bf16 compile" in r:
            print(f"{'':<17}device time: bf16 torch.compile {r['bf16 torch.compile device ms']:.2f} ms, tvm-cuda "
                  f"{r['qcompiler tvm-cuda integer device ms']:.2f} ms "
                  f"({r['tvm-cuda device-time speedup vs bf16 compile']:.2f}x)")
        for k, v in r.items():
            if "error" in k:
                print(f"    {k}: {v}")


def run(args) -> int:
    import torch
    prebuilt = unpack(Path(args.prebuilt).resolve())
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in INT8_PEAK_TOPS.items() if k in name), 1979.0)
    out = {"device": name, "torch": torch.__version__, "int8_peak_tops": peak, "when": time.strftime("%Y-%m-%d %H:%M")}
    print(f"device: {name}, torch {torch.__version__}")
    if args.part in ("kernels", "all"):
        out["kernels"] = kernel_table(prebuilt, peak)
        print_kernel_table(out["kernels"], peak)
    if args.part in ("rows", "all"):
        out["row kernels"] = row_kernel_checks(prebuilt) + attention_checks(prebuilt)
    if args.part in ("models", "all"):
        out["models"] = []
        for name in args.models.split(","):
            out["models"].append(model_rows(prebuilt, name))
            print_model_rows(out["models"][-1:])
            dest = Path(args.json)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(out, indent=1))  # what is done so far survives a timeout
        print_model_rows(out["models"])
    dest = Path(args.json)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {dest}")
    return 0


def pack(out: Path) -> Path:
    """out/ as one xz tarball (what is carried to the GPU machine); `run --prebuilt X.tar.xz`
    unpacks it."""
    import tarfile
    dest = out.with_name(out.name + ".tar.xz")
    # preset 9: a 64 MiB dictionary, so each artifact's copy of the same runtime and kernel libraries
    # compresses to almost nothing after the first
    with tarfile.open(dest, "w:xz", preset=9) as tf:
        tf.add(out, arcname=out.name)
    print(f"packed {out} -> {dest} ({dest.stat().st_size / 2**20:.1f} MiB)")
    return dest


def unpack(prebuilt: Path) -> Path:
    import tarfile
    if prebuilt.is_dir():
        return prebuilt
    d = Path(tempfile.mkdtemp(prefix="qc-gpu-"))
    with tarfile.open(prebuilt) as tf:
        tf.extractall(d, filter="data")
    return next(d.iterdir())


def relink(out: Path, lib: Path) -> None:
    """Put kernel library `lib` into every artifact prepared under `out` (and its manifest's sha256):
    what a fresh `prepare` gives when only the kernels' code changed, not their names, their
    arguments or the translation (model.so, which calls them by name, is then the same)."""
    import shutil
    from qcompiler.artifact import dumps_manifest, sha256
    from qcompiler.backends.tvm.cuda_kernels import LIB_NAME
    data = lib.read_bytes()
    for man in sorted(out.glob("*/manifest.json")):
        m = json.loads(man.read_text())
        if LIB_NAME in m.get("files", {}):
            shutil.copy(lib, man.parent / LIB_NAME)
            m["files"][LIB_NAME] = {"sha256": sha256(data), "bytes": len(data)}
            man.write_bytes(dumps_manifest(m))
            print(f"{man.parent.name}: kernel library replaced")


def prepare(args) -> int:
    import shutil
    from qcompiler.backends.tvm.cuda_kernels import LIB_NAME, build_library
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shutil.copy(build_library("sm_90"), out / LIB_NAME)
    print(f"kernel library: {out / LIB_NAME} ({time.perf_counter() - t0:.0f} s)")
    if args.kernels_only:
        relink(out, out / LIB_NAME)
        if args.pack:
            pack(out)
        return 0
    for name in args.models.split(","):
        if name:
            prepare_model(name, out)
    if args.pack:
        pack(out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="build the kernel library and the artifacts (needs apache-tvm and nvcc)")
    pp.add_argument("--out", default=".gpu")
    pp.add_argument("--models", default=",".join(MODELS))
    pp.add_argument("--pack", action="store_true", help="also write OUT.tar.xz (what `run --prebuilt` takes)")
    pp.add_argument("--kernels-only", action="store_true",
                    help="rebuild the kernel library alone and put it into the artifacts already in OUT (for a "
                         "change inside backends/tvm/kernels that keeps each kernel's name and arguments)")
    pr = sub.add_parser("run", help="measure on the GPU machine")
    pr.add_argument("--prebuilt", default=".gpu")
    pr.add_argument("--part", choices=("kernels", "rows", "models", "all"), default="all",
                    help="kernels: the GEMM table; rows: the row and attention kernels' checks; models: end to end")
    pr.add_argument("--json", default=str(RESULTS / "gpu.json"))
    pr.add_argument("--models", default=",".join(MODELS))
    pr.add_argument("--profile", action="store_true", help="also list each artifact's CUDA kernels by device time")
    pr.add_argument("--baselines", choices=("all", "compile"), default="all",
                    help="compile: time only bf16 torch.compile beside the artifact (the ratio's baseline), skipping "
                         "FP32 eager, bf16 eager and the fake-quant graph, where device time is short")
    pr.add_argument("--check-only", action="store_true",
                    help="check bit-exactness, time nothing (for running under ncu or compute-sanitizer)")
    args = p.parse_args(argv)
    global PROFILE, COMPILE_ONLY, CHECK_ONLY
    CHECK_ONLY = getattr(args, "check_only", False)
    PROFILE = getattr(args, "profile", False)
    COMPILE_ONLY = getattr(args, "baselines", "all") == "compile"
    return prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
