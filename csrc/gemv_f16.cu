// fp16 instantiations of the tensor-core GEMV (gemv.cuh); one file per dtype so they build in parallel.
#include "gemv_tma.cuh"

cudaError_t qs_gemv_f16(const QsMatmulArgs& a, cudaStream_t s) { return qs::gemv_tma_takes<__half>(a) ? qs::gemv_tma_dtype<__half>(a, s) : qs::gemv_dtype<__half>(a, s); }
