// qcompiler's row and table kernels for tvm-cuda: qc::int_softmax, qc::int_lut (with the requant
// after it) and qc::int_layer_norm, each ONE kernel, in the integer arithmetic of their reference
// kernels (qcompiler/int_ops.py), bit for bit. TVM's dlight schedules write each of these ops as
// three to five int64 kernels with int64 intermediates in device memory; here a warp owns a row
// (softmax, LayerNorm) and keeps everything in registers and L1.
//
// Exported through tvm_ffi (called from the Relax graph with R.call_dps_packed):
//   qc.cuda.int_softmax(x [R, LX], table [T] int32, n, mult, shift, out_zp, qmin, qmax, y [R, LY])
//   qc.cuda.int_softmax_masked(x [R, LX], mask [Rm, n] bool, table, n, mdiv, mmod, mult, shift, out_zp,
//                              qmin, qmax, y)                   (mask row of row r: (r / mdiv) % mmod)
//     softmax over the first n entries of each row (LX, LY >= n: rows padded for the int8 GEMMs'
//     16-byte TMA rows); y's entries n .. LY-1 are written 0 (zero padding along the next GEMM's K)
//   qc.cuda.int_lut(x [E], table [T] int16, offset, y [E])
//   qc.cuda.int_lut_requant(x [E], table [T] int16, offset, in_zp, mult [C] int64, shift [C] int64,
//                           out_zp, qmin, qmax, y [E])          (C: 1 or x's last dim)
//   qc.cuda.int_layer_norm(a [R, C], b [R, C], params [L_LEN] int64, gamma [C] int64, beta [C] int64,
//                          rq_mult [C] int64, rq_shift [C] int64, y [R, C])
//   qc.cuda.int_layer_norm_requant(... the same ..., y [R, C], y2 [R, C] int8)
//   qc.cuda.int_add_layer_norm(... the same ..., x [R, C], y [R, C])   x: the int_add's sum (a's dtype)
//     LayerNorm of a, or of int_add(a, b) (params[L_ADD]); y2: the per-channel requant of y
//   qc.cuda.int_lut_requant_hi, qc.cuda.int_layer_norm_hi, qc.cuda.int_layer_norm_requant_hi,
//   qc.cuda.int_add_layer_norm_hi: the same functions in 32-bit words, for constants that
//     cuda_kernels.lut_hi_ok / ln_hi_ok admit (every shift 32..62, ...): see layer_norm_hi
// x: int8 / int16; y: int8 / uint8 / int16 (the translation declines other dtypes).
//
// What the translation (backends/tvm/translate.py) guarantees before calling them:
// softmax: table entries in [0, 2^31), non-increasing past their first zero (so the table may be
// cut after it), |mult| * max(table) < 2^53 and N * max(table) < 2^53 (so e * mult and the row
// sum are exact in float64, which the division's estimate uses), 0 <= shift <= 62.
#include <climits>
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include "qc_int.cuh"

