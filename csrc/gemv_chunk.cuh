// The GEMV's per-chunk work (gemv.cuh): a chunk's activations as MMA fragments, and one chunk of
// codes (U k16 steps of a 64-column strip) widened raw, multiplied, and folded into the fp32
// accumulators with its groups' scales and zeros. Layout conventions: qs_dequant.cuh.
#pragma once

#include "qs_dequant.cuh"
#include "quantserve_cuda.h"

namespace qs {

// x of one chunk as m16n8k16 B fragments: xb[i][mb] holds tokens mb*8 + g at rows k0, k0 + 1 and
// k0 + 8, k0 + 9 of step step0 + i (k0 = 16 (step0 + i) + 2t); zero past m and past k. (Act-order
// layers get x already gathered: gather.cu.)
// KFULL (the caller knows every chunk lies inside K): no load is predicated, and tokens past m read
// row m - 1 instead of zeros (their sums land in tokens that are never written). Predicated loads
// make ptxas copy the memory descriptor into fresh uniform registers before each one (v24).
template <typename T, int U, int MB, bool KFULL = false>
__device__ __forceinline__ void load_x_chunk(const QsMatmulArgs& a, int step0, int lane, uint32_t (&xb)[U][MB][2]) {
  const int g = lane >> 2, t = lane & 3;
  const T* x = reinterpret_cast<const T*>(a.x);
  if constexpr (KFULL) {
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      const unsigned int* xr =
          reinterpret_cast<const unsigned int*>(x + (long long)min(mb * 8 + g, a.m - 1) * a.k + step0 * 16 + 2 * t);
#pragma unroll
      for (int i = 0; i < U; ++i) {  // (plain loads: an unconditional __ldg may be hoisted above the PDL wait)
        xb[i][mb][0] = xr[8 * i];
        xb[i][mb][1] = xr[8 * i + 4];
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < U; ++i)
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        const int m = mb * 8 + g;
        const int k0 = (step0 + i) * 16 + 2 * t;
        const unsigned int* xr = reinterpret_cast<const unsigned int*>(x + (long long)m * a.k + k0);
        xb[i][mb][0] = (m < a.m && k0 < a.k) ? __ldg(xr) : 0u;
        xb[i][mb][1] = (m < a.m && k0 + 8 < a.k) ? __ldg(xr + 4) : 0u;
      }
  }
}

// One chunk (U k16 steps of one 64-column strip) into acc. wq: the lane's codes of each step;
// sraw/zraw: the lane's 16-byte rows of scales / zeros of the chunk's SPC groups. Each run of
// U / SPC steps shares one group: its MMAs sum x * (code + offset) unscaled into `part` (Widen:
// the codes widened with no packed op), a "ones" MMA sums x into the offset's share (D rows g)
// and sum(x) (D rows g + 8) in `xs`, and the run is folded into acc in fp32 as
// s * (part - offset share - z * sum(x)). Steps past k have zero x, so whatever codes they hold
// add nothing.
template <typename T, int BITS, int U, int MB, int SPC>
__device__ __forceinline__ void gemv_chunk(const uint4 (&wq)[U][Dequant<T, BITS>::kWordsPerLane / 4],
                                           const uint32_t (&xb)[U][MB][2], const uint4 (&sraw)[SPC],
                                           const uint4 (&zraw)[SPC], bool has_z, int zero_point,
                                           float (&acc)[MB][4][4]) {
  using W = Widen<T, BITS>;
  constexpr int WPL = Dequant<T, BITS>::kWordsPerLane;
  constexpr int V = WPL / 4;
  constexpr int SSTEP = U / SPC;
  static_assert(SSTEP >= 1, "more scale loads than steps");
#pragma unroll
  for (int r = 0; r < SPC; ++r) {
    float part[MB][4][4], xs[MB][4];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
      for (int c = 0; c < 4; ++c) xs[mb][c] = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) part[mb][j][c] = 0.f;
    }
