// Stream-K bookkeeping of the GEMV (per warp) and GEMM (per block) kernels.
// Why: a 4096x4096 int4 layer is 8 MB, a few microseconds of HBM time, and its tile count rarely
// divides the SM count. The grid is one resident wave (the Hopper GEMM's may stop a few blocks short of
// it so that every tile gets the same number of blocks: aligned_blocks); block (or warp) b takes the
// contiguous unit range [T*b/B, T*(b+1)/B) of the linearised (tile, k-chunk) space, so every SM
// streams the same number of bytes. The GEMV sums a split strip with fp32 reds into a zeroed
// accumulator (gemv.cuh). In the GEMM a tile split between blocks is summed through fp32 partials
// in the workspace (plain coalesced stores, no float atomics): each contributor stores, then bumps
// the tile's arrival counter; the last to arrive adds the others' partials to its registers,
// writes y and resets the counter. Partials live in per-block "head"/"tail" regions, so the
// workspace size is bounded by the grid, not by m*n. The Hopper GEMM (gemm_wgmma.cuh) sums split
// tiles like the GEMV: fp32 reds into a zeroed accumulator, the last contributor writes y.
#pragma once

#include <stdint.h>

namespace qs {

__device__ __forceinline__ long long unit_begin(long long total, int b, int blocks) {
  return total * b / blocks;
}

// The block whose range holds `unit`.
__device__ __forceinline__ int block_of_unit(long long unit, long long total, int blocks) {
  long long b = unit * blocks / total;
  while (b + 1 < blocks && unit_begin(total, int(b + 1), blocks) <= unit) ++b;
  while (b > 0 && unit_begin(total, int(b), blocks) > unit) --b;
  return int(b);
}

// Workspace region of block b's partial for the tile that starts at `tile_first`: a block holds at
// most two partial tiles, the one its range starts in (head, 0) and the one it ends in (tail, 1).
__device__ __forceinline__ long long region_of(int b, long long tile_first, long long total, int blocks) {
  long long b_first = unit_begin(total, b, blocks);
  int tail = b_first < tile_first ? 1 : 0;
  return 2LL * b + tail;
}

// (tile, stage) of a GEMM's stream-K unit, advanced by one per call: no 64-bit division by the
// stages per tile in the main loop.
struct StageCursor {
  int tile, st;
  __device__ __forceinline__ void advance(int nst) {
    if (++st == nst) {
      st = 0;
      ++tile;
    }
  }
};

// Split-K accumulator floats per 64-column strip: a [64 columns][up to 256 tokens] fp32 block (the
// GEMV uses [64][32] of it; the Hopper GEMM [64][N tokens], or, for 256-token tiles of one strip per
// warpgroup, [128 columns][256 tokens] over the tile's two strips).
constexpr int kAccumPerStrip = 256 * 64;

// Adds one lane's fp32 partials of one output column into `col` ([tokens] contiguous, zeroed, 16-byte
// aligned), for tokens base + 2t + {0, 1} (lo) and base + 8 + 2t + {0, 1} (hi), t = lane & 3 (the
// MMA accumulator layout). Lanes t and t^1 swap a pair first so each holds 4 consecutive tokens and
// adds them with one 16-byte red on sm_90 (a quarter of the scalar reds). Tokens >= m are skipped by
// quad (their partials are zero, so the accumulator stays zero). Every lane of the warp must call it.
// kStore (timing probe 2048 of the wgmma GEMM only, wrong sums): a plain 16-byte store instead of the red.
template <bool kStore = false>
__device__ __forceinline__ void red_token_quads(float* col, int base, float lo0, float lo1, float hi0, float hi1,
                                                int t, int m) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const bool odd = t & 1;
  const float s0 = __shfl_xor_sync(0xffffffffu, odd ? lo0 : hi0, 1);
  const float s1 = __shfl_xor_sync(0xffffffffu, odd ? lo1 : hi1, 1);
  // even t: tokens base + 2t .. +3 (own lo pair, then the partner's); odd t: base + 8 + 2(t-1) .. +3
  // (the partner's hi pair, then its own).
  const int m0 = base + 8 * odd + 2 * (t & ~1);
  const float4 v = odd ? make_float4(s0, s1, hi0, hi1) : make_float4(lo0, lo1, s0, s1);
  if (m0 < m) {
    if constexpr (kStore)
      asm volatile("st.global.cg.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(col + m0), "f"(v.x), "f"(v.y), "f"(v.z),
                   "f"(v.w)
                   : "memory");
    else
      asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(col + m0), "f"(v.x), "f"(v.y),
                   "f"(v.z), "f"(v.w)
                   : "memory");
  }
#else
  const int m_lo = base + 2 * t, m_hi = base + 8 + 2 * t;
  if (m_lo < m) atomicAdd(col + m_lo, lo0);
  if (m_lo + 1 < m) atomicAdd(col + m_lo + 1, lo1);
  if (m_hi < m) atomicAdd(col + m_hi, hi0);
  if (m_hi + 1 < m) atomicAdd(col + m_hi + 1, hi1);
#endif
}

}  // namespace qs