namespace qc_rows {

using tvm::ffi::TensorView;
using qc_int::clamp64;
using qc_int::numel;
using qc_int::rshift_round;
using qc_int::stream_of;

constexpr int kWarps = 8;  // rows per block (a warp per row)

// floor(a / b) for b >= 1 (torch's floor division), any int64 a
__device__ __forceinline__ int64_t floordiv64(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

__device__ __forceinline__ int64_t warp_max(int64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    int64_t w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

__device__ __forceinline__ int64_t warp_sum(int64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- int_softmax ------------------------------------------------------------------------------
// d = max(x) - x over the kept entries; e = table[min(d, T - 1)] (0 where masked); S = max(sum e, 1);
// y = clamp(rshift_round(floor(e * mult / S), shift) + out_zp, qmin, qmax). A fully masked row: out_zp.
// e * mult / S rounded down: qc_int::floordiv_est from a per-row float64 estimate of mult / S
template <class Out>
__device__ __forceinline__ void softmax_store(Out* yr, int64_t j, int64_t e, int64_t mult, int64_t s, double inv,
                                              int64_t shift, int64_t out_zp, int64_t qmin, int64_t qmax) {
  int64_t t = qc_int::floordiv_est(e * mult, s, static_cast<double>(e) * inv);
  yr[j] = static_cast<Out>(clamp64(rshift_round(t, shift) + out_zp, qmin, qmax));
}

// VPL > 0: rows of n <= 32 VPL, each lane keeping its VPL values and table entries in registers
// (one read of the row); VPL = 0: any n, three passes over the row (L1).
template <class In, class Out, bool Masked, int VPL>
__global__ void __launch_bounds__(kWarps * 32) softmax_rows(const In* __restrict__ x, const int8_t* __restrict__ mask,
                                                            const int32_t* __restrict__ tab, int64_t tlen, int64_t rows,
                                                            int64_t n, int64_t ldx, int64_t ldy, int64_t mdiv,
                                                            int64_t mmod, int64_t mult, int64_t shift, int64_t out_zp,
                                                            int64_t qmin, int64_t qmax, Out* __restrict__ y) {
  int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const In* xr = x + row * ldx;
  const int8_t* mr = Masked ? mask + ((row / mdiv) % mmod) * n : nullptr;
  Out* yr = y + row * ldy;
  const int64_t top = tlen - 1;
  // the row max over kept entries, in int32 (every input dtype fits): INT32_MIN where none is
  // kept is never read (every e is then 0)
  int32_t mx = INT32_MIN;
  if constexpr (VPL > 0) {
    int32_t v[VPL];
    bool keep[VPL];
#pragma unroll
    for (int k = 0; k < VPL; ++k) {
      int j = lane + 32 * k;
      keep[k] = j < n && (!Masked || mr[j]);
      v[k] = keep[k] ? int32_t(xr[j]) : 0;
      if (keep[k]) mx = v[k] > mx ? v[k] : mx;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    int32_t e[VPL];
    int64_t s = 0;
#pragma unroll
    for (int k = 0; k < VPL; ++k) {
      int64_t d = int64_t(mx) - v[k];
      e[k] = keep[k] ? __ldg(tab + (d < top ? d : top)) : 0;
      s += e[k];
    }
    s = warp_sum(s);
    s = s < 1 ? 1 : s;
    const double inv = static_cast<double>(mult) / static_cast<double>(s);
#pragma unroll
    for (int k = 0; k < VPL; ++k) {
      int j = lane + 32 * k;
      if (j < n) softmax_store(yr, j, e[k], mult, s, inv, shift, out_zp, qmin, qmax);
    }
  } else {
    for (int64_t j = lane; j < n; j += 32) {
      if (!Masked || mr[j]) {
        int32_t v = int32_t(xr[j]);
        mx = v > mx ? v : mx;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    int64_t s = 0;
    for (int64_t j = lane; j < n; j += 32) {
      if (!Masked || mr[j]) {
        int64_t d = int64_t(mx) - int64_t(xr[j]);
        s += __ldg(tab + (d < top ? d : top));
      }
    }
    s = warp_sum(s);
    s = s < 1 ? 1 : s;
    const double inv = static_cast<double>(mult) / static_cast<double>(s);
    for (int64_t j = lane; j < n; j += 32) {
      int64_t e = 0;
      if (!Masked || mr[j]) {
        int64_t d = int64_t(mx) - int64_t(xr[j]);
        e = __ldg(tab + (d < top ? d : top));
      }
      softmax_store(yr, j, e, mult, s, inv, shift, out_zp, qmin, qmax);
    }
  }
  for (int64_t j = n + lane; j < ldy; j += 32) yr[j] = Out(0);
}

// ---- int_lut (+ requant) ----------------------------------------------------------------------
// The table is int16 (every table dtype the translation passes, int8 / uint8 / int16, fits).
// lut_smem: the whole table in shared memory (a 65536-entry table of an int16 input is 128 KiB,
// which L1 would not hold beside the streamed data), one block of 1024 threads per SM, each thread
// 8 entries per step (16-byte loads of x). A thread's steps are a grid's width apart; where that
// width is a multiple of the row's chunks (132 SMs x 1024 threads for rows of 1536 or 3072) they
// all fall in the same 8 columns, whose per-channel requant constants the thread then loads once
// (ncu on an H100 found the kernel bound by L1 throughput while it loaded 128 bytes of them per
// step). lut_kernel: any shape, the table through L1.
constexpr int kLutThreads = 1024;

// 8 int64 constants from a 16-byte aligned address, in registers (no local array behind them)
__device__ __forceinline__ void load8_i64(const int64_t* __restrict__ p, int64_t (&v)[8]) {
#pragma unroll
  for (int i = 0; i < 8; i += 2) {
    const int4 r = __ldg(reinterpret_cast<const int4*>(p + i));
    v[i] = int64_t((uint64_t(uint32_t(r.y)) << 32) | uint32_t(r.x));
    v[i + 1] = int64_t((uint64_t(uint32_t(r.w)) << 32) | uint32_t(r.z));
  }
}

template <class Out, bool Rq, bool Hi>
__global__ void __launch_bounds__(kLutThreads)
    lut_smem(const int16_t* __restrict__ x, const int16_t* __restrict__ tab, int64_t tlen, int64_t offset,
             int64_t chunks, int64_t cols, int64_t in_zp, const int64_t* __restrict__ mult,
             const int64_t* __restrict__ shift, bool per_channel, int64_t out_zp, int64_t qmin, int64_t qmax,
             Out* __restrict__ y) {
  extern __shared__ __align__(16) int16_t st[];
  // the table: 16 bytes a load where it is whole 16-byte pieces at a 16-byte address, then the tail
  int64_t done = 0;
  if (reinterpret_cast<uintptr_t>(tab) % 16 == 0) {
    done = tlen / 8 * 8;
    for (int i = threadIdx.x; i < int(tlen / 8); i += kLutThreads)
      reinterpret_cast<int4*>(st)[i] = __ldg(reinterpret_cast<const int4*>(tab) + i);
  }
  for (int64_t i = done + threadIdx.x; i < tlen; i += kLutThreads) st[i] = tab[i];
  __syncthreads();
  const int32_t off32 = int32_t(offset), top32 = int32_t(tlen - 1);  // the host checked |offset| < 2^30
  // y of 8 entries of x (one 16-byte load) with the requant constants of their 8 columns
  auto step = [&](int64_t ch, const int64_t (&mv)[8], const int64_t (&sv)[8]) {
    const int4 raw = __ldg(reinterpret_cast<const int4*>(x) + ch);
    const uint32_t w[4] = {uint32_t(raw.x), uint32_t(raw.y), uint32_t(raw.z), uint32_t(raw.w)};
    int32_t o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int32_t xe = int32_t(int16_t(uint16_t(w[e >> 1] >> (16 * (e & 1)))));
      int64_t v = st[qc_int::clamp32(xe - off32, 0, top32)];
      if (Rq && Hi)  // every shift 32..62, |in_zp| <= 2^16 (the translation checked): 32-bit words
        v = qc_int::requant_hi(int32_t(v) - int32_t(in_zp), int32_t(mv[e]), int32_t(sv[e]), int32_t(out_zp),
                               int32_t(qmin), int32_t(qmax));
      else if (Rq)
        v = qc_int::requant(v, in_zp, mv[e], sv[e], out_zp, qmin, qmax);
      o[e] = int32_t(v);
    }
    if constexpr (sizeof(Out) == 2) {
      int4 pk;
      pk.x = int((uint32_t(uint16_t(o[0]))) | (uint32_t(uint16_t(o[1])) << 16));
      pk.y = int((uint32_t(uint16_t(o[2]))) | (uint32_t(uint16_t(o[3])) << 16));
      pk.z = int((uint32_t(uint16_t(o[4]))) | (uint32_t(uint16_t(o[5])) << 16));
      pk.w = int((uint32_t(uint16_t(o[6]))) | (uint32_t(uint16_t(o[7])) << 16));
      reinterpret_cast<int4*>(y)[ch] = pk;
    } else {
      int2 pk;
      pk.x = int(uint32_t(uint8_t(o[0])) | (uint32_t(uint8_t(o[1])) << 8) | (uint32_t(uint8_t(o[2])) << 16) |
                 (uint32_t(uint8_t(o[3])) << 24));
      pk.y = int(uint32_t(uint8_t(o[4])) | (uint32_t(uint8_t(o[5])) << 8) | (uint32_t(uint8_t(o[6])) << 16) |
                 (uint32_t(uint8_t(o[7])) << 24));
      reinterpret_cast<int2*>(y)[ch] = pk;
    }
  };
  const int64_t per_row = cols / 8, nthreads = int64_t(gridDim.x) * kLutThreads;
  const int64_t first = int64_t(blockIdx.x) * kLutThreads + threadIdx.x;
  int64_t mv[8], sv[8];
  if (!Rq || !per_channel || nthreads % per_row == 0) {
    // every chunk of this thread is in the same 8 columns (the host sizes the grid so where it can):
    // their constants once, in registers
    if (Rq && per_channel) {
      const int64_t c0 = (first % per_row) * 8;
      load8_i64(mult + c0, mv);
      load8_i64(shift + c0, sv);
    } else if (Rq) {
      const int64_t m0 = __ldg(mult), s0 = __ldg(shift);
#pragma unroll
      for (int e = 0; e < 8; ++e) mv[e] = m0, sv[e] = s0;
    }
    for (int64_t ch = first; ch < chunks; ch += nthreads) step(ch, mv, sv);
  } else {
    // columns in 32 bits where every element index fits (a 64-bit remainder is a long software routine)
    const bool narrow = chunks * 8 < (int64_t(1) << 32);
    for (int64_t ch = first; ch < chunks; ch += nthreads) {
      const int64_t c0 = narrow ? int64_t(uint32_t(ch * 8) % uint32_t(cols)) : (ch * 8) % cols;
      load8_i64(mult + c0, mv);  // c0 is a multiple of 8; the host checks alignment
      load8_i64(shift + c0, sv);
      step(ch, mv, sv);
    }
  }
}

// x viewed as [rows, cols]: y = table[clamp(x - offset, 0, T - 1)]; with Rq:
// y = clamp(rshift_round((y - in_zp) * mult[c], shift[c]) + out_zp, qmin, qmax) (c the column, or 0
// for per-tensor constants). A thread owns a column (its constants in registers) and walks rows.
template <class In, class Out, bool Rq>
__global__ void lut_kernel(const In* __restrict__ x, const int16_t* __restrict__ tab, int64_t tlen, int64_t offset,
                           int64_t rows, int64_t cols, int64_t in_zp, const int64_t* __restrict__ mult,
                           const int64_t* __restrict__ shift, bool per_channel, int64_t out_zp, int64_t qmin,
                           int64_t qmax, Out* __restrict__ y) {
  int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  int64_t m = 0, sh = 0;
  if (Rq) {
    m = __ldg(mult + (per_channel ? c : 0));
    sh = __ldg(shift + (per_channel ? c : 0));
  }
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += int64_t(gridDim.y) * blockDim.y) {
    int64_t i = r * cols + c;
    int64_t k = clamp64(int64_t(x[i]) - offset, 0, tlen - 1);
    int64_t v = __ldg(tab + k);
    if (Rq) v = clamp64(rshift_round((v - in_zp) * m, sh) + out_zp, qmin, qmax);
    y[i] = static_cast<Out>(v);
  }
}

// ---- int_layer_norm (with the residual int_add before it and the requant after it) -------------
// int_ops.int_layer_norm, a warp per row of C:
//   x' = x - x_zp; d = C x' - sum(x'); V = (floor(sum(d^2) / C) + eps) * 2^k; r = isqrt(V);
//   inv = r > 0 ? floor(2^56 / r) : 0; n = rshift_round(d * inv, 40 - k/2);
//   y = clamp(rshift_round(n * gamma_c + beta_c, shift) + out_zp, qmin, qmax)
// With Add, x is int_add(a, b) (int_ops.int_add: clamp(rshift_round((a - a_zp) a_mult + (b - b_zp) b_mult,
// add_shift) + add_zp, add_lo, add_hi)), computed here and never stored; without, x is a. With a
// requant (y2 != nullptr), also y2 = requant(y) per channel (rq_mult_c, rq_shift_c) in int8: the
// LayerNorm's two readers, the residual (y) and the next linears (y2), from one kernel.
// The scalar constants come in `prm` (L_* below). Over the lane's entries of the row: j = lane,
// lane + 32, ...; k counts them. VPL > 0 (rows of C <= 32 VPL): x kept in registers (xk); VPL = 0:
// any C, x recomputed from a (and b).
enum : int {
  L_AZP, L_AMULT, L_BZP, L_BMULT, L_ASHIFT, L_AZO, L_ALO, L_AHI,  // int_add
  L_XZP, L_EPS, L_SQRT_BITS, L_SHIFT, L_OZP, L_QMIN, L_QMAX,      // int_layer_norm
  L_RZI, L_RZO, L_RLO, L_RHI,                                      // requant (its in_zp, out_zp, qmin, qmax)
  L_ADD,                                                           // 1: x = int_add(a, b); 0: x = a
  L_LEN
};

#define QC_FOR_ROW(BODY)                                                     \
  if constexpr (VPL > 0) {                                                   \
    _Pragma("unroll") for (int k = 0; k < VPL; ++k) {                        \
      int64_t j = lane + 32 * k;                                             \
      if (j < ch) {                                                          \
        int64_t xk = cache[k];                                               \
        BODY                                                                 \
      }                                                                      \
    }                                                                        \
  } else {                                                                   \
    for (int64_t j = lane; j < ch; j += 32) {                                \
      int64_t xk = xval(j);                                                  \
      BODY                                                                   \
    }                                                                        \
  }

template <class In, class Out, int VPL>
__global__ void __launch_bounds__(kWarps * 32)
    layer_norm_rows(const In* __restrict__ a, const In* __restrict__ b, const int64_t* __restrict__ prm, int64_t rows,
                    int64_t ch, const int64_t* __restrict__ gamma, const int64_t* __restrict__ beta,
                    const int64_t* __restrict__ rq_mult, const int64_t* __restrict__ rq_shift, Out* __restrict__ y,
                    int8_t* __restrict__ y2, In* __restrict__ xs) {
  int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const In* ar = a + row * ch;
  const In* br = __ldg(prm + L_ADD) ? b + row * ch : nullptr;
  const int64_t azp = __ldg(prm + L_AZP), amult = __ldg(prm + L_AMULT), bzp = __ldg(prm + L_BZP),
                bmult = __ldg(prm + L_BMULT), ashift = __ldg(prm + L_ASHIFT), azo = __ldg(prm + L_AZO),
                alo = __ldg(prm + L_ALO), ahi = __ldg(prm + L_AHI);
  auto xval = [&](int64_t j) -> int64_t {
    if (!br) return int64_t(ar[j]);
    return clamp64(rshift_round((int64_t(ar[j]) - azp) * amult + (int64_t(br[j]) - bzp) * bmult, ashift) + azo, alo,
                   ahi);
  };
  const int64_t x_zp = __ldg(prm + L_XZP);
  In* xsr = xs ? xs + row * ch : nullptr;  // the int_add's sum, stored where other ops read it too
  int32_t cache[VPL > 0 ? VPL : 1];
  if constexpr (VPL > 0) {
#pragma unroll
    for (int k = 0; k < VPL; ++k) {
      int64_t j = lane + 32 * k;
      cache[k] = j < ch ? int32_t(xval(j)) : 0;
      if (xsr && j < ch) xsr[j] = static_cast<In>(cache[k]);
    }
  } else if (xsr) {
    for (int64_t j = lane; j < ch; j += 32) xsr[j] = static_cast<In>(xval(j));
  }
  int64_t s1 = 0;
  QC_FOR_ROW(s1 += xk - x_zp;)
  s1 = warp_sum(s1);
  int64_t s2 = 0;
  QC_FOR_ROW(int64_t d = ch * (xk - x_zp) - s1; s2 += d * d;)
  s2 = warp_sum(s2);
  const int64_t sqrt_bits = __ldg(prm + L_SQRT_BITS);
  int64_t v = (floordiv64(s2, ch) + __ldg(prm + L_EPS)) * (int64_t(1) << sqrt_bits);
  // int_ops.isqrt: a float64 estimate, then two rounds of +1 / -1 fix-ups
  int64_t r = static_cast<int64_t>(floor(sqrt(static_cast<double>(v))));
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    if ((r + 1) * (r + 1) <= v) r += 1;
    if (r * r > v) r -= 1;
  }
  int64_t inv = r > 0 ? (int64_t(1) << 56) / r : 0;  // r > 0: floor division of positives
  const int64_t nshift = 56 - sqrt_bits / 2 - 16;
  const int64_t shift = __ldg(prm + L_SHIFT), ozp = __ldg(prm + L_OZP), qmin = __ldg(prm + L_QMIN),
                qmax = __ldg(prm + L_QMAX);
  const int64_t rzi = __ldg(prm + L_RZI), rzo = __ldg(prm + L_RZO), rlo = __ldg(prm + L_RLO), rhi = __ldg(prm + L_RHI);
  Out* yr = y + row * ch;
  int8_t* y2r = y2 ? y2 + row * ch : nullptr;
  QC_FOR_ROW(
    int64_t d = ch * (xk - x_zp) - s1;
    int64_t nv = rshift_round(d * inv, nshift);
    int64_t o = clamp64(rshift_round(nv * __ldg(gamma + j) + __ldg(beta + j), shift) + ozp, qmin, qmax);
    yr[j] = static_cast<Out>(o);
    if (y2r) y2r[j] = static_cast<int8_t>(qc_int::requant(o, rzi, __ldg(rq_mult + j), __ldg(rq_shift + j), rzo, rlo, rhi));
  )
}
#undef QC_FOR_ROW

// ---- int_layer_norm, hi variant ---------------------------------------------------------------
// The same values as layer_norm_rows, in 32-bit words, for calls whose constants the translation
// has checked (cuda_kernels.ln_hi_ok): every shift (the add's, the LayerNorm's, the requant's per
// channel) in 32..62, sqrt_bits <= 16 (so the normalisation's shift 40 - k/2 is 32..40), the zero
// points within 2^16, the multipliers and gamma within int32, C <= 32 * 8 * NCH. Then
//   the add's products are int32 x int64 (its multipliers within 2^44: the translation scales a
//   shift below 32 up to 32, multipliers times the same power of two) and its rounding shift
//   qc_int::rshift_round_hi;
//   x - x_zp, d = C x' - sum(x') and the row sum are int32 (|d| < 2 C 2^17 <= 2^28);
//   n = rshift_round(d inv, 40 - k/2) and y = rshift_round(n gamma + beta, shift) shift words;
//   y2 = qc_int::requant_hi(y - rq_in_zp, ...).
// The row's two divisions (sum(d^2) / C and 2^56 / r) are a float64 estimate with integer
// fix-ups. A row belongs to LPR lanes (a warp, or half of one for C <= 384), a lane to NCH chunks of 8
// consecutive channels (chunk l + LPR c): 16-byte loads and stores of x and y. The per-channel constants are copied into shared memory once per block, as
// the int32 they fit in (beta int64), and read from there in 16-byte pieces: ncu on an H100 found
// the kernel bound by L1 throughput when each row loaded them as int64 from global memory (32
// bytes per element, at a 64-byte stride between lanes). Blocks loop over rows (a grid of what fits).
template <class T>
__device__ __forceinline__ void load8(const T* __restrict__ p, int32_t (&v)[8]) {
  static_assert(sizeof(T) <= 2, "int8 / int16 rows");
  if constexpr (sizeof(T) == 2) {
    const int4 r = __ldg(reinterpret_cast<const int4*>(p));
    const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = e[i];
  } else {
    const int2 r = __ldg(reinterpret_cast<const int2*>(p));
    const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = e[i];
  }
}

template <class T>
__device__ __forceinline__ void store8(T* __restrict__ p, const int32_t (&v)[8]) {
  __align__(16) T o[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = static_cast<T>(v[i]);
  if constexpr (sizeof(T) == 2)
    *reinterpret_cast<int4*>(p) = *reinterpret_cast<const int4*>(o);
  else
    *reinterpret_cast<int2*>(p) = *reinterpret_cast<const int2*>(o);
}

// 8 int32 from shared memory at a 16-byte aligned address
__device__ __forceinline__ void load8_smem(const int32_t* p, int32_t (&v)[8]) {
  const int4 r0 = *reinterpret_cast<const int4*>(p), r1 = *reinterpret_cast<const int4*>(p + 4);
  v[0] = r0.x, v[1] = r0.y, v[2] = r0.z, v[3] = r0.w, v[4] = r1.x, v[5] = r1.y, v[6] = r1.z, v[7] = r1.w;
}

// the sum over the LPR lanes of a row (a warp's 32, or each half's 16: every lane takes part)
template <int LPR, class T>
__device__ __forceinline__ T lanes_sum(T v) {
#pragma unroll
  for (int o = LPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr int kLnHiWarps = 8;
constexpr int kLnHiMaxC = 1024;  // channels layer_norm_hi takes (32 lanes x 8 x 4 chunks)

// LPR lanes a row: 32, or 16 for rows of up to 384 channels (two rows a warp: C = 384 is 48 chunks,
// 3 for each of 16 lanes, where 32 lanes would leave half of them idle in their second chunk)
template <class In, class Out, int NCH, int LPR>
__global__ void __launch_bounds__(kLnHiWarps * 32)
    layer_norm_hi(const In* __restrict__ a, const In* __restrict__ b, const int64_t* __restrict__ prm, int64_t rows,
                  int32_t ch, const int64_t* __restrict__ gamma, const int64_t* __restrict__ beta,
                  const int64_t* __restrict__ rq_mult, const int64_t* __restrict__ rq_shift, Out* __restrict__ y,
                  int8_t* __restrict__ y2, In* __restrict__ xs) {
  using qc_int::clamp32;
  using qc_int::rshift_round_hi;
  const int lane = threadIdx.x & 31;
  const bool add = __ldg(prm + L_ADD) != 0;
  const int64_t amult = __ldg(prm + L_AMULT), bmult = __ldg(prm + L_BMULT);  // |m| < 2^44: products < 2^61
  const int32_t azp = int32_t(__ldg(prm + L_AZP)), bzp = int32_t(__ldg(prm + L_BZP)),
                ashift = int32_t(__ldg(prm + L_ASHIFT)), azo = int32_t(__ldg(prm + L_AZO)),
                alo = int32_t(__ldg(prm + L_ALO)), ahi = int32_t(__ldg(prm + L_AHI));
  const int32_t x_zp = int32_t(__ldg(prm + L_XZP)), sqrt_bits = int32_t(__ldg(prm + L_SQRT_BITS)),
                shift = int32_t(__ldg(prm + L_SHIFT)), ozp = int32_t(__ldg(prm + L_OZP)),
                qmin = int32_t(__ldg(prm + L_QMIN)), qmax = int32_t(__ldg(prm + L_QMAX));
  const int32_t rzi = int32_t(__ldg(prm + L_RZI)), rzo = int32_t(__ldg(prm + L_RZO)), rlo = int32_t(__ldg(prm + L_RLO)),
                rhi = int32_t(__ldg(prm + L_RHI));
  const int64_t eps = __ldg(prm + L_EPS);
  const int32_t nshift = 40 - sqrt_bits / 2;  // LN_RECIP_BITS - k/2 - LN_NORM_BITS: 32..40
  const double inv_ch = 1.0 / static_cast<double>(ch);  // the estimate of s2 / C (fixed up exactly below)
  __shared__ __align__(16) int32_t s_gamma[kLnHiMaxC], s_mult[kLnHiMaxC], s_shift[kLnHiMaxC];
  __shared__ __align__(16) int64_t s_beta[kLnHiMaxC];
  for (int j = threadIdx.x; j < ch; j += kLnHiWarps * 32) {
    s_gamma[j] = int32_t(__ldg(gamma + j));
    s_beta[j] = __ldg(beta + j);
    if (y2) {
      s_mult[j] = int32_t(__ldg(rq_mult + j));
      s_shift[j] = int32_t(__ldg(rq_shift + j));
    }
  }
  __syncthreads();
  constexpr int RPW = 32 / LPR;  // rows a warp
  const int sub = lane / LPR, l = lane % LPR;
  // the warp's rows row0 .. row0 + RPW - 1; a lane group past the last row recomputes row0 and
  // stores nothing (its lanes still take part in the shuffles)
  for (int64_t row0 = (int64_t(blockIdx.x) * kLnHiWarps + threadIdx.x / 32) * RPW; row0 < rows;
       row0 += int64_t(gridDim.x) * kLnHiWarps * RPW) {
    const bool live = row0 + sub < rows;
    const int64_t base = (live ? row0 + sub : row0) * ch;
    int32_t xv[NCH][8];
    int32_t s1 = 0;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int j0 = (l + LPR * c) * 8;
      if (j0 < ch) {
        load8(a + base + j0, xv[c]);
        if (add) {
          int32_t bv[8];
          load8(b + base + j0, bv);
#pragma unroll
          for (int i = 0; i < 8; ++i)
            xv[c][i] = clamp32(rshift_round_hi(int64_t(xv[c][i] - azp) * amult + int64_t(bv[i] - bzp) * bmult, ashift) +
                                   azo, alo, ahi);
        }
        if (xs && live) store8(xs + base + j0, xv[c]);
#pragma unroll
        for (int i = 0; i < 8; ++i) s1 += xv[c][i] - x_zp;
      }
    }
    s1 = lanes_sum<LPR>(s1);
    int64_t s2 = 0;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      if ((l + LPR * c) * 8 < ch) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int32_t d = ch * (xv[c][i] - x_zp) - s1;
          s2 += int64_t(d) * d;
        }
      }
    }
    s2 = lanes_sum<LPR>(s2);
    // V = (floor(s2 / C) + eps) 2^k (s2 >= 0), r = isqrt(V), inv = floor(2^56 / r)
    const int64_t var = qc_int::floordiv_est(s2, ch, static_cast<double>(s2) * inv_ch);
    const int64_t v = (var + eps) * (int64_t(1) << sqrt_bits);
    int64_t r = static_cast<int64_t>(floor(sqrt(static_cast<double>(v))));
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      if ((r + 1) * (r + 1) <= v) r += 1;
      if (r * r > v) r -= 1;
    }
    const int64_t inv =
        r > 0 ? qc_int::floordiv_est(int64_t(1) << 56, r, 72057594037927936.0 / static_cast<double>(r)) : 0;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int j0 = (l + LPR * c) * 8;
      if (j0 >= ch || !live) continue;
      int32_t g[8], o[8];
      load8_smem(s_gamma + j0, g);
#pragma unroll
      for (int i = 0; i < 8; i += 2) {
        const int4 bb = *reinterpret_cast<const int4*>(s_beta + j0 + i);
        const int64_t be[2] = {(int64_t(uint32_t(bb.y)) << 32) | uint32_t(bb.x),
                               (int64_t(uint32_t(bb.w)) << 32) | uint32_t(bb.z)};
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int32_t d = ch * (xv[c][i + u] - x_zp) - s1;
          const int32_t n = rshift_round_hi(int64_t(d) * inv, nshift);
          o[i + u] = clamp32(rshift_round_hi(int64_t(n) * g[i + u] + be[u], shift) + ozp, qmin, qmax);
        }
      }
      store8(y + base + j0, o);
      if (y2) {
        int32_t m[8], sh[8];
        load8_smem(s_mult + j0, m);
        load8_smem(s_shift + j0, sh);
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = qc_int::requant_hi(o[i] - rzi, m[i], sh[i], rzo, rlo, rhi);
        store8(y2 + base + j0, o);
      }
    }
  }
}

