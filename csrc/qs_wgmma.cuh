// Hopper (sm_90a) warpgroup MMA wrappers: wgmma.mma_async with the A operand in registers.
// Why: the GEMM for 16-256 tokens (larger calls in slices) keeps the dequantised weights in
// registers as A (64 output columns per warpgroup, 16 per warp, the same fragment as
// mma.m16n8k16's A) and reads the tokens
// from a 128-byte-swizzled shared-memory tile as B, so the int4 codes never make a 16-bit copy in
// shared memory. Only meaningful where __CUDA_ARCH_FEAT_SM90_ALL is defined (sm_90a builds); the
// launcher checks at run time that the loaded binary has it (qs_wgmma_probe).
// The mma wrappers for N = 16 / 32 / 64 / 128 / 256 tokens name every accumulator register (PTX
// wants each one): the operand lists are built from 8- and 16-wide pieces, one macro per shape,
// instantiated for f16 and bf16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace qs {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QS_HAS_WGMMA 1
#else
#define QS_HAS_WGMMA 0
#endif

// Shared-memory matrix descriptor of a K-major tile whose rows are 128 bytes (64 16-bit values),
// 128-byte swizzled (16-byte chunk c of row r stored at chunk c ^ (r & 7)), 8-row groups 1024 bytes
// apart, tile base 1024-byte aligned. `byte_off` (a multiple of 32 inside a row) selects the k16
// slice: the hardware applies the swizzle to the final address.
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t smem_addr) {
  uint64_t d = 0;
  d |= (uint64_t)((smem_addr & 0x3FFFF) >> 4);  // start address
  d |= (uint64_t)1 << 16;                        // leading byte offset (unused for swizzled K-major)
  d |= (uint64_t)(1024 >> 4) << 32;              // stride byte offset: next 8 rows
  d |= (uint64_t)1 << 62;                        // 128-byte swizzle
  return d;
}

