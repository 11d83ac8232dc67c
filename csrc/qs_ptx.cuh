// Thin wrappers over the PTX the kernels need (tensor-core mma, ldmatrix, cp.async, LOP3/PRMT).
// Why: the CUDA C++ intrinsics either do not exist for these or do not give control over the
// exact instruction. Plain cp.async.cg only: cache-policy hints fault on the driver-580 stack.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace qs {

// f(std::integral_constant<int, i>) for i = 0 .. N-1, unrolled by construction (the compiler's
// unroller declines some loops whatever the pragma says, and a loop index that stays a variable
// sends register arrays indexed by it to local memory).
template <int I, int N, typename F>
__device__ __forceinline__ void static_for_from(F&& f) {
  if constexpr (I < N) {
    f(std::integral_constant<int, I>{});
    static_for_from<I + 1, N>(f);
  }
}
template <int N, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_from<0, N>(f);
}

// D = A * B + D for one m16n8k16 tile, fp32 accumulation. a: 4 regs (16x16, row), b: 2 regs (16x8, col).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The 32-bit shared-window address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_u32(const void* smem) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(smem));
}

// Four 8x8 b16 matrices from shared memory; lane l supplies the row address of matrix l/8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = smem_u32(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The same from a 32-bit shared-window address.
__device__ __forceinline__ void ldmatrix_x4_at(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ uint4 lds128(const void* smem) {
  uint4 v;
  const uint32_t addr = smem_u32(smem);
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}

// Shared-memory loads and cp.async copies take 32-bit shared-window addresses; a kernel that
// computes its window offsets once adds to them (the generic-pointer forms below convert per call).
__device__ __forceinline__ uint32_t lds32_at(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ uint2 lds64_at(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

// 16-byte global -> shared copy; src_bytes 0 fills the destination with zeros (out-of-range tiles).
__device__ __forceinline__ void cp_async16_at(uint32_t addr, const void* gmem, bool valid) {
  int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes));
}

// gmem + off bytes, written as a PTX mad.wide so the 32-bit offset is added as such (ptxas emits a
// 64-bit add of it: two instructions; plain pointer arithmetic compiled to a longer sequence in the
// wgmma GEMM's copies). off may be negative; the caller keeps it in range.
__device__ __forceinline__ const void* gaddr(const void* gmem, int off) {
  const void* r;
  asm("mad.wide.s32 %0, %1, 1, %2;\n" : "=l"(r) : "r"(off), "l"(gmem));
  return r;
}
// A 16-byte cp.async that is always in bounds (no zero-fill operand).
__device__ __forceinline__ void cp_async16_full(uint32_t addr, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
}

__device__ __forceinline__ uint32_t lds32(const void* smem) { return lds32_at(smem_u32(smem)); }
__device__ __forceinline__ uint2 lds64(const void* smem) { return lds64_at(smem_u32(smem)); }
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  cp_async16_at(smem_u32(smem), gmem, valid);
}

// Programmatic dependent launch (sm_90): `launch_dependents` lets the next kernel of the stream
// (launched with the PDL attribute) start its blocks while this one runs; `wait` blocks until
// every earlier grid of the stream has finished and its writes are visible. No-ops below sm_90
// and for kernels launched without the attribute.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most `n` committed groups are still in flight (n is small and known per call).
__device__ __forceinline__ void cp_async_wait(int n) {
  switch (n) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::); break;
    default: asm volatile("cp.async.wait_group 4;\n" ::); break;
  }
}

// (a & mask) | magic in one LOP3: drops two 4-bit codes into the mantissas of two 16-bit floats.
template <uint32_t kMask>
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t magic) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(a), "n"(kMask), "r"(magic));
  return r;
}

// Streaming 16-byte load of packed weights (read once: read-only path, no L2 policy hints).
__device__ __forceinline__ uint4 ldg128(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Pull the 128-byte line holding p into L2 (no register result, nothing to wait for).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// Release/acquire fence at GPU scope: orders a thread's reds before its arrival count (release) and
// the arrival count before the reads of the sums (acquire). Cheaper than __threadfence (fence.sc).
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }

// L2 (coherent) loads/stores for the split-K partials written by other blocks.
__device__ __forceinline__ float4 ldcg4(const float* p) { return __ldcg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ void stcg4(float* p, float4 v) { __stcg(reinterpret_cast<float4*>(p), v); }

}  // namespace qs