// ---- host side --------------------------------------------------------------------------------

void check(const TensorView& t, DLDataTypeCode code, int bits, const char* what) {
  qc_int::check(t, code, bits, "qc row kernel", what);
}

// f(T()) for the dtype T of t: inputs int8 / int16 (by_in), outputs int8 / uint8 / int16 (by_out);
// the translation calls the kernels with these only (each combination is a kernel instantiation)
template <class F>
void by_in(const TensorView& t, const char* what, F&& f) {
  DLDataType d = t.dtype();
  if (d.lanes == 1 && d.code == kDLInt && d.bits == 8) return f(int8_t());
  if (d.lanes == 1 && d.code == kDLInt && d.bits == 16) return f(int16_t());
  TVM_FFI_THROW(TypeError) << "qc row kernel: " << what << " must be int8 or int16";
}

template <class F>
void by_out(const TensorView& t, const char* what, F&& f) {
  DLDataType d = t.dtype();
  if (d.lanes == 1 && d.code == kDLInt && d.bits == 8) return f(int8_t());
  if (d.lanes == 1 && d.code == kDLUInt && d.bits == 8) return f(uint8_t());
  if (d.lanes == 1 && d.code == kDLInt && d.bits == 16) return f(int16_t());
  TVM_FFI_THROW(TypeError) << "qc row kernel: " << what << " must be int8, uint8 or int16";
}

