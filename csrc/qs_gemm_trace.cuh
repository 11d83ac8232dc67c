// Per-block timeline of the wgmma GEMM (gemm_wgmma.cuh) and of sums_to_y (sums_to_y.cuh), for
// diagnosis only (bench/gemm_timeline.py): built with the GEMV's trace (QS_GEMV_TRACE, set by
// QUANTSERVE_CUDA_TRACE=1 at build time); otherwise the macros below expand to nothing and the
// kernels are unchanged.
// Thread 0 of each block fills one record, GemmTraceRec (8 x uint64), on the GPU's nanosecond timer:
//   tag     (qweight address >> 8) << 32 | smid << 16 | block index (sums_to_y: address 0)
//   entry   the block started (after its PDL trigger)
//   wait    it got past griddepcontrol.wait (the kernel before it had finished)
//   loop    its last tile segment's main loop was done (thread 0 entering that segment's flush)
//   out     that flush's sums had left: stores to y or the sums, or reds plus fence and barrier
//   drain   that flush found the tile complete and began draining it (0: it did not)
//   exit    the block was done
//   info    flushes (bits 0-15) | drains (bits 16-31) | tile tokens << 32 | kind << 48
//           (kind 0: the GEMM, 1: sums_to_y)
// Only the fp16 instantiations' records are read back (the buffer is per translation unit).
#pragma once

#include "qs_trace.cuh"

#ifdef QS_GEMV_TRACE
namespace qs {

struct GemmTraceRec {
  unsigned long long tag, t_entry, t_wait, t_loop, t_out, t_drain, t_exit, info;
};
static __device__ GemmTraceRec g_gtrace[QS_GEMV_TRACE_RECORDS];
static __device__ unsigned int g_gtrace_n;
// The block's record index (thread 0 writes and reads it; QS_GEMV_TRACE_RECORDS: none).
static __shared__ unsigned int s_gtrace;

__device__ __forceinline__ void gtrace_enter(const void* qweight, int ntok, int kind) {
  if (threadIdx.x != 0) return;
  const unsigned long long t = trace_now();
  const unsigned int i = atomicAdd(&g_gtrace_n, 1u);
  s_gtrace = i < QS_GEMV_TRACE_RECORDS ? i : QS_GEMV_TRACE_RECORDS;
  if (i >= QS_GEMV_TRACE_RECORDS) return;
  GemmTraceRec& r = g_gtrace[i];
  r.tag = trace_tag(qweight, blockIdx.x);
  r.t_entry = t;
  r.t_wait = r.t_loop = r.t_out = r.t_drain = r.t_exit = 0;
  r.info = (unsigned long long)ntok << 32 | (unsigned long long)kind << 48;
}
__device__ __forceinline__ GemmTraceRec* gtrace_rec() {
  return threadIdx.x == 0 && s_gtrace < QS_GEMV_TRACE_RECORDS ? &g_gtrace[s_gtrace] : nullptr;
}
__device__ __forceinline__ void gtrace_wait() {
  if (GemmTraceRec* r = gtrace_rec()) r->t_wait = trace_now();
}
// A flush begins: its time, one more flush, no drain yet.
__device__ __forceinline__ void gtrace_loop() {
  if (GemmTraceRec* r = gtrace_rec()) {
    r->t_loop = trace_now();
    r->t_out = r->t_drain = 0;
    r->info += 1;
  }
}
__device__ __forceinline__ void gtrace_out() {
  if (GemmTraceRec* r = gtrace_rec()) r->t_out = trace_now();
}
__device__ __forceinline__ void gtrace_drain() {
  if (GemmTraceRec* r = gtrace_rec()) {
    r->t_drain = trace_now();
    r->info += 1ull << 16;
  }
}
__device__ __forceinline__ void gtrace_exit() {
  if (GemmTraceRec* r = gtrace_rec()) r->t_exit = trace_now();
}

}  // namespace qs
#define QS_GTRACE_ENTER(qweight, ntok, kind) ::qs::gtrace_enter(qweight, ntok, kind)
#define QS_GTRACE_WAIT() ::qs::gtrace_wait()
#define QS_GTRACE_LOOP() ::qs::gtrace_loop()
#define QS_GTRACE_OUT() ::qs::gtrace_out()
#define QS_GTRACE_DRAIN() ::qs::gtrace_drain()
#define QS_GTRACE_EXIT() ::qs::gtrace_exit()
#else
#define QS_GTRACE_ENTER(qweight, ntok, kind)
#define QS_GTRACE_WAIT()
#define QS_GTRACE_LOOP()
#define QS_GTRACE_OUT()
#define QS_GTRACE_DRAIN()
#define QS_GTRACE_EXIT()
#endif
