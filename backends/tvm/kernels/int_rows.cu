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
//   qc.cuda.int_lut(x [E], table [T] int32, offset, y [E])
//   qc.cuda.int_lut_requant(x [E], table [T] int32, offset, in_zp, mult [C] int64, shift [C] int64,
//                           out_zp, qmin, qmax, y [E])          (C: 1 or x's last dim)
//   qc.cuda.int_layer_norm(x [R, C], x_zp, eps, sqrt_bits, gamma [C] int64, beta [C] int64, shift,
//                          out_zp, qmin, qmax, y [R, C])
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

namespace qc_rows {

using tvm::ffi::TensorView;

constexpr int kWarps = 8;  // rows per block (a warp per row)

// int_ops.rshift_round: sign(p) * ((|p| + 2^(c-1)) >> c), 0 <= c <= 62
__device__ __forceinline__ int64_t rshift_round(int64_t p, int64_t c) {
  int64_t half = c > 0 ? (int64_t(1) << (c - 1)) : 0;
  int64_t mag = ((p < 0 ? -p : p) + half) >> c;
  return p < 0 ? -mag : mag;
}

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

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
// e * mult / S rounded down, from a per-row float64 estimate of mult / S and integer fix-ups:
// exact for |e * mult| < 2^53 and S >= 1 (the fix-ups loop until q * S <= num < (q + 1) * S)
__device__ __forceinline__ int64_t floordiv_row(int64_t num, int64_t den, double est) {
  int64_t q = static_cast<int64_t>(floor(est));
  while (q * den > num) q -= 1;
  while ((q + 1) * den <= num) q += 1;
  return q;
}

template <class Out>
__device__ __forceinline__ void softmax_store(Out* yr, int64_t j, int64_t e, int64_t mult, int64_t s, double inv,
                                              int64_t shift, int64_t out_zp, int64_t qmin, int64_t qmax) {
  int64_t t = floordiv_row(e * mult, s, static_cast<double>(e) * inv);
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
// x viewed as [rows, cols]: y = table[clamp(x - offset, 0, T - 1)]; with Rq:
// y = clamp(rshift_round((y - in_zp) * mult[c], shift[c]) + out_zp, qmin, qmax) (c the column, or 0
// for per-tensor constants). A thread owns a column (its constants in registers) and walks rows.
template <class In, class Out, bool Rq>
__global__ void lut_kernel(const In* __restrict__ x, const int32_t* __restrict__ tab, int64_t tlen, int64_t offset,
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

// ---- int_layer_norm ---------------------------------------------------------------------------
// int_ops.int_layer_norm, a warp per row of C:
//   x' = x - x_zp; d = C x' - sum(x'); V = (floor(sum(d^2) / C) + eps) * 2^k; r = isqrt(V);
//   inv = r > 0 ? floor(2^56 / r) : 0; n = rshift_round(d * inv, 40 - k/2);
//   y = clamp(rshift_round(n * gamma_c + beta_c, shift) + out_zp, qmin, qmax)
// Over the lane's entries of the row: j = lane, lane + 32, ...; k counts them. VPL > 0 (rows of
// C <= 32 VPL): x read once into registers (xk); VPL = 0: any C, x re-read from L1.
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
      int64_t xk = int64_t(xr[j]);                                           \
      BODY                                                                   \
    }                                                                        \
  }

template <class In, class Out, int VPL>
__global__ void __launch_bounds__(kWarps * 32) layer_norm_rows(const In* __restrict__ x, int64_t rows, int64_t ch,
                                                               int64_t x_zp, int64_t eps, int64_t sqrt_bits,
                                                               const int64_t* __restrict__ gamma,
                                                               const int64_t* __restrict__ beta, int64_t shift,
                                                               int64_t out_zp, int64_t qmin, int64_t qmax,
                                                               Out* __restrict__ y) {
  int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const In* xr = x + row * ch;
  Out* yr = y + row * ch;
  int32_t cache[VPL > 0 ? VPL : 1];
  if constexpr (VPL > 0) {
#pragma unroll
    for (int k = 0; k < VPL; ++k) {
      int64_t j = lane + 32 * k;
      cache[k] = j < ch ? int32_t(xr[j]) : 0;
    }
  }
  int64_t s1 = 0;
  QC_FOR_ROW(s1 += xk - x_zp;)
  s1 = warp_sum(s1);
  int64_t s2 = 0;
  QC_FOR_ROW(int64_t d = ch * (xk - x_zp) - s1; s2 += d * d;)
  s2 = warp_sum(s2);
  int64_t v = (floordiv64(s2, ch) + eps) * (int64_t(1) << sqrt_bits);
  // int_ops.isqrt: a float64 estimate, then two rounds of +1 / -1 fix-ups
  int64_t r = static_cast<int64_t>(floor(sqrt(static_cast<double>(v))));
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    if ((r + 1) * (r + 1) <= v) r += 1;
    if (r * r > v) r -= 1;
  }
  int64_t inv = r > 0 ? (int64_t(1) << 56) / r : 0;  // r > 0: floor division of positives
  int64_t nshift = 56 - sqrt_bits / 2 - 16;
  QC_FOR_ROW(
    int64_t d = ch * (xk - x_zp) - s1;
    int64_t nv = rshift_round(d * inv, nshift);
    int64_t o = clamp64(rshift_round(nv * __ldg(gamma + j) + __ldg(beta + j), shift) + out_zp, qmin, qmax);
    yr[j] = static_cast<Out>(o);
  )
}
#undef QC_FOR_ROW

