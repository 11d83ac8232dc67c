// bf16 instantiations of the tensor-core GEMV (gemv.cuh); one file per dtype so they build in parallel.
#include "gemv.cuh"

cudaError_t qs_gemv_bf16(const QsMatmulArgs& a, cudaStream_t s) {
  return qs::gemv_dtype<__nv_bfloat16>(a, s);
}
