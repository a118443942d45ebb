// The int8 GEMM + requant kernels with the Hi (int32, every shift 32..62) epilogue; gemm_s8_sm90.cuh
// has the kernel. A translation unit of its own so that nvcc compiles it beside gemm_s8_sm90.cu.
#include "gemm_s8_sm90.cuh"

TVM_FFI_STATIC_INIT_BLOCK() { qc::register_tiles<true>(); }