// ---- host side --------------------------------------------------------------------------------

cudaStream_t stream_of(const TensorView& t) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, t.device().device_id));
}

int64_t numel(const TensorView& t) {
  int64_t n = 1;
  for (int i = 0; i < t.ndim(); ++i) n *= t.size(i);
  return n;
}

void check(const TensorView& t, DLDataTypeCode code, int bits, const char* what) {
  TVM_FFI_ICHECK(t.dtype().code == code && t.dtype().bits == bits && t.dtype().lanes == 1)
      << "qc row kernel: " << what << " has the wrong dtype";
  TVM_FFI_ICHECK(t.device().device_type == kDLCUDA) << "qc row kernel: " << what << " is not on a CUDA device";
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

void lut_impl(TensorView x, TensorView tab, int64_t offset, bool rq, int64_t in_zp, const TensorView* mult,
              const TensorView* shift, int64_t out_zp, int64_t qmin, int64_t qmax, TensorView y) {
  check(tab, kDLInt, 32, "table");
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
  auto tp = static_cast<const int32_t*>(tab.data_ptr());
  with_io(x, y, [&](auto xp, auto yp) {
    using In = elem_t<decltype(xp)>;
    using Out = elem_t<decltype(yp)>;
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
  lut_impl(x, tab, offset, false, 0, nullptr, nullptr, 0, 0, 0, y);
}

void lut_requant(TensorView x, TensorView tab, int64_t offset, int64_t in_zp, TensorView mult, TensorView shift,
                 int64_t out_zp, int64_t qmin, int64_t qmax, TensorView y) {
  lut_impl(x, tab, offset, true, in_zp, &mult, &shift, out_zp, qmin, qmax, y);
}

void layer_norm(TensorView x, int64_t x_zp, int64_t eps, int64_t sqrt_bits, TensorView gamma, TensorView beta,
                int64_t shift, int64_t out_zp, int64_t qmin, int64_t qmax, TensorView y) {
  TVM_FFI_ICHECK(x.ndim() == 2 && y.ndim() == 2 && x.size(0) == y.size(0) && x.size(1) == y.size(1))
      << "qc int_layer_norm: x and y must be [rows, C] alike";
  int64_t rows = x.size(0), ch = x.size(1);
  check(gamma, kDLInt, 64, "gamma");
  check(beta, kDLInt, 64, "beta");
  TVM_FFI_ICHECK(numel(gamma) == ch && numel(beta) == ch) << "qc int_layer_norm: gamma / beta must have C entries";
  TVM_FFI_ICHECK(sqrt_bits >= 0 && sqrt_bits <= 40 && shift >= 0 && shift <= 62) << "qc int_layer_norm: shifts";
  if (rows == 0 || ch == 0) return;
  dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), block(kWarps * 32);
  cudaStream_t st = stream_of(x);
  with_io(x, y, [&](auto xp, auto yp) {
    auto go = [&](auto vpl) {
      layer_norm_rows<elem_t<decltype(xp)>, elem_t<decltype(yp)>, decltype(vpl)::value><<<grid, block, 0, st>>>(
          xp, rows, ch, x_zp, eps, sqrt_bits, static_cast<const int64_t*>(gamma.data_ptr()),
          static_cast<const int64_t*>(beta.data_ptr()), shift, out_zp, qmin, qmax, yp);
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

}  // namespace qc_rows

TVM_FFI_STATIC_INIT_BLOCK() {
  using tvm::ffi::Function;
  Function::SetGlobal("qc.cuda.int_softmax", Function::FromTyped(qc_rows::softmax), true);
  Function::SetGlobal("qc.cuda.int_softmax_masked", Function::FromTyped(qc_rows::softmax_masked), true);
  Function::SetGlobal("qc.cuda.int_lut", Function::FromTyped(qc_rows::lut), true);
  Function::SetGlobal("qc.cuda.int_lut_requant", Function::FromTyped(qc_rows::lut_requant), true);
  Function::SetGlobal("qc.cuda.int_layer_norm", Function::FromTyped(qc_rows::layer_norm), true);
}
