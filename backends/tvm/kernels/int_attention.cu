// qcompiler's fused integer attention for tvm-cuda: one kernel computes, per (batch, head) and
// block of 64 query rows,
//   s = requant1(q @ k^T)                       (int32 accumulators, qc::requant per tensor)
//   p = int_softmax(s, mask)                    (qc::int_softmax along the keys, int8 out)
//   o = requant2(p @ v)                         (per tensor)
//   y = requant3(o)                             (optional: the per-channel requant that follows
//                                                the heads' merge, channel = head * D + d)
// bit for bit as the reference kernels of qcompiler/int_ops.py compute them op by op. Scores,
// probabilities and outputs stay in registers: the two matmuls are mma.sync m16n8k32 int8
// tensor-core instructions, q / k / v are read once through shared memory, straight from the
// layout the linears wrote (strided views: no transposes), and y is written in the layout the
// next op reads (the heads merged back into channels).
//
// Exported through tvm_ffi (called from the Relax graph with R.call_dps_packed):
//   qc.cuda.int_attention(q, k, v, table [T] int32, params [P_LEN] int64, mult3 [C] int64,
//                         shift3 [C] int64, batch, heads, sq, sk, d, y)
//   qc.cuda.int_attention_masked(q, k, v, mask, table, params, mult3, shift3, batch, heads, sq, sk,
//                                d, y)
//   qc.cuda.int_attention[_masked]_hi(q, k, v, [mask,] table, factors [512] float64, params, ...): the
//     same, in 32-bit words, the scores cached in shared memory, e(d) from two factor tables there
//     and a float64 FMA per probability, for the constants fuse_attention.hi_ok / exp_factors admit
//     (see attention_hi)
// q, k, v: int8 buffers that the views in `params` index (element (b, h, i, j) of q at
// q[off + b sb + h sh + i ss + j]); mask: bool / int8, indexed the same way (strides, 0 where it
// broadcasts); y: int8 or int16. `params` (see the P_* offsets) holds the views and the requant /
// softmax constants; the translation (backends/tvm/fuse_attention.py) guarantees what the kernel
// relies on: d in {32, 64}, 1 <= sk <= 256, every q / k / v offset and stride a multiple of 16
// bytes with unit stride along d, every index the views form inside its buffer, the softmax
// table and constants as qc.cuda.int_softmax takes them (|mult| * max(table) < 2^53,
// sk * max(table) < 2^53), the softmax's output within int8, requant1's within int32.
#include <climits>
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

#include "qc_int.cuh"

