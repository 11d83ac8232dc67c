// fp16 instantiations of the tensor-core GEMVs (gemv.cuh, gemv_pipe.cuh); one file per dtype so they
// build in parallel.
#include "gemv_pipe.cuh"

cudaError_t qs_gemv_f16(const QsMatmulArgs& a, cudaStream_t s) { return qs::gemv_dispatch<__half>(a, s); }

#ifdef QS_GEMV_TRACE
int qs_gemv_trace_take(unsigned long long* dst, int max_records) {
  unsigned int n = 0;
  if (cudaDeviceSynchronize() != cudaSuccess || cudaMemcpyFromSymbol(&n, qs::g_trace_n, sizeof(n)) != cudaSuccess)
    return 0;
  n = n < QS_GEMV_TRACE_RECORDS ? n : QS_GEMV_TRACE_RECORDS;
  n = n < unsigned(max_records) ? n : unsigned(max_records);
  if (n > 0 && cudaMemcpyFromSymbol(dst, qs::g_trace, n * sizeof(qs::TraceRec)) != cudaSuccess) return 0;
  const unsigned int zero = 0;
  cudaMemcpyToSymbol(qs::g_trace_n, &zero, sizeof(zero));
  return int(n);
}
#else
int qs_gemv_trace_take(unsigned long long*, int) { return -1; }
#endif
