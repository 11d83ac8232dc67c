// fp16 instantiations of the tensor-core GEMM (gemm.cuh); one file per dtype so they build in parallel.
#include "gemm.cuh"

cudaError_t qs_gemm_f16(const QsMatmulArgs& a, cudaStream_t s) { return qs::gemm_dtype<__half>(a, s, nullptr, nullptr); }
cudaError_t qs_gemm_f16_need(long long* floats, int* counters) { return qs::gemm_need<__half>(floats, counters); }

#ifdef QS_GEMV_TRACE
int qs_gemm_trace_take(unsigned long long* dst, int max_records) {
  return qs::trace_take(qs::g_gtrace, qs::g_gtrace_n, dst, max_records);
}
#else
int qs_gemm_trace_take(unsigned long long*, int) { return -1; }
#endif