namespace qc_attn {

using qc_int::clamp64;
using qc_int::requant;
using qc_int::rshift_round;
using tvm::ffi::TensorView;

constexpr int kWarps = 4;            // a warp owns 16 query rows
constexpr int kRows = 16 * kWarps;   // query rows per block
constexpr int kFactors = 256;        // attention_hi: entries of each factor table (d = 256 a + b)

// params: four int64 per view (offset, batch, head, row strides; unit stride along d), then the
// constants of requant1 / softmax / requant2 / requant3
enum : int {
  P_Q = 0, P_K = 4, P_V = 8, P_Y = 12, P_MASK = 16,     // mask: batch, head, query, key strides
  P_R1 = 20,                                            // in_zp, mult, shift, out_zp, qmin, qmax
  P_SM = 26,                                            // mult, shift, out_zp, qmin, qmax
  P_R2 = 31,                                            // in_zp, mult, shift, out_zp, qmin, qmax
  P_R3 = 37,                                            // present, per_channel, in_zp, out_zp, qmin, qmax
  P_FEXP = 43,                                          // attention_hi: k, its rounding margin 2^-k (0: none), and
  P_TE0 = 44,                                           // e at d = 0 (fuse_attention.exp_factors)
  P_LEN = 45
};

__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The probabilities p leave the first mma as C fragments (thread (g, t) of a warp holds keys
// 8 nt + 2t, 8 nt + 2t + 1 of rows g and g + 8) and enter the second as A fragments (keys 4t .. 4t + 3
// and 16 + 4t .. 16 + 4t + 3 of each 32-key chunk). Instead of moving values between threads, the
// keys of each chunk are renumbered: A slot 4t + i holds key 2t + (i & 1) + 8 (i >> 1) (16 more for
// the upper half), which is where the thread's C values already are, and v's rows are stored in
// shared memory in slot order. The sum over keys is the same integer sum in another order.
__device__ __forceinline__ int key_slot(int key) {  // key in [0, 32) -> its slot
  int r = key & 15;
  return (key & 16) + 4 * ((r & 7) >> 1) + 2 * (r >> 3) + (r & 1);
}

__device__ __forceinline__ uint32_t pack4(int a, int b, int c, int d) {
  return (uint32_t(uint8_t(a))) | (uint32_t(uint8_t(b)) << 8) | (uint32_t(uint8_t(c)) << 16) |
         (uint32_t(uint8_t(d)) << 24);
}

// q's kRows rows of the block (unless sq_ is null) and all of k in shared memory as rows of D bytes
// (zero rows past sq and sk), v transposed with its keys in slot order (key_slot) for the second mma's B fragments
template <int D, int NK, int LDQ, int LDV>
__device__ __forceinline__ void load_qkv(const int8_t* __restrict__ q, const int8_t* __restrict__ k,
                                         const int8_t* __restrict__ v, const int64_t* __restrict__ prm, int64_t b,
                                         int64_t h, int64_t q0, int64_t sq, int64_t sk, int8_t* sq_, int8_t* sk_,
                                         int8_t* svt) {
  constexpr int PR = D / 16;  // 16-byte pieces per row of q / k / v
  const int tid = threadIdx.x;
  const int8_t* kb = k + __ldg(prm + P_K) + b * __ldg(prm + P_K + 1) + h * __ldg(prm + P_K + 2);
  const int8_t* vb = v + __ldg(prm + P_V) + b * __ldg(prm + P_V + 1) + h * __ldg(prm + P_V + 2);
  const int8_t* qb = q + __ldg(prm + P_Q) + b * __ldg(prm + P_Q + 1) + h * __ldg(prm + P_Q + 2);
  const int64_t kss = __ldg(prm + P_K + 3), vss = __ldg(prm + P_V + 3), qss = __ldg(prm + P_Q + 3);
  for (int i = tid; i < NK * PR; i += kWarps * 32) {
    int j = i / PR, p = i % PR;
    uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
    if (j < sk) {
      kv = *reinterpret_cast<const uint4*>(kb + j * kss + 16 * p);
      vv = *reinterpret_cast<const uint4*>(vb + j * vss + 16 * p);
    }
    *reinterpret_cast<uint4*>(sk_ + j * LDQ + 16 * p) = kv;
    const int slot = (j & ~31) + key_slot(j & 31);
    const int8_t* vbytes = reinterpret_cast<const int8_t*>(&vv);
#pragma unroll
    for (int x = 0; x < 16; ++x) svt[(16 * p + x) * LDV + slot] = vbytes[x];
  }
  if (sq_ == nullptr) return;  // attention_hi reads q's fragments from device memory
  for (int i = tid; i < kRows * PR; i += kWarps * 32) {
    int r = i / PR, p = i % PR;
    uint4 qv = make_uint4(0, 0, 0, 0);
    if (q0 + r < sq) qv = *reinterpret_cast<const uint4*>(qb + (q0 + r) * qss + 16 * p);
    *reinterpret_cast<uint4*>(sq_ + r * LDQ + 16 * p) = qv;
  }
}

template <int D, int KT, class Out, bool Masked>
__global__ void __launch_bounds__(kWarps * 32)
    attention_kernel(const int8_t* __restrict__ q, const int8_t* __restrict__ k, const int8_t* __restrict__ v,
              const int8_t* __restrict__ mask, const int32_t* __restrict__ tab, int64_t tlen,
              const int64_t* __restrict__ prm, const int64_t* __restrict__ mult3, const int64_t* __restrict__ shift3,
              int64_t heads, int64_t sq, int64_t sk, Out* __restrict__ y) {
  constexpr int NK = 32 * KT;  // keys, padded to whole chunks
  constexpr int NT = 4 * KT;   // 8-key tiles
  constexpr int LDQ = D + 16;  // bytes per shared row of q and k (the pad spreads a fragment's rows over banks)
  constexpr int LDV = NK + 16; // bytes per shared row of v^T
  __shared__ __align__(16) int8_t sq_[kRows * LDQ];
  __shared__ __align__(16) int8_t sk_[NK * LDQ];
  __shared__ __align__(16) int8_t svt[D * LDV];

  const int64_t b = blockIdx.y / heads, h = blockIdx.y % heads;
  const int64_t q0 = int64_t(blockIdx.x) * kRows;
  const int tid = threadIdx.x;
  load_qkv<D, NK, LDQ, LDV>(q, k, v, prm, b, h, q0, sq, sk, sq_, sk_, svt);
  __syncthreads();

  const int warp = tid / 32, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int r0 = warp * 16;
  if (q0 + r0 >= sq) return;  // a warp whose 16 rows are all past sq (DeiT's 197: 3 of the last block's 4)
  // ---- scores: acc[nt] is the C fragment of keys 8 nt .. 8 nt + 7
  int acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0;
#pragma unroll
  for (int kk = 0; kk < D / 32; ++kk) {
    const int8_t* qa = sq_ + (r0 + g) * LDQ + kk * 32 + 4 * t;
    uint32_t a[4] = {*reinterpret_cast<const uint32_t*>(qa), *reinterpret_cast<const uint32_t*>(qa + 8 * LDQ),
                     *reinterpret_cast<const uint32_t*>(qa + 16), *reinterpret_cast<const uint32_t*>(qa + 8 * LDQ + 16)};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int8_t* kr = sk_ + (8 * nt + g) * LDQ + kk * 32 + 4 * t;
      mma_s8(acc[nt], a, *reinterpret_cast<const uint32_t*>(kr), *reinterpret_cast<const uint32_t*>(kr + 16));
    }
  }

  // ---- requant1, then the softmax of rows ra = q0 + r0 + g and rb = ra + 8 (a quad of threads each)
  const int64_t ra = q0 + r0 + g, rb = ra + 8;
  {
    const int64_t zi = __ldg(prm + P_R1), m1 = __ldg(prm + P_R1 + 1), c1 = __ldg(prm + P_R1 + 2),
                  zo = __ldg(prm + P_R1 + 3), lo = __ldg(prm + P_R1 + 4), hi = __ldg(prm + P_R1 + 5);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = int(requant(acc[nt][e], zi, m1, c1, zo, lo, hi));
  }
  // keep bit of (tile nt, entry e) at 2 nt + (e & 1) in kept[e >> 1]: the key is inside sk and, with
  // a mask, not masked (query rows past sq are computed unmasked and never stored)
  uint64_t kept[2] = {0, 0};
  const int8_t* mrow[2] = {nullptr, nullptr};
  int64_t msk = 0;
  if constexpr (Masked) {
    const int64_t base = b * __ldg(prm + P_MASK) + h * __ldg(prm + P_MASK + 1);
    const int64_t msq = __ldg(prm + P_MASK + 2);
    msk = __ldg(prm + P_MASK + 3);
    mrow[0] = ra < sq ? mask + base + ra * msq : nullptr;
    mrow[1] = rb < sq ? mask + base + rb * msq : nullptr;
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = 8 * nt + 2 * t + (e & 1);
      bool keep = j < sk;
      if constexpr (Masked) {
        const int8_t* mr = mrow[e >> 1];
        if (keep && mr) keep = mr[j * msk] != 0;
      }
      if (keep) kept[e >> 1] |= uint64_t(1) << (2 * nt + (e & 1));
    }
  int mx[2] = {INT_MIN, INT_MIN};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if ((kept[e >> 1] >> (2 * nt + (e & 1))) & 1) mx[e >> 1] = max(mx[e >> 1], acc[nt][e]);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = max(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = max(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
  }
  const int64_t top = tlen - 1;
  int64_t sum[2] = {0, 0};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      int ev = 0;
      if ((kept[e >> 1] >> (2 * nt + (e & 1))) & 1) {
        const int64_t d = int64_t(mx[e >> 1]) - acc[nt][e];
        ev = __ldg(tab + (d < top ? d : top));
      }
      acc[nt][e] = ev;
      sum[e >> 1] += ev;
    }
  const int64_t sm_mult = __ldg(prm + P_SM), sm_shift = __ldg(prm + P_SM + 1), sm_zp = __ldg(prm + P_SM + 2),
                sm_lo = __ldg(prm + P_SM + 3), sm_hi = __ldg(prm + P_SM + 4);
  double inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
    sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
    sum[r] = sum[r] < 1 ? 1 : sum[r];
    inv[r] = static_cast<double>(sm_mult) / static_cast<double>(sum[r]);
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t ev = acc[nt][e], s = sum[e >> 1];
      const int64_t tq = qc_int::floordiv_est(ev * sm_mult, s, static_cast<double>(ev) * inv[e >> 1]);
      const int64_t j = 8 * nt + 2 * t + (e & 1);
      // keys past sk multiply v's zero rows; they are set to 0 all the same
      acc[nt][e] = j < sk ? int(clamp64(rshift_round(tq, sm_shift) + sm_zp, sm_lo, sm_hi)) : 0;
    }

