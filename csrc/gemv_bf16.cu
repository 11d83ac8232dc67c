// bf16 instantiations of the tensor-core GEMV (gemv.cuh); one file per dtype so they build in parallel.
#include "gemv_tma.cuh"

cudaError_t qs_gemv_bf16(const QsMatmulArgs& a, cudaStream_t s) {
  return qs::gemv_tma_takes<__nv_bfloat16>(a) ? qs::gemv_tma_dtype<__nv_bfloat16>(a, s) : qs::gemv_dtype<__nv_bfloat16>(a, s);
}
