// qcompiler's int8 tensor-core GEMM for Hopper (sm_90a): y = requant(x @ w^T + bias), one kernel.
//
// x [M, K] int8 row-major, w [N, K] int8 row-major (K-major: the only int8 WGMMA layout),
// bias / mult / shift [N] int32, y [M, N] int8 or int16; or batched: x [L, M, K], w [L, N, K],
// y [L, M, N] (attention's activation x activation matmuls), with bias / mult / shift shared by
// the batch. The mainloop is CUTLASS 3's TMA + warp-specialized WGMMA collective; the epilogue is
// an epilogue-visitor tree whose compute node is qc::requant's reference arithmetic
// (qcompiler/int_ops.py):
//   p = (acc + bias) * mult;  y = clamp(sign(p) * ((|p| + half) >> shift) + out_zp, qmin, qmax)
// with half = 2^(shift-1) for shift > 0, else 0: round half away from zero, bit for bit, in int64
// (any shift) or, where every shift is 32 or more, in int32 words (RequantFn below).
//
// Exported through tvm_ffi as global functions, so a Relax VM calls them with
// R.call_dps_packed on the VM's CUDA stream:
//   qc.cuda.gemm_s8_requant_<tile>(x, w, bias, mult, shift, out_zp, qmin, qmax, y)      y int8
//   qc.cuda.gemm_s8_requant_i16_<tile>(...)                                              y int16
//   qc.cuda.gemm_s8_requant[_i16]_hi_<tile>(...)            the same, every shift 32..62
// (int16 out: the requants that feed a residual add, a LUT or a softmax keep 16 bits).
#pragma once
#include <cstdint>
#include <mutex>
#include <string>
#include <type_traits>

#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include "qc_int.cuh"

namespace qc {

using namespace cute;

struct RequantArgs {
  int64_t out_zp = 0;
  int64_t qmin = -128;
  int64_t qmax = 127;
  int64_t bits = -1;  // the result's low bits kept: 0xffff for int16 out, stored as uint16_t (TMA has no int16)
};

// The compute node: (acc, bias, mult, shift) -> requantized value. Two forms, bit for bit qc::requant:
// - general (Hi = false), in int64, any shift 0..62;
// - Hi = true, in int32 words, for calls whose every shift is 32..62 (the translation knows the
//   constants and picks this one then: the usual case, a multiplier near 2^31 times a scale below
//   1/2): qc_int::requant_hi, about half the instructions per output element.
template <bool Hi, class T>
struct RequantFn {
  using Arguments = RequantArgs;
  CUTLASS_HOST_DEVICE T operator()(T acc, T bias, T mult, T shift, Arguments const& a) const {
    if constexpr (Hi) {
      return qc_int::requant_hi(acc + bias, mult, shift, int32_t(a.out_zp), int32_t(a.qmin), int32_t(a.qmax)) &
             int32_t(a.bits);
    } else {
      // acc + bias and mult are int32 (the translation checks |bias| + K 128^2 < 2^31, and the
      // multipliers are int32): one 32 x 32 -> 64-bit multiply, not a 64 x 64 one
      int64_t p = int64_t(int32_t(acc + bias)) * int64_t(int32_t(mult));
      // rshift_round(p, shift) as (p + 2^(shift-1) - [p < 0]) >> shift: the same value as
      // sign(p) ((|p| + 2^(shift-1)) >> shift) for every p (kernels/qc_int.cuh), in fewer operations
      int64_t y = (shift > 0 ? (p + (int64_t(1) << (shift - 1)) - (p < 0 ? 1 : 0)) >> shift : p) + a.out_zp;
      return (y < a.qmin ? a.qmin : (y > a.qmax ? a.qmax : y)) & a.bits;
    }
  }
};

template <bool Hi, class T, int N>
struct RequantFn<Hi, cutlass::Array<T, N>> {
  using Arguments = RequantArgs;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& acc, cutlass::Array<T, N> const& bias,
                                                      cutlass::Array<T, N> const& mult, cutlass::Array<T, N> const& shift,
                                                      Arguments const& a) const {
    RequantFn<Hi, T> op;
    cutlass::Array<T, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = op(acc[i], bias[i], mult[i], shift[i], a);
    return out;
  }
};

template <class T>
using Requant = RequantFn<false, T>;
template <class T>
using RequantHi = RequantFn<true, T>;

template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule, class ElementOut, bool Hi>
struct GemmS8Requant {
  using ElementA = int8_t;
  using ElementB = int8_t;
  using ElementD = ElementOut;
  using ElementAcc = int32_t;
  using ElementCompute = std::conditional_t<Hi, int32_t, int64_t>;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // w [N, K] row-major is B [K, N] column-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 16;                         // A, B: 16 int8 (TMA's 16-byte rows)
  static constexpr int kAlignD = 16 / int(sizeof(ElementD));  // D: 16 bytes

