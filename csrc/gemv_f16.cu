// fp16 instantiations of the tensor-core GEMV (gemv.cuh); one file per dtype so they build in parallel.
#include "gemv.cuh"

cudaError_t qs_gemv_f16(const QsMatmulArgs& a, cudaStream_t s) { return qs::gemv_dtype<__half>(a, s); }
