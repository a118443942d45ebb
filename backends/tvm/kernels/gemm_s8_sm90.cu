// The int8 GEMM + requant kernels with the general (int64) epilogue; gemm_s8_sm90.cuh has the kernel.
#include "gemm_s8_sm90.cuh"

TVM_FFI_STATIC_INIT_BLOCK() { qc::register_tiles<false>(); }