template <class P>
using elem_t = std::remove_const_t<std::remove_pointer_t<P>>;

// f(xp, yp) with x's data as const In* and y's as Out*, In and Out as by_in / by_out choose them
// (elem_t<decltype(xp)> names In inside f)
template <class F>
void with_io(const TensorView& x, const TensorView& y, F&& f) {
  by_in(x, "x", [&](auto in) {
    by_out(y, "y", [&](auto out) {
      f(static_cast<const decltype(in)*>(x.data_ptr()), static_cast<decltype(out)*>(y.data_ptr()));
    });
  });
}

void softmax_impl(TensorView x, const TensorView* mask, TensorView tab, int64_t n, int64_t mdiv, int64_t mmod,
                  int64_t mult, int64_t shift, int64_t out_zp, int64_t qmin, int64_t qmax, TensorView y) {
  TVM_FFI_ICHECK(x.ndim() == 2 && y.ndim() == 2 && x.size(0) == y.size(0) && x.size(1) >= n && y.size(1) >= n &&
                 n >= 0)
      << "qc int_softmax: x and y must be [rows, >= n]";
  check(tab, kDLInt, 32, "table");
  TVM_FFI_ICHECK(tab.ndim() == 1 && tab.size(0) >= 1) << "qc int_softmax: empty table";
  TVM_FFI_ICHECK(shift >= 0 && shift <= 62) << "qc int_softmax: shift out of range";
  int64_t rows = x.size(0), ldx = x.size(1), ldy = y.size(1);
  if (mask) {
    DLDataType md = mask->dtype();  // bool or int8: one byte a value, 0 or 1
    TVM_FFI_ICHECK(md.lanes == 1 && ((md.bits == 8 && (md.code == kDLInt || md.code == kDLUInt || md.code == kDLBool)) ||
                                     (md.bits == 1 && (md.code == kDLUInt || md.code == kDLBool))) &&
                   mask->device().device_type == kDLCUDA)
        << "qc int_softmax: the mask must be a bool or int8 tensor on the GPU";
    TVM_FFI_ICHECK(mask->ndim() == 2 && mask->size(1) == n && mask->size(0) == mmod && mdiv >= 1)
        << "qc int_softmax: mask must be [mmod, N]";
  }
  if (rows == 0 || ldy == 0) return;
  dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), block(kWarps * 32);
  cudaStream_t st = stream_of(x);
  const int8_t* m = mask ? static_cast<const int8_t*>(mask->data_ptr()) : nullptr;
  auto tp = static_cast<const int32_t*>(tab.data_ptr());
  with_io(x, y, [&](auto xp, auto yp) {
    auto launch = [&](auto masked, auto vpl) {
      softmax_rows<elem_t<decltype(xp)>, elem_t<decltype(yp)>, decltype(masked)::value, decltype(vpl)::value>
          <<<grid, block, 0, st>>>(xp, m, tp, tab.size(0), rows, n, ldx, ldy, m ? mdiv : 1, m ? mmod : 1, mult, shift,
                                   out_zp, qmin, qmax, yp);
    };
    auto by_len = [&](auto masked) {
      if (n <= 256)
        launch(masked, std::integral_constant<int, 8>());
      else
        launch(masked, std::integral_constant<int, 0>());
    };
    if (m)
      by_len(std::true_type());
    else
      by_len(std::false_type());
  });
  TVM_FFI_ICHECK(cudaGetLastError() == cudaSuccess) << "qc int_softmax: launch failed";
}