  // ---- o = p @ v: p's A fragments straight from the registers (slot order), v^T from shared memory
  int o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0;
#pragma unroll
  for (int c = 0; c < KT; ++c) {
    uint32_t a[4];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int* lo_t = acc[4 * c + 2 * half];
      const int* hi_t = acc[4 * c + 2 * half + 1];
      a[2 * half] = pack4(lo_t[0], lo_t[1], hi_t[0], hi_t[1]);      // row g
      a[2 * half + 1] = pack4(lo_t[2], lo_t[3], hi_t[2], hi_t[3]);  // row g + 8
    }
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int8_t* vr = svt + (8 * dn + g) * LDV + 32 * c + 4 * t;
      mma_s8(o[dn], a, *reinterpret_cast<const uint32_t*>(vr), *reinterpret_cast<const uint32_t*>(vr + 16));
    }
  }

  // ---- requant2 (and requant3), stored through y's view
  const int64_t z2 = __ldg(prm + P_R2), m2 = __ldg(prm + P_R2 + 1), c2 = __ldg(prm + P_R2 + 2),
                zo2 = __ldg(prm + P_R2 + 3), lo2 = __ldg(prm + P_R2 + 4), hi2 = __ldg(prm + P_R2 + 5);
  const bool r3 = __ldg(prm + P_R3) != 0, per_ch = __ldg(prm + P_R3 + 1) != 0;
  const int64_t z3 = __ldg(prm + P_R3 + 2), zo3 = __ldg(prm + P_R3 + 3), lo3 = __ldg(prm + P_R3 + 4),
                hi3 = __ldg(prm + P_R3 + 5);
  Out* yb = y + __ldg(prm + P_Y) + b * __ldg(prm + P_Y + 1) + h * __ldg(prm + P_Y + 2);
  const int64_t yss = __ldg(prm + P_Y + 3);
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t row = e < 2 ? ra : rb;
      if (row >= sq) continue;
      const int64_t dd = 8 * dn + 2 * t + (e & 1);
      int64_t val = requant(o[dn][e], z2, m2, c2, zo2, lo2, hi2);
      if (r3) {
        const int64_t ch = per_ch ? h * D + dd : 0;
        val = requant(val, z3, __ldg(mult3 + ch), __ldg(shift3 + ch), zo3, lo3, hi3);
      }
      yb[row * yss + dd] = static_cast<Out>(val);
    }
}