  template <class T>
  using Op = RequantFn<Hi, T>;
  using Vec = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, int32_t, int32_t>;  // one value per column n
  using EVT = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<Op, ElementD, ElementCompute, cutlass::FloatRoundStyle::round_toward_zero>,
      cutlass::epilogue::fusion::Sm90AccFetch, Vec, Vec, Vec>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      void, LayoutD, kAlignD, ElementD, LayoutD, kAlignD, EpilogueSchedule, EVT>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlign, ElementB, LayoutB, kAlign,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                       CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // batch l: x [l, m, k], w [l, n, k] (w_batch_stride 0: one weight for all), y [l, m, n]
  static void run(const int8_t* x, const int8_t* w, const int32_t* bias, const int32_t* mult, const int32_t* shift,
                  RequantArgs rq, ElementD* y, int m, int n, int k, int l, int64_t w_batch_stride, cudaStream_t stream) {
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    StrideA sa = make_stride(int64_t(k), Int<1>{}, int64_t(m) * k);
    StrideB sb = make_stride(int64_t(k), Int<1>{}, w_batch_stride);
    StrideD sd = make_stride(int64_t(n), Int<1>{}, int64_t(m) * n);
    rq.bits = sizeof(ElementD) == 2 ? 0xffff : -1;  // int16's bits, stored as uint16_t
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, l},
        {x, sa, w, sb},
        {{{}, {bias}, {mult}, {shift}, rq}, nullptr, sd, y, sd}};
    int dev = 0;
    cudaGetDevice(&dev);
    args.hw_info.device_id = dev;
    args.hw_info.sm_count = sm_count(dev);
    Gemm gemm;
    cutlass::Status st = gemm.can_implement(args);
    TVM_FFI_ICHECK(st == cutlass::Status::kSuccess)
        << "qc int8 GEMM: CUTLASS cannot run M=" << m << " N=" << n << " K=" << k << ": "
        << cutlass::cutlassGetStatusString(st);
    void* ws = workspace(Gemm::get_workspace_size(args), dev);
    st = gemm.initialize(args, ws, stream);
    TVM_FFI_ICHECK(st == cutlass::Status::kSuccess) << "qc int8 GEMM: initialize failed: "
                                                    << cutlass::cutlassGetStatusString(st);
    st = gemm.run(stream);
    TVM_FFI_ICHECK(st == cutlass::Status::kSuccess) << "qc int8 GEMM: launch failed: "
                                                    << cutlass::cutlassGetStatusString(st) << " ("
                                                    << cudaGetErrorString(cudaGetLastError()) << ")";
  }

  static int sm_count(int dev) {
    static int cached[64] = {0};
    if (dev < 64 && cached[dev]) return cached[dev];
    int c = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(dev);
    if (dev < 64) cached[dev] = c;
    return c;
  }

  // One grow-only scratch buffer per device (CUTLASS's tile scheduler needs a few bytes).
  static void* workspace(size_t bytes, int dev) {
    static std::mutex mu;
    static void* buf[64] = {nullptr};
    static size_t size[64] = {0};
    if (bytes == 0) return nullptr;
    std::lock_guard<std::mutex> lock(mu);
    if (size[dev] < bytes) {
      if (buf[dev]) cudaFree(buf[dev]);
      TVM_FFI_ICHECK(cudaMalloc(&buf[dev], bytes) == cudaSuccess) << "qc int8 GEMM: cannot allocate workspace";
      size[dev] = bytes;
    }
    return buf[dev];
  }
};

template <class Tile, class Cluster, class Out, bool Hi>
using Cooperative = GemmS8Requant<Tile, Cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                  cutlass::epilogue::TmaWarpSpecializedCooperative, Out, Hi>;
template <class Out, bool Hi>
using Tile128 = Cooperative<Shape<_128, _128, _128>, Shape<_1, _1, _1>, Out, Hi>;
template <class Out, bool Hi>
using Tile256 = Cooperative<Shape<_128, _256, _128>, Shape<_2, _1, _1>, Out, Hi>;
template <class Out, bool Hi>
using Tile256x128 = Cooperative<Shape<_256, _128, _128>, Shape<_2, _1, _1>, Out, Hi>;
template <class Out, bool Hi>
using Tile128x64 = Cooperative<Shape<_128, _64, _128>, Shape<_1, _1, _1>, Out, Hi>;
template <class Out, bool Hi>
using TilePp128 = GemmS8Requant<Shape<_64, _128, _128>, Shape<_1, _1, _1>,
                                cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                cutlass::epilogue::TmaWarpSpecialized, Out, Hi>;