void softmax(TensorView x, TensorView tab, int64_t n, int64_t mult, int64_t shift, int64_t out_zp, int64_t qmin,
             int64_t qmax, TensorView y) {
  softmax_impl(x, nullptr, tab, n, 1, 1, mult, shift, out_zp, qmin, qmax, y);
}

void softmax_masked(TensorView x, TensorView mask, TensorView tab, int64_t n, int64_t mdiv, int64_t mmod,
                    int64_t mult, int64_t shift, int64_t out_zp, int64_t qmin, int64_t qmax, TensorView y) {
  softmax_impl(x, &mask, tab, n, mdiv, mmod, mult, shift, out_zp, qmin, qmax, y);
}

int sm_count(const TensorView& t) {
  static int cached[64] = {0};
  int dev = t.device().device_id;
  if (dev >= 0 && dev < 64 && cached[dev]) return cached[dev];
  int n = 0;
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  n = n > 0 ? n : 1;
  if (dev >= 0 && dev < 64) cached[dev] = n;
  return n;
}

// the table in shared memory: an int16 input, 8 | cols, 16-byte aligned x and y, a table that fits
template <class Out, bool Rq, bool Hi>
bool lut_smem_launch(const TensorView& x, const int16_t* tp, int64_t tlen, int64_t offset, int64_t count,
                     int64_t cols, int64_t in_zp, const int64_t* mp, const int64_t* sp, bool per_channel,
                     int64_t out_zp, int64_t qmin, int64_t qmax, Out* yp, cudaStream_t st) {
  constexpr int64_t kMaxBytes = 160 * 1024;
  const size_t bytes = size_t(tlen) * sizeof(int16_t);
  if (cols % 8 || bytes > kMaxBytes || offset <= -(int64_t(1) << 30) || offset >= (int64_t(1) << 30) ||
      reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 ||
      reinterpret_cast<uintptr_t>(yp) % 16 || (Rq && per_channel && (reinterpret_cast<uintptr_t>(mp) % 16 ||
                                                                      reinterpret_cast<uintptr_t>(sp) % 16)))
    return false;
  static bool attr = false;  // per instantiation
  if (!attr) {
    if (cudaFuncSetAttribute(lut_smem<Out, Rq, Hi>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kMaxBytes)) !=
        cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    attr = true;
  }
  int64_t chunks = count / 8;
  int64_t blocks = (chunks + kLutThreads - 1) / kLutThreads;
  int sms = sm_count(x);
  lut_smem<Out, Rq, Hi><<<unsigned(blocks < sms ? blocks : sms), kLutThreads, bytes, st>>>(
      static_cast<const int16_t*>(x.data_ptr()), tp, tlen, offset, chunks, cols, in_zp, mp, sp, per_channel, out_zp,
      qmin, qmax, yp);
  return true;
}

