// fp16 instantiations of the tensor-core GEMM (gemm.cuh); one file per dtype so they build in parallel.
#include "gemm.cuh"

cudaError_t qs_gemm_f16(const QsMatmulArgs& a, cudaStream_t s) { return qs::gemm_dtype<__half>(a, s, nullptr, nullptr); }
cudaError_t qs_gemm_f16_need(long long* floats, int* counters) { return qs::gemm_need<__half>(floats, counters); }

#ifdef QS_GEMV_TRACE
int qs_gemm_trace_take(unsigned long long* dst, int max_records) {
  unsigned int n = 0;
  if (cudaDeviceSynchronize() != cudaSuccess || cudaMemcpyFromSymbol(&n, qs::g_gtrace_n, sizeof(n)) != cudaSuccess)
    return 0;
  n = n < QS_GEMV_TRACE_RECORDS ? n : QS_GEMV_TRACE_RECORDS;
  n = n < unsigned(max_records) ? n : unsigned(max_records);
  if (n > 0 && cudaMemcpyFromSymbol(dst, qs::g_gtrace, n * sizeof(qs::GemmTraceRec)) != cudaSuccess) return 0;
  const unsigned int zero = 0;
  cudaMemcpyToSymbol(qs::g_gtrace_n, &zero, sizeof(zero));
  return int(n);
}
#else
int qs_gemm_trace_take(unsigned long long*, int) { return -1; }
#endif