// ---- the hi variant ---------------------------------------------------------------------------
// The same integers as attention_kernel, for blocks whose constants the translation checked
// (fuse_attention.hi_ok): requant1 and requant2 with in_zp 0 and shifts 32..62 (smaller ones
// scaled up by the translation, their multipliers with them, within 2^39), requant3's per-channel
// shifts 32..62 (qc_int::requant_hi), requant1's output within int16, the softmax's
// multiplier M > 0 with M / 2^c <= 2^20, and a table that fuse_attention.exp_factors factored
// (entries at most 2^16, all but e(0) below 0xFFFF). It differs from attention_kernel in three ways.
// - The keys are walked three times, a 32-key chunk at a time, through a per-warp cache in shared
//   memory (each thread's own fragment slots, 8 bytes per 8-key tile: no barrier, no bank
//   conflict), not in registers: pass 1 computes the chunk's scores (tensor-core mma and requant1),
//   keeps them there as int16 pairs with the keys' keep bits, and takes the row maxima; pass 2
//   reads the scores, sums e = table[min(max - s, T - 1)] per row and overwrites each score with
//   its e as uint16 (e(0) = 2^16 as 0xFFFF); pass 3 reads e, forms the int8 probabilities and
//   feeds them to the p @ v mma. Registers do not grow with the keys (attention_kernel took 168 at
//   DeiT's 197), so more warps share a multiprocessor, and each score's mma, requant1 and e are
//   computed once.
// - e is not gathered from the table (65536 int32 entries for the models' scores) but computed
//   from two 256-entry float64 factor tables in shared memory, p = H[d >> 8] L[d & 255]: rint(p)
//   (__dmul_rn, __dadd_rn: no FMA contraction). exp_factors checked every entry with the same IEEE
//   operations; where all are rint(p) (k = 0: the models' tables) that is e; else e = rint(p) where
//   p is more than 2^-k from a half-integer and the other entries are gathered.
// - The softmax's y - out_zp = rshift_round(floor(e M / S), c) = floor(e M / (S 2^c) + 1/2) (c >= 1;
//   without the 1/2 for c = 0; e >= 0, M > 0) is floor of one float64 FMA e F + 1/2 with
//   F = M / (S 2^c) per row: its error is below 2^-31 for values up to 2^20, so the floors of the
//   FMA's value -/+ 2^-30 agree and are the answer unless an integer lies within 2^-30 of it; those
//   (rare) entries take the int64 division of attention_kernel. e = 0 gives 0.
// Floors in float64 without a conversion: adding 2^52 rounding down leaves floor(x) in the low word.
// Keys past sk get e = 0 and multiply v's zero rows in pass 3.
constexpr int kHiBlocks = 5;  // attention_hi's blocks per multiprocessor (registers: at most 102)

// attention_hi's dynamic shared memory: the factor tables, k, v^T, the warps' score / e caches
// (uint2 per thread and 8-key tile) and keep bits (a word per thread and chunk)
template <int D, int KT>
constexpr int hi_smem_bytes() {
  return 2 * kFactors * 8 + 32 * KT * (D + 16) + D * (32 * KT + 16) + kWarps * 4 * KT * 32 * 8 + kWarps * KT * 32 * 4;
}

__device__ __forceinline__ uint32_t pack16(int a, int b) { return (uint32_t(a) & 0xFFFFu) | (uint32_t(b) << 16); }

