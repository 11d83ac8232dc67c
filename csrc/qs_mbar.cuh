// Hopper (sm_90) asynchronous copies that complete on a shared-memory mbarrier, and the mbarrier
// operations around them: the warp-specialised wgmma GEMM's producer warp fills a stage with bulk
// copies (codes, scales, zeros: contiguous runs) and a TMA tile copy (x, 128-byte swizzled by the
// copy engine), and signals the consumers through the stage's "full" barrier; the consumers give
// the stage back through its "empty" barrier.
// Why: with the copies in one warp, the computing warps issue no copy, compute no copy address and
// meet no block-wide barrier per stage; they wait only for the stage they read. Bulk and TMA copies
// are async-proxy writes that the wgmma operand reads (also async proxy) and, after the barrier's
// acquire, plain shared loads may read. No L2 cache-policy hints (they fault on this driver stack).
// Addresses are 32-bit shared-window addresses.
#pragma once

#include <cuda.h>
#include <stdint.h>

namespace qs {

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (the copy engine's complete_tx).
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival (release: this thread's earlier shared-memory reads happen before the phase ends).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One arrival that also expects `bytes` more transaction bytes before the phase may end.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Waits until the phase of parity `parity` has completed (acquire: the copies that completed it,
// and the shared-memory reads released by its arrivals, are ordered before what follows).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// `bytes` (a multiple of 16, 16-byte aligned ends) from global memory to shared memory; completes
// that many transaction bytes on `bar`.
__device__ __forceinline__ void bulk_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// One box of a 2-D tensor map (coordinates c0 along the contiguous dimension, c1 along rows) to
// shared memory laid out as the map says (boxes past the tensor's end are zero-filled and still
// count their full bytes on `bar`). map: the address of a __grid_constant__ kernel parameter.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
      "[%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Waits at named barrier `id` for `threads` threads (a multiple of 32): a barrier of part of a block.
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace qs