// ping-pong with a warp group per 128-row tile: one group's epilogue under the other's main loop,
// for the short main loops (K = 384 .. 768) of the models' GEMMs
template <class Out, bool Hi>
using TilePp128x128 = GemmS8Requant<Shape<_128, _128, _128>, Shape<_1, _1, _1>,
                                    cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                    cutlass::epilogue::TmaWarpSpecialized, Out, Hi>;
template <class Out, bool Hi>
using TilePp128x64 = GemmS8Requant<Shape<_128, _64, _128>, Shape<_1, _1, _1>,
                                   cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                   cutlass::epilogue::TmaWarpSpecialized, Out, Hi>;

inline void check(const tvm::ffi::TensorView& t, int ndim, DLDataTypeCode code, int bits, const char* what) {
  TVM_FFI_ICHECK(t.ndim() == ndim) << "qc int8 GEMM: " << what << " has the wrong rank";
  qc_int::check(t, code, bits, "qc int8 GEMM", what);
}

template <class G>
void gemm(tvm::ffi::TensorView x, tvm::ffi::TensorView w, tvm::ffi::TensorView bias, tvm::ffi::TensorView mult,
          tvm::ffi::TensorView shift, int64_t out_zp, int64_t qmin, int64_t qmax, tvm::ffi::TensorView y) {
  // x [M, K] or [L, M, K]; w [N, K] (shared) or [L, N, K]; y [M, N] or [L, M, N]
  int nd = x.ndim();
  TVM_FFI_ICHECK(nd == 2 || nd == 3) << "qc int8 GEMM: x must be 2-D or 3-D";
  check(x, nd, kDLInt, 8, "x");
  TVM_FFI_ICHECK(w.ndim() == 2 || w.ndim() == nd) << "qc int8 GEMM: w must be 2-D or batched like x";
  check(w, w.ndim(), kDLInt, 8, "w");
  check(bias, 1, kDLInt, 32, "bias");
  check(mult, 1, kDLInt, 32, "mult");
  check(shift, 1, kDLInt, 32, "shift");
  check(y, nd, kDLInt, 8 * int(sizeof(typename G::ElementD)), "y");
  int64_t l = nd == 3 ? x.size(0) : 1, m = x.size(-2), k = x.size(-1), n = w.size(-2);
  TVM_FFI_ICHECK(w.size(-1) == k && y.size(-2) == m && y.size(-1) == n && bias.size(0) == n && mult.size(0) == n &&
                 shift.size(0) == n && (nd == 2 || y.size(0) == l) && (w.ndim() == 2 || w.size(0) == l))
      << "qc int8 GEMM: shapes do not agree";
  TVM_FFI_ICHECK(k % 16 == 0 && n % 16 == 0) << "qc int8 GEMM: K and N must be multiples of 16";
  if (m == 0 || l == 0) return;
  int64_t w_batch_stride = w.ndim() == 3 ? n * k : 0;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, x.device().device_id));
  G::run(static_cast<const int8_t*>(x.data_ptr()), static_cast<const int8_t*>(w.data_ptr()),
         static_cast<const int32_t*>(bias.data_ptr()), static_cast<const int32_t*>(mult.data_ptr()),
         static_cast<const int32_t*>(shift.data_ptr()), RequantArgs{out_zp, qmin, qmax},
         static_cast<typename G::ElementD*>(y.data_ptr()), int(m), int(n), int(k), int(l), w_batch_stride, stream);
}

}  // namespace qc

namespace qc {
// qc.cuda.gemm_s8_requant[_i16][_hi]_<tile>: int8 or int16 out (int16 written as uint16_t: the same
// bits, TMA stores having no signed 16-bit format), the general or the Hi epilogue
template <template <class, bool> class Tile, bool Hi>
void register_tile(const char* tile) {
  using tvm::ffi::Function;
  const std::string hi = Hi ? "hi_" : "";
  Function::SetGlobal("qc.cuda.gemm_s8_requant_" + hi + tile, Function::FromTyped(gemm<Tile<int8_t, Hi>>), true);
  Function::SetGlobal("qc.cuda.gemm_s8_requant_i16_" + hi + tile, Function::FromTyped(gemm<Tile<uint16_t, Hi>>),
                      true);
}

// Every tile configuration with one epilogue. The two epilogues are compiled in two translation
// units (gemm_s8_sm90.cu, gemm_s8_hi_sm90.cu) that nvcc builds side by side. Registration
// overrides: two artifacts loaded into one process each carry a copy of this library, and the
// names must not collide (the functions are the same code).
template <bool Hi>
void register_tiles() {
  register_tile<Tile128, Hi>("128x128");
  register_tile<Tile256, Hi>("128x256");
  register_tile<Tile256x128, Hi>("256x128");
  register_tile<Tile128x64, Hi>("128x64");
  register_tile<TilePp128, Hi>("pp64x128");
  register_tile<TilePp128x128, Hi>("pp128x128");
  register_tile<TilePp128x64, Hi>("pp128x64");
}
}  // namespace qc