template <int D, int KT, class Out, bool Masked>
__global__ void __launch_bounds__(kWarps * 32, kHiBlocks)
    attention_hi(const int8_t* __restrict__ q, const int8_t* __restrict__ k, const int8_t* __restrict__ v,
                 const int8_t* __restrict__ mask, const int32_t* __restrict__ tab, const double* __restrict__ fac,
                 int64_t tlen, const int64_t* __restrict__ prm, const int64_t* __restrict__ mult3,
                 const int64_t* __restrict__ shift3, int64_t heads, int64_t sq, int64_t sk, Out* __restrict__ y) {
  using qc_int::requant_hi;
  constexpr int NK = 32 * KT;
  constexpr int NT = 4 * KT;
  constexpr int LDQ = D + 16;
  constexpr int LDV = NK + 16;
  extern __shared__ __align__(16) unsigned char smem[];
  double* sfac = reinterpret_cast<double*>(smem);  // H, then L (fuse_attention.exp_factors)
  int8_t* sk_ = reinterpret_cast<int8_t*>(smem + 2 * kFactors * 8);
  int8_t* svt = sk_ + NK * LDQ;
  uint2* cache = reinterpret_cast<uint2*>(svt + D * LDV);
  uint32_t* keepw = reinterpret_cast<uint32_t*>(cache + kWarps * NT * 32);

  const int64_t b = blockIdx.y / heads, h = blockIdx.y % heads;
  const int64_t q0 = int64_t(blockIdx.x) * kRows;
  load_qkv<D, NK, LDQ, LDV>(q, k, v, prm, b, h, q0, sq, sk, nullptr, sk_, svt);
  for (int i = threadIdx.x; i < 2 * kFactors; i += kWarps * 32) sfac[i] = __ldg(fac + i);
  __syncthreads();

  const int tid = threadIdx.x, warp = tid / 32, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int r0 = warp * 16;
  if (q0 + r0 >= sq) return;  // no row of this warp is stored (no barrier follows)
  const int64_t ra = q0 + r0 + g, rb = ra + 8;
  const int sk32 = int(sk);
  uint2* cw = cache + warp * NT * 32 + lane;  // this thread's slot of tile nt: cw[32 nt]
  uint32_t* kw = keepw + warp * KT * 32 + lane;

  // requant1 / requant2: in_zp 0, the shift 32..62 (the translation scales one below 32 up with its
  // multiplier: fuse_attention.hi_params), |acc| < 2^23 times |m| < 2^39
  const int64_t m1 = __ldg(prm + P_R1 + 1);
  const int32_t c1 = int32_t(__ldg(prm + P_R1 + 2)), zo1 = int32_t(__ldg(prm + P_R1 + 3)),
                lo1 = int32_t(__ldg(prm + P_R1 + 4)), hi1 = int32_t(__ldg(prm + P_R1 + 5));

  // ---- pass 1: scores (q's A fragments from device memory, rows past sq as zeros), keep bits, row maxima
  int mx[2] = {INT_MIN, INT_MIN};
  {
    uint32_t qa[D / 32][4];
    const int8_t* qb = q + __ldg(prm + P_Q) + b * __ldg(prm + P_Q + 1) + h * __ldg(prm + P_Q + 2);
    const int64_t qss = __ldg(prm + P_Q + 3);
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk)
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int64_t row = (x & 1) ? rb : ra;
        qa[kk][x] = row < sq ? __ldg(reinterpret_cast<const uint32_t*>(qb + row * qss + kk * 32 + 4 * t + 16 * (x >> 1)))
                             : 0u;
      }
    const int8_t* mrow[2] = {nullptr, nullptr};
    int64_t msk = 0;
    if constexpr (Masked) {
      const int64_t base = b * __ldg(prm + P_MASK) + h * __ldg(prm + P_MASK + 1);
      const int64_t msq = __ldg(prm + P_MASK + 2);
      msk = __ldg(prm + P_MASK + 3);
      mrow[0] = ra < sq ? mask + base + ra * msq : nullptr;
      mrow[1] = rb < sq ? mask + base + rb * msq : nullptr;
    }
