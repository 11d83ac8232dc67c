// bf16 instantiations of the tensor-core GEMVs (gemv.cuh, gemv_pipe.cuh); one file per dtype so they
// build in parallel.
#include "gemv_pipe.cuh"

cudaError_t qs_gemv_bf16(const QsMatmulArgs& a, cudaStream_t s) {
  return qs::gemv_dispatch<__nv_bfloat16>(a, s);
}