#pragma unroll
    for (int ii = 0; ii < SSTEP; ++ii) {
      const int i = r * SSTEP + ii;
      uint32_t words[WPL];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        words[4 * v + 0] = wq[i][v].x;
        words[4 * v + 1] = wq[i][v].y;
        words[4 * v + 2] = wq[i][v].z;
        words[4 * v + 3] = wq[i][v].w;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t pr[4];
        W::tile(words, j, pr);
        // A = W^T tile (rows = 16 columns of W): a0 (col g, k lo), a1 (col g+8, k lo),
        // a2 (col g, k hi), a3 (col g+8, k hi).
        const uint32_t af[4] = {pr[0], pr[2], pr[1], pr[3]};
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) mma_16816<T>(part[mb][j], af, xb[i][mb]);
      }
      const uint32_t ones[4] = {W::kOnes0, W::kOnes1, W::kOnes2, W::kOnes3};
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) mma_16816<T>(xs[mb], ones, xb[i][mb]);
    }
    FoldConsts<T> fc;
    fc.load(sraw[r], zraw[r], has_z, zero_point);
    // xs[mb][e]: token 2t + e's offset share; xs[mb][2 + e]: its sum(x). One zero for every column
    // (the layer's zero point): the offset and the zero make one correction per token.
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      float corr[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) corr[e] = fmaf(fc.z[0], xs[mb][2 + e], xs[mb][e]);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int col = 2 * j + (c >> 1), e = c & 1;
          const float d = has_z ? fmaf(-fc.z[col], xs[mb][2 + e], part[mb][j][c] - xs[mb][e]) : part[mb][j][c] - corr[e];
          acc[mb][j][c] = fmaf(fc.s[col], d, acc[mb][j][c]);
        }
    }
  }
}

// Offset, in 16-byte units, of a lane's scale (or zero) row for group gi of a strip.
__device__ __forceinline__ long long group_row(int gi, int n_strips, int strip, int g) {
  return ((long long)gi * n_strips + strip) * 8 + g;
}

// A lane's codes of one chunk: U k16 steps from step0 of a strip, V 16-byte words a step. Steps
// past k re-read the strip's last step: their x is zero and raw codes are finite integers, so they
// add nothing, and the loads need no branch (which would split the chunk's basic block).
template <int U, int V>
__device__ __forceinline__ void load_chunk_codes(const uint4* qw, int strip, int k_steps, int step0, int lane,
                                                 uint4 (&wq)[U][V]) {
  const uint4* wp = qw + ((long long)strip * k_steps * 32 + lane) * V;
#pragma unroll
  for (int i = 0; i < U; ++i)
#pragma unroll
    for (int v = 0; v < V; ++v) wq[i][v] = ldg128(wp + (long long)min(step0 + i, k_steps - 1) * 32 * V + v);
}

// A lane's scale (and zero) rows of the SPC groups a chunk of U steps from step0 meets; zero rows
// are all-zero where has_z is false (the layer's zero point applies).
template <int U, int SPC>
__device__ __forceinline__ void load_group_rows(const QsMatmulArgs& a, int n_strips, int strip, int step0, int g,
                                                bool has_z, uint4 (&sraw)[SPC], uint4 (&zraw)[SPC]) {
  const uint4* sc = reinterpret_cast<const uint4*>(a.scales);
  const uint4* zs = reinterpret_cast<const uint4*>(a.zeros);
#pragma unroll
  for (int s = 0; s < SPC; ++s) {
    const long long off = group_row(min((step0 + s * (U / SPC)) >> a.group_shift, a.groups - 1), n_strips, strip, g);
    sraw[s] = __ldg(sc + off);
    zraw[s] = has_z ? __ldg(zs + off) : make_uint4(0, 0, 0, 0);
  }
}

// Before a GEMV waits for the previous kernel (PDL): pull the first chunk of codes of a warp
// (strip, chunk ch of U steps) into L2, so the weight stream starts during that kernel's tail and
// the loads after the wait hit L2.
template <int U, int V>
__device__ __forceinline__ void prefetch_chunk_l2(const uint4* qw, int strip, int ch, int k_steps, int lane) {
  constexpr int kChunkBytes = U * 32 * V * 16;
  const char* base = reinterpret_cast<const char*>(qw + (((long long)strip * k_steps + ch * U) * 32) * V);
  const int bytes = min(kChunkBytes, (k_steps - ch * U) * 32 * V * 16);
  for (int off = lane * 128; off < bytes; off += 32 * 128) prefetch_l2(base + off);
}

}  // namespace qs