#pragma unroll 1
    for (int c = 0; c < KT; ++c) {
      uint32_t kb = 0;  // bit 4 u + e: entry e of tile 4 c + u is a kept key
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int nt = 4 * c + u;
        int acc[4] = {0, 0, 0, 0};
#pragma unroll
        for (int kk = 0; kk < D / 32; ++kk) {
          const int8_t* kr = sk_ + (8 * nt + g) * LDQ + kk * 32 + 4 * t;
          mma_s8(acc, qa[kk], *reinterpret_cast<const uint32_t*>(kr), *reinterpret_cast<const uint32_t*>(kr + 16));
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc[e] = qc_int::clamp32(qc_int::rshift_round_hi(int64_t(acc[e]) * m1, c1) + zo1, lo1, hi1);
          const int j = 8 * nt + 2 * t + (e & 1);
          bool keep = j < sk32;
          if constexpr (Masked) {
            const int8_t* mr = mrow[e >> 1];
            if (keep && mr) keep = mr[j * msk] != 0;
          }
          if (keep) {
            kb |= 1u << (4 * u + e);
            mx[e >> 1] = max(mx[e >> 1], acc[e]);
          }
        }
        cw[32 * nt] = make_uint2(pack16(acc[0], acc[1]), pack16(acc[2], acc[3]));
      }
      kw[32 * c] = kb;
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = max(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = max(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
  }

  // e = table[min(d, T - 1)] of score sv in row r, from the factor tables (d >= 0 for a kept key:
  // scores within int16)
  const int top = int(tlen - 1);
  const int fexp = int(__ldg(prm + P_FEXP));
  const int32_t te0 = int32_t(__ldg(prm + P_TE0));
  constexpr double kTwo52 = 4503599627370496.0, kEps = 9.313225746154785e-10;  // 2^52, 2^-30
  const double near = 0.5 - ldexp(1.0, -fexp);
  auto expv = [&](int sv, int r) -> int32_t {
    const int d = mx[r] - sv;
    const int dd = d < top ? d : top;
    const double pv = __dmul_rn(sfac[dd >> 8], sfac[kFactors + (dd & (kFactors - 1))]);
    const double yv = __dadd_rn(pv, kTwo52);  // rint(pv) in the low word
    if (fexp == 0) return __double2loint(yv);  // every entry is rint(p) (uniform branch)
    if (d == 0) return te0;
    if (fabs(__dsub_rn(pv, __dsub_rn(yv, kTwo52))) <= near) return __double2loint(yv);
    return __ldg(tab + dd);
  };

  // ---- pass 2: the row sums of e (below 2^24); e replaces the score in the cache
  int32_t sum32[2] = {0, 0};
#pragma unroll 1
  for (int c = 0; c < KT; ++c) {
    const uint32_t kb = kw[32 * c];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const uint2 w = cw[32 * (4 * c + u)];
      const int sv[4] = {int(int16_t(w.x & 0xFFFFu)), int(w.x) >> 16, int(int16_t(w.y & 0xFFFFu)), int(w.y) >> 16};
      uint32_t ec[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int32_t ev = (kb >> (4 * u + e)) & 1u ? expv(sv[e], e >> 1) : 0;
        sum32[e >> 1] += ev;
        ec[e] = min(uint32_t(ev), 0xFFFFu);  // e(0) = 2^16 -> 0xFFFF, which no other entry is
      }
      cw[32 * (4 * c + u)] = make_uint2(ec[0] | (ec[1] << 16), ec[2] | (ec[3] << 16));
    }
  }
  const int64_t sm_mult = __ldg(prm + P_SM), sm_shift = __ldg(prm + P_SM + 1);
  const int32_t sm_zp = int32_t(__ldg(prm + P_SM + 2)), sm_lo = int32_t(__ldg(prm + P_SM + 3)),
                sm_hi = int32_t(__ldg(prm + P_SM + 4));
  const double half = sm_shift >= 1 ? 0.5 : 0.0;
  int64_t sum[2];
  double f[2], inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int32_t sv = sum32[r];
    sv += __shfl_xor_sync(0xffffffffu, sv, 1);
    sv += __shfl_xor_sync(0xffffffffu, sv, 2);
    sum[r] = sv < 1 ? 1 : sv;
    inv[r] = static_cast<double>(sm_mult) / static_cast<double>(sum[r]);  // the exact path's estimate
    f[r] = ldexp(inv[r], -int(sm_shift));                                  // M / (S 2^c), one rounding
  }
  // the softmax's int8 output for e = ev in row r
  auto prob = [&](int32_t ev, int r) -> int {
    int qv = 0;
    if (ev != 0) {
      const double ed = __hiloint2double(0x43300000, ev) - kTwo52;  // ev as a double (0 <= ev < 2^31)
      const double u = __fma_rn(ed, f[r], half - kEps), w = __fma_rn(ed, f[r], half + kEps);
      const int fu = __double2loint(__dadd_rd(u, kTwo52)), fw = __double2loint(__dadd_rd(w, kTwo52));
      if (fu == fw) {
        qv = fu;
      } else {  // within 2^-30 of an integer: the int64 division
        const int64_t tq = qc_int::floordiv_est(int64_t(ev) * sm_mult, sum[r], static_cast<double>(ev) * inv[r]);
        qv = int(rshift_round(tq, sm_shift));
      }
    }
    return qc_int::clamp32(qv + sm_zp, sm_lo, sm_hi);
  };

  // ---- pass 3: o = p @ v, a 32-key chunk at a time (p's A fragments in slot order, as attention_kernel)
  int o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0;
#pragma unroll 1
  for (int c = 0; c < KT; ++c) {
    int pr[4][4];  // the chunk's probabilities: tile 4c + u, entry e
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const uint2 w = cw[32 * (4 * c + u)];
      const uint32_t ec[4] = {w.x & 0xFFFFu, w.x >> 16, w.y & 0xFFFFu, w.y >> 16};
#pragma unroll
      for (int e = 0; e < 4; ++e) pr[u][e] = prob(int32_t(ec[e] + (ec[e] == 0xFFFFu ? 1u : 0u)), e >> 1);
    }
    uint32_t a[4];
#pragma unroll
    for (int half_ = 0; half_ < 2; ++half_) {
      const int lt = 2 * half_, ht = lt + 1;
      a[2 * half_] = pack4(pr[lt][0], pr[lt][1], pr[ht][0], pr[ht][1]);      // row g
      a[2 * half_ + 1] = pack4(pr[lt][2], pr[lt][3], pr[ht][2], pr[ht][3]);  // row g + 8
    }
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int8_t* vr = svt + (8 * dn + g) * LDV + 32 * c + 4 * t;
      mma_s8(o[dn], a, *reinterpret_cast<const uint32_t*>(vr), *reinterpret_cast<const uint32_t*>(vr + 16));
    }
  }

  // ---- requant2 (and requant3), hi, stored through y's view
  const int64_t m2 = __ldg(prm + P_R2 + 1);
  const int32_t c2 = int32_t(__ldg(prm + P_R2 + 2)), zo2 = int32_t(__ldg(prm + P_R2 + 3)),
                lo2 = int32_t(__ldg(prm + P_R2 + 4)), hi2 = int32_t(__ldg(prm + P_R2 + 5));
  const bool r3 = __ldg(prm + P_R3) != 0, per_ch = __ldg(prm + P_R3 + 1) != 0;
  const int32_t z3 = int32_t(__ldg(prm + P_R3 + 2)), zo3 = int32_t(__ldg(prm + P_R3 + 3)),
                lo3 = int32_t(__ldg(prm + P_R3 + 4)), hi3 = int32_t(__ldg(prm + P_R3 + 5));
  Out* yb = y + __ldg(prm + P_Y) + b * __ldg(prm + P_Y + 1) + h * __ldg(prm + P_Y + 2);
  const int64_t yss = __ldg(prm + P_Y + 3);
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t row = e < 2 ? ra : rb;
      if (row >= sq) continue;
      const int dd = 8 * dn + 2 * t + (e & 1);
      int32_t val = qc_int::clamp32(qc_int::rshift_round_hi(int64_t(o[dn][e]) * m2, c2) + zo2, lo2, hi2);
      if (r3) {
        const int64_t ch = per_ch ? h * D + dd : 0;
        val = requant_hi(val - z3, int32_t(__ldg(mult3 + ch)), int32_t(__ldg(shift3 + ch)), zo3, lo3, hi3);
      }
      yb[row * yss + dd] = static_cast<Out>(val);
    }
}

