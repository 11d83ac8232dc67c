// fp16 instantiations of the tensor-core GEMVs (gemv.cuh, gemv_pipe.cuh); one file per dtype so they
// build in parallel.
#include "gemv_pipe.cuh"

cudaError_t qs_gemv_f16(const QsMatmulArgs& a, cudaStream_t s) { return qs::gemv_dispatch<__half>(a, s); }

#ifdef QS_GEMV_TRACE
int qs_gemv_trace_take(unsigned long long* dst, int max_records) {
  return qs::trace_take(qs::g_trace, qs::g_trace_n, dst, max_records);
}
#else
int qs_gemv_trace_take(unsigned long long*, int) { return -1; }
#endif