void lut_impl(TensorView x, TensorView tab, int64_t offset, bool rq, bool hi, int64_t in_zp, const TensorView* mult,
              const TensorView* shift, int64_t out_zp, int64_t qmin, int64_t qmax, TensorView y) {
  check(tab, kDLInt, 16, "table");
  TVM_FFI_ICHECK(tab.ndim() == 1 && tab.size(0) >= 1) << "qc int_lut: empty table";
  int64_t count = numel(x);
  TVM_FFI_ICHECK(numel(y) == count && x.ndim() >= 1) << "qc int_lut: x and y differ in size";
  int64_t cols = x.size(x.ndim() - 1), rows = cols ? count / cols : 0;
  bool per_channel = false;
  if (rq) {
    check(*mult, kDLInt, 64, "mult");
    check(*shift, kDLInt, 64, "shift");
    int64_t ch = numel(*mult);
    TVM_FFI_ICHECK((ch == 1 || ch == cols) && numel(*shift) == ch)
        << "qc int_lut: per-channel requant constants must match the last dim";
    per_channel = ch != 1;
  }
  if (count == 0) return;
  // a block: 256 threads, as many columns as it can take (rounded to warps), the rest rows
  int bx = cols >= 256 ? 256 : int((cols + 31) / 32 * 32), by = 256 / bx;
  int64_t gx = (cols + bx - 1) / bx, gy = (rows + by - 1) / by;
  int64_t cap = 132 * 16 / gx > 0 ? 132 * 16 / gx : 1;  // enough blocks to fill the GPU; rows loop beyond
  dim3 grid(unsigned(gx), unsigned(gy < cap ? gy : cap)), block(bx, by);
  cudaStream_t st = stream_of(x);
  const int64_t* mp = rq ? static_cast<const int64_t*>(mult->data_ptr()) : nullptr;
  const int64_t* sp = rq ? static_cast<const int64_t*>(shift->data_ptr()) : nullptr;
  auto tp = static_cast<const int16_t*>(tab.data_ptr());
  with_io(x, y, [&](auto xp, auto yp) {
    using In = elem_t<decltype(xp)>;
    using Out = elem_t<decltype(yp)>;
    if constexpr (std::is_same_v<In, int16_t>) {
      bool done = rq && hi ? lut_smem_launch<Out, true, true>(x, tp, tab.size(0), offset, count, cols, in_zp, mp, sp,
                                                              per_channel, out_zp, qmin, qmax, yp, st)
                  : rq ? lut_smem_launch<Out, true, false>(x, tp, tab.size(0), offset, count, cols, in_zp, mp, sp,
                                                           per_channel, out_zp, qmin, qmax, yp, st)
                       : lut_smem_launch<Out, false, false>(x, tp, tab.size(0), offset, count, cols, 0, nullptr,
                                                            nullptr, false, 0, 0, 0, yp, st);
      if (done) return;
    }
    if (rq)
      lut_kernel<In, Out, true><<<grid, block, 0, st>>>(xp, tp, tab.size(0), offset, rows, cols, in_zp, mp, sp,
                                                         per_channel, out_zp, qmin, qmax, yp);
    else
      lut_kernel<In, Out, false><<<grid, block, 0, st>>>(xp, tp, tab.size(0), offset, rows, cols, 0, nullptr, nullptr,
                                                          false, 0, 0, 0, yp);
  });
  TVM_FFI_ICHECK(cudaGetLastError() == cudaSuccess) << "qc int_lut: launch failed";
}

