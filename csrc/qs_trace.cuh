// Per-warp timeline of the pipelined GEMV, for diagnosis only (bench/gemv_timeline.py): built when
// QS_GEMV_TRACE is defined (QUANTSERVE_CUDA_TRACE=1 at build time), compiled out otherwise (the
// macros below expand to nothing, so the normal build's kernels are unchanged).
// Each warp fills one record: {tag, t_entry, t_wait, t_exit, t_first, t_data}, the times from the
// GPU's global nanosecond timer: entry (after the PDL trigger), past griddepcontrol.wait (the
// previous kernel finished), exit, when its first unit was computed (0: it had none), and when that
// unit's operands (codes, x, group rows) had all arrived in registers (0: no unit).
// tag = (qweight address >> 8) << 32 | smid << 16 | warp index in the grid; the address tells the
// calls of a step apart when every layer has its own weights.
// Only the fp16 kernels' records are read back (the buffer is per translation unit).
#pragma once

#include <stdint.h>

#include "quantserve_cuda.h"

#ifdef QS_GEMV_TRACE
namespace qs {

struct TraceRec {
  unsigned long long tag, t_entry, t_wait, t_exit, t_first, t_data;
};
static __device__ TraceRec g_trace[QS_GEMV_TRACE_RECORDS];
static __device__ unsigned int g_trace_n;

__device__ __forceinline__ unsigned long long trace_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// A record's tag: (qweight address >> 8, 32 bits) << 32 | this SM << 16 | index (a warp or a block).
__device__ __forceinline__ unsigned long long trace_tag(const void* qweight, unsigned int index) {
  unsigned int sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  const unsigned long long key = (reinterpret_cast<unsigned long long>(qweight) >> 8) & 0xffffffffull;
  return key << 32 | (unsigned long long)(sm & 0xffff) << 16 | (index & 0xffff);
}

// Lane 0 of each warp claims a record at entry (before the PDL wait, so the atomic's latency hides
// in the wait) and fills the rest in as the warp goes; the warp holds only the index in between.
__device__ __forceinline__ unsigned int trace_enter(const void* qweight) {
  if ((threadIdx.x & 31) != 0) return QS_GEMV_TRACE_RECORDS;
  const unsigned long long t = trace_now();
  const unsigned int warp = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const unsigned int i = atomicAdd(&g_trace_n, 1u);
  if (i < QS_GEMV_TRACE_RECORDS) {
    g_trace[i].tag = trace_tag(qweight, warp);
    g_trace[i].t_entry = t;
    g_trace[i].t_first = 0;
    g_trace[i].t_data = 0;
  }
  return i;
}
// Bit 31 of the index marks "first unit recorded", so the flag takes no register of its own.
constexpr unsigned int kTraceUnitDone = 1u << 31;
__device__ __forceinline__ void trace_wait(unsigned int i) {
  i &= ~kTraceUnitDone;
  if (i < QS_GEMV_TRACE_RECORDS) g_trace[i].t_wait = trace_now();
}
__device__ __forceinline__ void trace_exit(unsigned int i) {
  i &= ~kTraceUnitDone;
  if (i < QS_GEMV_TRACE_RECORDS) g_trace[i].t_exit = trace_now();
}
// Before the first unit's compute: v depends on one word of each of its loads, and the timer is read
// under a predicate computed from v, so the read waits for every load to land.
__device__ __forceinline__ void trace_data(unsigned int i, unsigned int v) {
  if (i >= QS_GEMV_TRACE_RECORDS) return;  // (also once the first unit is done: bit 31)
  unsigned long long t;
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.u32 p, %1, 0x7fc00001;\n @p mov.u64 %0, %%globaltimer;\n"
      " @!p mov.u64 %0, 1;\n}"
      : "=l"(t)
      : "r"(v));
  g_trace[i].t_data = t;
}
// After each unit's compute: the first call stores the time.
__device__ __forceinline__ void trace_unit(unsigned int& i) {
  if (i < QS_GEMV_TRACE_RECORDS) g_trace[i].t_first = trace_now();
  i |= kTraceUnitDone;
}

// Host side: copies up to max_records of a trace buffer's records (`records`, filled up to `count`)
// into dst, then starts the buffer over; returns how many (0 on a CUDA error).
template <typename Rec>
inline int trace_take(const Rec (&records)[QS_GEMV_TRACE_RECORDS], const unsigned int& count, unsigned long long* dst,
                      int max_records) {
  unsigned int n = 0;
  if (cudaDeviceSynchronize() != cudaSuccess || cudaMemcpyFromSymbol(&n, count, sizeof(n)) != cudaSuccess) return 0;
  n = n < QS_GEMV_TRACE_RECORDS ? n : QS_GEMV_TRACE_RECORDS;
  n = n < unsigned(max_records) ? n : unsigned(max_records);
  if (n > 0 && cudaMemcpyFromSymbol(dst, records, n * sizeof(Rec)) != cudaSuccess) return 0;
  const unsigned int zero = 0;
  cudaMemcpyToSymbol(count, &zero, sizeof(zero));
  return int(n);
}

}  // namespace qs
#define QS_TRACE_ENTER(var, qweight) unsigned int var = ::qs::trace_enter(qweight)
#define QS_TRACE_UNIT(var) ::qs::trace_unit(var)
#define QS_TRACE_DATA(var, v) ::qs::trace_data(var, v)
#define QS_TRACE_WAIT(var) ::qs::trace_wait(var)
#define QS_TRACE_EXIT(var) ::qs::trace_exit(var)
#else
#define QS_TRACE_ENTER(var, qweight)
#define QS_TRACE_WAIT(var)
#define QS_TRACE_EXIT(var)
#define QS_TRACE_UNIT(var)
#define QS_TRACE_DATA(var, v)
#endif