__device__ __forceinline__ void wgmma_fence() {
#if QS_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if QS_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if QS_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Order this thread's earlier generic-proxy shared-memory writes (cp.async landings) before later
// async-proxy reads (wgmma operands).
__device__ __forceinline__ void fence_proxy_async_smem() {
#if QS_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps registers alive (and unmoved) up to this point: an async wgmma may still read them.
__device__ __forceinline__ void pin_regs(uint32_t (&r)[4]) {
  asm volatile("" : "+r"(r[0]), "+r"(r[1]), "+r"(r[2]), "+r"(r[3])::"memory");
}
template <int NREG>
__device__ __forceinline__ void pin_acc(float (&d)[NREG]) {
#pragma unroll
  for (int i = 0; i < NREG; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D[64 x N] += A[64 x 16] (registers: warp w of the warpgroup holds rows 16w..16w+15 as an
// m16n8k16 A fragment) * B[16 x N] (shared memory, descriptor), fp32 accumulation. scale_d = 0:
// D = A * B (D's previous contents ignored).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc, int scale_d = 1);

#if QS_HAS_WGMMA
// The accumulator operands of a wgmma as PTX operand lists: %0..%7, then 16 at a time.
#define QS_R0_7 "%0, %1, %2, %3, %4, %5, %6, %7"
#define QS_R8_15 "%8, %9, %10, %11, %12, %13, %14, %15"
#define QS_R16_31 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define QS_R32_47 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
#define QS_R48_63 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define QS_R64_79 "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79"
#define QS_R80_95 "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define QS_R96_111 "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111"
#define QS_R112_127 "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define QS_R0_15 QS_R0_7 ", " QS_R8_15
#define QS_R0_31 QS_R0_15 ", " QS_R16_31
#define QS_R0_63 QS_R0_31 ", " QS_R32_47 ", " QS_R48_63
#define QS_R0_127 QS_R0_63 ", " QS_R64_79 ", " QS_R80_95 ", " QS_R96_111 ", " QS_R112_127
// ... and the matching C++ operands d[i..i+7], d[i..i+15], ...
#define QS_ACC8(i)                                                                \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define QS_ACC16(i) QS_ACC8(i), QS_ACC8(i + 8)
#define QS_ACC32(i) QS_ACC16(i), QS_ACC16(i + 16)
#define QS_ACC64(i) QS_ACC32(i), QS_ACC32(i + 32)
#define QS_ACC128(i) QS_ACC64(i), QS_ACC64(i + 64)

// D[64 x N] (fp32, the N/2 operands REGS / ACC) += A (4 registers, operands N/2 .. N/2+3) * B
// (descriptor, operand N/2+4); scale-d is scale_d (operand N/2+5, through a predicate). SHAPE:
// "m64nNk16"; DT: "f16" or "bf16"; PRED / AB: the predicate's and the A / descriptor operand text.
#define QS_WGMMA_RS(SHAPE, DT, REGS, PRED, AB, ACC)                                         \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                           \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." DT "." DT " {" REGS "}, " AB \
               ", p, 1, 1, 0;\n}\n"                                                        \
               : ACC                                                                        \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d))
#define QS_WGMMA_RS_N32(DT) \
  QS_WGMMA_RS("m64n32k16", DT, QS_R0_15, "%21", "{%16, %17, %18, %19}, %20", QS_ACC16(0))
#define QS_WGMMA_RS_N64(DT) \
  QS_WGMMA_RS("m64n64k16", DT, QS_R0_31, "%37", "{%32, %33, %34, %35}, %36", QS_ACC32(0))
#define QS_WGMMA_RS_N128(DT) \
  QS_WGMMA_RS("m64n128k16", DT, QS_R0_63, "%69", "{%64, %65, %66, %67}, %68", QS_ACC64(0))
#define QS_WGMMA_RS_N256(DT) \
  QS_WGMMA_RS("m64n256k16", DT, QS_R0_127, "%133", "{%128, %129, %130, %131}, %132", QS_ACC128(0))

// Timing probe only (qs_probe.cuh kSharedA): D[64 x N] += A * B with both operands in shared memory
// (two descriptors), f16, N = 64 (16-token tiles multiply with mma.sync).
template <int N>
__device__ __forceinline__ void wgmma_ss_probe(float (&d)[N / 2], uint64_t adesc, uint64_t desc) {
  if constexpr (N == 64) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {" QS_R0_31 "}, %32, %33, 1, 1, 1, 0, 0;\n"
                 : QS_ACC32(0) : "l"(adesc), "l"(desc));
  }
}

// The f16 and bf16 specialisations of wgmma_rs for one N.
#define QS_WGMMA_RS_SPECS(N)                                                                        \
  template <>                                                                                       \
  __device__ __forceinline__ void wgmma_rs<__half, N>(float(&d)[N / 2], const uint32_t(&a)[4],      \
                                                      uint64_t desc, int scale_d) {                 \
    QS_WGMMA_RS_N##N("f16");                                                                        \
  }                                                                                                 \
  template <>                                                                                       \
  __device__ __forceinline__ void wgmma_rs<__nv_bfloat16, N>(float(&d)[N / 2], const uint32_t(&a)[4], \
                                                             uint64_t desc, int scale_d) {          \
    QS_WGMMA_RS_N##N("bf16");                                                                       \
  }
QS_WGMMA_RS_SPECS(32)
QS_WGMMA_RS_SPECS(64)
QS_WGMMA_RS_SPECS(128)
QS_WGMMA_RS_SPECS(256)
#undef QS_WGMMA_RS_SPECS
#undef QS_WGMMA_RS_N32
#undef QS_WGMMA_RS_N64
#undef QS_WGMMA_RS_N128
#undef QS_WGMMA_RS_N256
#undef QS_WGMMA_RS
#undef QS_R0_7
#undef QS_R8_15
#undef QS_R16_31
#undef QS_R32_47
#undef QS_R48_63
#undef QS_R64_79
#undef QS_R80_95
#undef QS_R96_111
#undef QS_R112_127
#undef QS_R0_15
#undef QS_R0_31
#undef QS_R0_63
#undef QS_R0_127
#undef QS_ACC8
#undef QS_ACC16
#undef QS_ACC32
#undef QS_ACC64
#undef QS_ACC128
#else
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&)[N / 2], const uint32_t (&)[4], uint64_t, int) {}
#endif

}  // namespace qs