void lut(TensorView x, TensorView tab, int64_t offset, TensorView y) {
  lut_impl(x, tab, offset, false, false, 0, nullptr, nullptr, 0, 0, 0, y);
}

// Hi: the translation checked every shift is 32..62 and |in_zp|, |out_zp| <= 2^16 (qc_int::requant_hi)
template <bool Hi>
void lut_requant(TensorView x, TensorView tab, int64_t offset, int64_t in_zp, TensorView mult, TensorView shift,
                 int64_t out_zp, int64_t qmin, int64_t qmax, TensorView y) {
  lut_impl(x, tab, offset, true, Hi, in_zp, &mult, &shift, out_zp, qmin, qmax, y);
}

// a, b [R, C] (b: the int_add's second operand, read where params[L_ADD] is 1), prm [L_LEN] int64,
// gamma / beta [C] int64, rq_mult / rq_shift [C] int64 (read only with y2), y [R, C], y2 [R, C] int8
// the hi kernel's launch: ch a multiple of 8 up to 32 * 8 * 4, every row pointer 16-byte aligned
// (8-byte rows of int8 need 8); false where it does not apply (the general kernel runs instead)
template <class In, class Out>
bool layer_norm_hi_launch(const In* ap, const In* bp, const int64_t* pp, int64_t rows, int64_t ch, const int64_t* gp,
                          const int64_t* bep, const int64_t* mp, const int64_t* sp, Out* yp, int8_t* y2p, In* xsp,
                          int sms, cudaStream_t st) {
  auto al = [](const void* p, size_t n) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % n == 0; };
  const size_t in_al = sizeof(In) == 2 ? 16 : 8, out_al = sizeof(Out) == 2 ? 16 : 8;
  if (ch % 8 || ch > kLnHiMaxC || !al(ap, in_al) || !al(bp, in_al) || !al(xsp, in_al) || !al(yp, out_al) ||
      !al(y2p, 8) || !al(gp, 16) || !al(bep, 16) || (y2p && (!al(mp, 16) || !al(sp, 16))))
    return false;
  auto go = [&](auto kern) {
    static int per_sm = 0;  // per instantiation
    if (!per_sm && (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, kLnHiWarps * 32, 0) != cudaSuccess ||
                    per_sm < 1)) {
      cudaGetLastError();
      per_sm = 1;
    }
    const int64_t rpb = kLnHiWarps * (ch <= 384 ? 2 : 1);  // rows a block takes at a time
    const int64_t need = (rows + rpb - 1) / rpb, cap = int64_t(sms) * per_sm;
    kern<<<unsigned(need < cap ? need : cap), kLnHiWarps * 32, 0, st>>>(ap, bp, pp, rows, int32_t(ch), gp, bep, mp, sp,
                                                                         yp, y2p, xsp);
  };
  if (ch <= 256)
    go(layer_norm_hi<In, Out, 2, 16>);
  else if (ch <= 384)
    go(layer_norm_hi<In, Out, 3, 16>);
  else if (ch <= 512)
    go(layer_norm_hi<In, Out, 2, 32>);
  else if (ch <= 768)
    go(layer_norm_hi<In, Out, 3, 32>);
  else
    go(layer_norm_hi<In, Out, 4, 32>);
  return true;
}