// ---- host side --------------------------------------------------------------------------------

void check_int8(const TensorView& t, const char* what) { qc_int::check(t, kDLInt, 8, "qc int_attention", what); }

template <int D, int KT, class Out, bool Masked>
void launch_hi(dim3 grid, cudaStream_t st, const int8_t* q, const int8_t* k, const int8_t* v, const int8_t* m,
               const int32_t* tab, const double* fac, int64_t tlen, const int64_t* prm, const int64_t* m3,
               const int64_t* s3, int64_t heads, int64_t sq, int64_t sk, Out* y) {
  constexpr int bytes = hi_smem_bytes<D, KT>();  // above the 48 KB a launch gets without asking
  static const cudaError_t opt_in = cudaFuncSetAttribute(attention_hi<D, KT, Out, Masked>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  TVM_FFI_ICHECK(opt_in == cudaSuccess) << "qc int_attention: " << bytes << " bytes of shared memory refused: "
                                        << cudaGetErrorString(opt_in);
  attention_hi<D, KT, Out, Masked><<<grid, kWarps * 32, bytes, st>>>(q, k, v, m, tab, fac, tlen, prm, m3, s3, heads,
                                                                     sq, sk, y);
}

template <int D, class Out, bool Masked, bool Hi>
void launch_kt(int64_t sk, dim3 grid, cudaStream_t st, const int8_t* q, const int8_t* k, const int8_t* v,
               const int8_t* m, const int32_t* tab, const double* fac, int64_t tlen, const int64_t* prm, const int64_t* m3,
               const int64_t* s3, int64_t heads, int64_t sq, Out* y) {
  // key chunks: 2, 4, 7 (DeiT's 197 tokens) or 8, the fewest that cover sk
  int64_t chunks = (sk + 31) / 32;
#define QC_ATTN_LAUNCH(KT)                                                                                       \
  if constexpr (Hi)                                                                                              \
    launch_hi<D, KT, Out, Masked>(grid, st, q, k, v, m, tab, fac, tlen, prm, m3, s3, heads, sq, sk, y);          \
  else                                                                                                           \
    attention_kernel<D, KT, Out, Masked><<<grid, kWarps * 32, 0, st>>>(                                          \
        q, k, v, m, tab, tlen, prm, m3, s3, heads, sq, sk, y)
  if (chunks <= 2)
    QC_ATTN_LAUNCH(2);
  else if (chunks <= 4)
    QC_ATTN_LAUNCH(4);
  else if (chunks <= 7)
    QC_ATTN_LAUNCH(7);
  else
    QC_ATTN_LAUNCH(8);
#undef QC_ATTN_LAUNCH
}

template <bool Hi>
void attention_impl(TensorView q, TensorView k, TensorView v, const TensorView* mask, TensorView tab,
                    const TensorView* fac, TensorView prm, TensorView mult3, TensorView shift3, int64_t batch, int64_t heads, int64_t sq, int64_t sk,
                    int64_t d, TensorView y) {
  check_int8(q, "q");
  check_int8(k, "k");
  check_int8(v, "v");
  qc_int::check(tab, kDLInt, 32, "qc int_attention", "table");
  if (Hi) {  // attention_hi's factor tables (fuse_attention.exp_factors); d's factor index below kFactors
    qc_int::check(*fac, kDLFloat, 64, "qc int_attention", "factors");
    TVM_FFI_ICHECK(qc_int::numel(*fac) == 2 * kFactors && qc_int::numel(tab) <= kFactors * kFactors)
        << "qc int_attention: factors must have " << 2 * kFactors << " entries and the table at most "
        << kFactors * kFactors;
  }
  qc_int::check(prm, kDLInt, 64, "qc int_attention", "params");
  qc_int::check(mult3, kDLInt, 64, "qc int_attention", "mult3");
  qc_int::check(shift3, kDLInt, 64, "qc int_attention", "shift3");
  TVM_FFI_ICHECK(qc_int::numel(prm) == P_LEN) << "qc int_attention: params must have " << P_LEN << " entries";
  TVM_FFI_ICHECK(qc_int::numel(tab) >= 1) << "qc int_attention: empty table";
  TVM_FFI_ICHECK(d == 32 || d == 64) << "qc int_attention: head size " << d << " (32 or 64 only)";
  TVM_FFI_ICHECK(sk >= 1 && sk <= 256 && sq >= 0 && batch >= 0 && heads >= 1)
      << "qc int_attention: sizes out of range (1 <= keys <= 256)";
  TVM_FFI_ICHECK(qc_int::numel(y) >= batch * heads * sq * d) << "qc int_attention: y too small";
  if (mask) {
    DLDataType md = mask->dtype();
    // bool or int8: one byte a value, 0 or 1 (TVM's bool is uint1 stored in a byte)
    TVM_FFI_ICHECK(md.lanes == 1 && ((md.bits == 8 && (md.code == kDLInt || md.code == kDLUInt || md.code == kDLBool)) ||
                                     (md.bits == 1 && (md.code == kDLUInt || md.code == kDLBool))) &&
                   mask->device().device_type == kDLCUDA)
        << "qc int_attention: the mask must be a one-byte bool / int8 tensor on the GPU";
  }
  if (batch == 0 || sq == 0) return;
  dim3 grid(static_cast<unsigned>((sq + kRows - 1) / kRows), static_cast<unsigned>(batch * heads));
  cudaStream_t st = qc_int::stream_of(q);
  auto qp = static_cast<const int8_t*>(q.data_ptr()), kp = static_cast<const int8_t*>(k.data_ptr()),
       vp = static_cast<const int8_t*>(v.data_ptr());
  const int8_t* mp = mask ? static_cast<const int8_t*>(mask->data_ptr()) : nullptr;
  auto tp = static_cast<const int32_t*>(tab.data_ptr());
  const double* fp = fac ? static_cast<const double*>(fac->data_ptr()) : nullptr;
  auto pp = static_cast<const int64_t*>(prm.data_ptr()), m3 = static_cast<const int64_t*>(mult3.data_ptr()),
       s3 = static_cast<const int64_t*>(shift3.data_ptr());
  auto go = [&](auto out, auto masked) {
    using Out = decltype(out);
    constexpr bool M = decltype(masked)::value;
    Out* yp = static_cast<Out*>(y.data_ptr());
    if (d == 32)
      launch_kt<32, Out, M, Hi>(sk, grid, st, qp, kp, vp, mp, tp, fp, tab.size(0), pp, m3, s3, heads, sq, yp);
    else
      launch_kt<64, Out, M, Hi>(sk, grid, st, qp, kp, vp, mp, tp, fp, tab.size(0), pp, m3, s3, heads, sq, yp);
  };
  auto by_mask = [&](auto out) {
    if (mp)
      go(out, std::true_type());
    else
      go(out, std::false_type());
  };
  if (qc_int::is_dtype(y, kDLInt, 8))
    by_mask(int8_t());
  else if (qc_int::is_dtype(y, kDLInt, 16))
    by_mask(int16_t());
  else
    TVM_FFI_THROW(TypeError) << "qc int_attention: y must be int8 or int16";
  TVM_FFI_ICHECK(cudaGetLastError() == cudaSuccess) << "qc int_attention: launch failed";
}

void call(TensorView q, TensorView k, TensorView v, TensorView tab, TensorView prm, TensorView mult3,
               TensorView shift3, int64_t batch, int64_t heads, int64_t sq, int64_t sk, int64_t d, TensorView y) {
  attention_impl<false>(q, k, v, nullptr, tab, nullptr, prm, mult3, shift3, batch, heads, sq, sk, d, y);
}

void call_masked(TensorView q, TensorView k, TensorView v, TensorView mask, TensorView tab, TensorView prm,
                      TensorView mult3, TensorView shift3, int64_t batch, int64_t heads, int64_t sq, int64_t sk,
                      int64_t d, TensorView y) {
  attention_impl<false>(q, k, v, &mask, tab, nullptr, prm, mult3, shift3, batch, heads, sq, sk, d, y);
}

// the translation checked the constants as attention_hi needs them (fuse_attention.hi_ok, exp_factors)
void call_hi(TensorView q, TensorView k, TensorView v, TensorView tab, TensorView fac, TensorView prm,
                  TensorView mult3, TensorView shift3, int64_t batch, int64_t heads, int64_t sq, int64_t sk, int64_t d,
                  TensorView y) {
  attention_impl<true>(q, k, v, nullptr, tab, &fac, prm, mult3, shift3, batch, heads, sq, sk, d, y);
}

void call_masked_hi(TensorView q, TensorView k, TensorView v, TensorView mask, TensorView tab, TensorView fac,
                         TensorView prm, TensorView mult3, TensorView shift3, int64_t batch, int64_t heads, int64_t sq,
                         int64_t sk, int64_t d, TensorView y) {
  attention_impl<true>(q, k, v, &mask, tab, &fac, prm, mult3, shift3, batch, heads, sq, sk, d, y);
}

}  // namespace qc_attn

TVM_FFI_STATIC_INIT_BLOCK() {
  using tvm::ffi::Function;
  Function::SetGlobal("qc.cuda.int_attention", Function::FromTyped(qc_attn::call), true);
  Function::SetGlobal("qc.cuda.int_attention_masked", Function::FromTyped(qc_attn::call_masked), true);
  Function::SetGlobal("qc.cuda.int_attention_hi", Function::FromTyped(qc_attn::call_hi), true);
  Function::SetGlobal("qc.cuda.int_attention_masked_hi", Function::FromTyped(qc_attn::call_masked_hi), true);
}
