// Integer helpers shared by qcompiler's CUDA kernels (int_rows.cu, int_attention.cu): the device
// side of qcompiler/int_ops.py's arithmetic, and the host side's tvm_ffi plumbing.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>

namespace qc_int {

// int_ops.rshift_round: sign(p) * ((|p| + 2^(c-1)) >> c), 0 <= c <= 62, written as
// (p + 2^(c-1) - [p < 0]) >> c (arithmetic shift; c >= 1), the same value for every p (for p < 0
// both are -floor((|p| + h) / 2^c) = floor((p + h - 1) / 2^c)), in fewer 64-bit operations
__device__ __forceinline__ int64_t rshift_round(int64_t p, int64_t c) {
  if (c == 0) return p;
  return (p + (int64_t(1) << (c - 1)) - (p < 0 ? 1 : 0)) >> c;
}

// rshift_round(p, c) for 32 <= c <= 62: (p + 2^(c-1) - [p < 0]) >> c, where 2^(c-1) is one word
// of a register pair (the low word 2^31 for c = 32, else the high word 2^(c-33)) and the shift by
// c >= 32 is the high word shifted by c - 32: a 64-bit add and a 32-bit shift, no branch (a
// select on c == 32 rather than two formulas: lanes of a warp with different shifts would
// diverge). Exact for every p for which int_ops' |p| + 2^(c-1) does not overflow int64; the
// result fits int32.
__host__ __device__ __forceinline__ int32_t rshift_round_hi(int64_t p, int32_t c) {
  const int32_t t = c - 32;
  const uint32_t half_lo = t == 0 ? 0x80000000u : 0u;
  const uint32_t half_hi = t == 0 ? 0u : (1u << ((t - 1) & 31));
  const int64_t q = p + int64_t((uint64_t(half_hi) << 32) | half_lo) - (p < 0 ? 1 : 0);
  return int32_t(q >> 32) >> (t & 31);
}

__host__ __device__ __forceinline__ int32_t clamp32(int32_t v, int32_t lo, int32_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// requant(a, in_zp = 0, m, c, out_zp, qmin, qmax) for int32 a and m and 32 <= c <= 62 (the caller
// guarantees the ranges; |out_zp| <= 2^16): the product a m is one IMAD.WIDE, the rest 32-bit
__host__ __device__ __forceinline__ int32_t requant_hi(int32_t a, int32_t m, int32_t c, int32_t out_zp, int32_t qmin,
                                                       int32_t qmax) {
  return clamp32(rshift_round_hi(int64_t(a) * int64_t(m), c) + out_zp, qmin, qmax);
}

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// qc::requant of one value: clamp(rshift_round((v - in_zp) * mult, shift) + out_zp, qmin, qmax)
__device__ __forceinline__ int64_t requant(int64_t v, int64_t in_zp, int64_t mult, int64_t shift, int64_t out_zp,
                                           int64_t qmin, int64_t qmax) {
  return clamp64(rshift_round((v - in_zp) * mult, shift) + out_zp, qmin, qmax);
}

// floor(num / den) for den >= 1 from a float64 estimate `est` of num / den and integer fix-ups:
// exact for |num| < 2^53 (the fix-ups loop until q * den <= num < (q + 1) * den)
__device__ __forceinline__ int64_t floordiv_est(int64_t num, int64_t den, double est) {
  int64_t q = static_cast<int64_t>(floor(est));
  while (q * den > num) q -= 1;
  while ((q + 1) * den <= num) q += 1;
  return q;
}

// ---- host side --------------------------------------------------------------------------------

inline cudaStream_t stream_of(const tvm::ffi::TensorView& t) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, t.device().device_id));
}

inline int64_t numel(const tvm::ffi::TensorView& t) {
  int64_t n = 1;
  for (int i = 0; i < t.ndim(); ++i) n *= t.size(i);
  return n;
}

inline bool is_dtype(const tvm::ffi::TensorView& t, DLDataTypeCode code, int bits) {
  return t.dtype().code == code && t.dtype().bits == bits && t.dtype().lanes == 1;
}

// a tensor argument of dtype (code, bits) on a CUDA device, or a TypeError naming `what`
inline void check(const tvm::ffi::TensorView& t, DLDataTypeCode code, int bits, const char* kernel, const char* what) {
  TVM_FFI_ICHECK(is_dtype(t, code, bits)) << kernel << ": " << what << " has the wrong dtype";
  TVM_FFI_ICHECK(t.device().device_type == kDLCUDA) << kernel << ": " << what << " is not on a CUDA device";
}

}  // namespace qc_int