void layer_norm_impl(TensorView a, TensorView b, TensorView prm, TensorView gamma, TensorView beta,
                     TensorView rq_mult, TensorView rq_shift, TensorView y, const TensorView* y2,
                     const TensorView* xs, bool hi) {
  TVM_FFI_ICHECK(a.ndim() == 2 && y.ndim() == 2 && a.size(0) == y.size(0) && a.size(1) == y.size(1))
      << "qc int_layer_norm: x and y must be [rows, C] alike";
  int64_t rows = a.size(0), ch = a.size(1);
  check(prm, kDLInt, 64, "params");
  check(gamma, kDLInt, 64, "gamma");
  check(beta, kDLInt, 64, "beta");
  TVM_FFI_ICHECK(numel(prm) == L_LEN) << "qc int_layer_norm: params must have " << L_LEN << " entries";
  TVM_FFI_ICHECK(numel(gamma) == ch && numel(beta) == ch) << "qc int_layer_norm: gamma / beta must have C entries";
  TVM_FFI_ICHECK(b.ndim() == 2 && b.size(0) == rows && b.size(1) == ch && b.dtype() == a.dtype())
      << "qc int_layer_norm: the add's operands must be [rows, C] alike";
  if (y2) {
    check(*y2, kDLInt, 8, "y2");
    check(rq_mult, kDLInt, 64, "rq_mult");
    check(rq_shift, kDLInt, 64, "rq_shift");
    TVM_FFI_ICHECK(numel(*y2) == rows * ch && numel(rq_mult) == ch && numel(rq_shift) == ch)
        << "qc int_layer_norm: y2 / requant constants do not match x";
  }
  if (xs) {
    TVM_FFI_ICHECK(xs->ndim() == 2 && xs->size(0) == rows && xs->size(1) == ch && xs->dtype() == a.dtype())
        << "qc int_layer_norm: the sum's output must be [rows, C] like a";
  }
  if (rows == 0 || ch == 0) return;
  dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), block(kWarps * 32);
  cudaStream_t st = stream_of(a);
  auto pp = static_cast<const int64_t*>(prm.data_ptr());
  auto gp = static_cast<const int64_t*>(gamma.data_ptr()), bp = static_cast<const int64_t*>(beta.data_ptr());
  auto mp = static_cast<const int64_t*>(rq_mult.data_ptr()), sp = static_cast<const int64_t*>(rq_shift.data_ptr());
  int8_t* y2p = y2 ? static_cast<int8_t*>(y2->data_ptr()) : nullptr;
  with_io(a, y, [&](auto ap, auto yp) {
    using In = elem_t<decltype(ap)>;
    const In* bptr = static_cast<const In*>(b.data_ptr());
    In* xsp = xs ? static_cast<In*>(xs->data_ptr()) : nullptr;
    if (hi && layer_norm_hi_launch(ap, bptr, pp, rows, ch, gp, bp, mp, sp, yp, y2p, xsp, sm_count(a), st)) return;
    auto go = [&](auto vpl) {
      layer_norm_rows<In, elem_t<decltype(yp)>, decltype(vpl)::value><<<grid, block, 0, st>>>(
          ap, bptr, pp, rows, ch, gp, bp, mp, sp, yp, y2p, xsp);
    };
    if (ch <= 384)
      go(std::integral_constant<int, 12>());
    else if (ch <= 768)
      go(std::integral_constant<int, 24>());
    else
      go(std::integral_constant<int, 0>());
  });
  TVM_FFI_ICHECK(cudaGetLastError() == cudaSuccess) << "qc int_layer_norm: launch failed";
}

// Hi: the translation checked the constants as layer_norm_hi needs them (cuda_kernels.ln_hi_ok)
template <bool Hi>
void layer_norm(TensorView a, TensorView b, TensorView prm, TensorView gamma, TensorView beta, TensorView rq_mult,
                TensorView rq_shift, TensorView y) {
  layer_norm_impl(a, b, prm, gamma, beta, rq_mult, rq_shift, y, nullptr, nullptr, Hi);
}

template <bool Hi>
void add_layer_norm(TensorView a, TensorView b, TensorView prm, TensorView gamma, TensorView beta, TensorView rq_mult,
                    TensorView rq_shift, TensorView xs, TensorView y) {
  layer_norm_impl(a, b, prm, gamma, beta, rq_mult, rq_shift, y, nullptr, &xs, Hi);
}

template <bool Hi>
void layer_norm_requant(TensorView a, TensorView b, TensorView prm, TensorView gamma, TensorView beta,
                        TensorView rq_mult, TensorView rq_shift, TensorView y, TensorView y2) {
  layer_norm_impl(a, b, prm, gamma, beta, rq_mult, rq_shift, y, &y2, nullptr, Hi);
}

}  // namespace qc_rows

TVM_FFI_STATIC_INIT_BLOCK() {
  using tvm::ffi::Function;
  Function::SetGlobal("qc.cuda.int_softmax", Function::FromTyped(qc_rows::softmax), true);
  Function::SetGlobal("qc.cuda.int_softmax_masked", Function::FromTyped(qc_rows::softmax_masked), true);
  Function::SetGlobal("qc.cuda.int_lut", Function::FromTyped(qc_rows::lut), true);
  Function::SetGlobal("qc.cuda.int_lut_requant", Function::FromTyped(qc_rows::lut_requant<false>), true);
  Function::SetGlobal("qc.cuda.int_lut_requant_hi", Function::FromTyped(qc_rows::lut_requant<true>), true);
  Function::SetGlobal("qc.cuda.int_layer_norm", Function::FromTyped(qc_rows::layer_norm<false>), true);
  Function::SetGlobal("qc.cuda.int_layer_norm_hi", Function::FromTyped(qc_rows::layer_norm<true>), true);
  Function::SetGlobal("qc.cuda.int_layer_norm_requant", Function::FromTyped(qc_rows::layer_norm_requant<false>), true);
  Function::SetGlobal("qc.cuda.int_layer_norm_requant_hi", Function::FromTyped(qc_rows::layer_norm_requant<true>),
                      true);
  Function::SetGlobal("qc.cuda.int_add_layer_norm", Function::FromTyped(qc_rows::add_layer_norm<false>), true);
  Function::SetGlobal("qc.cuda.int_add_layer_norm_hi", Function::FromTyped(qc_rows::add_layer_norm<true>), true);
}
