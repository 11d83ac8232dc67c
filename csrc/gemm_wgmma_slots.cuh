// Split-K of the wgmma GEMM through per-block slots instead of reds (v38): a tile split over 2 to
// kSlotMaxBlocks blocks has each contributor store its fp32 partial tile into its own slot of the
// GEMM workspace (coalesced 16-byte stores in the threads' register order, no atomics), count its
// arrival, and the last to arrive adds the others' slots into its registers and writes y as a
// whole tile would. No accumulator to zero, no read-back of lines that other SMs added into.
// Why: v36's timeline put the reds (2-7 us) and the drain that reads them back (3-12 us) after the
// main loop of every split call at 64-256 tokens (bench/NOTES.md, v36).
// Slots: two per block (the tile its range starts in and the one it ends in: region_of in
// qs_streamk.cuh), BN x NTOK floats each, in a.workspace (qs_workspace_need sizes it for every grid).
#pragma once

#include "qs_gemm_trace.cuh"
#include "qs_ptx.cuh"
#include "qs_streamk.cuh"
#include "quantserve_cuda.h"

// Tiles of fewer tokens than this keep the reds (an A/B knob: the build may define it).
#ifndef QS_SLOT_MIN_NTOK
#define QS_SLOT_MIN_NTOK 64
#endif

namespace qs {

constexpr int kSlotMaxBlocks = 4;  // more contributors than this: reds (the last would read too much)
constexpr int kSlotMinTok = QS_SLOT_MIN_NTOK;

struct SlotPlan {
  bool on;        // this tile's split goes through slots
  int b, b0, b1;  // this block, and the tile's first and last contributors
  int total, blocks;
  long long tile_first;  // the tile's first unit
  int slot_floats;       // BN x NTOK
  // Contributor bb's slot for the tile: its index in a.workspace, in slots.
  __device__ __forceinline__ long long region(int bb) const { return region_of(bb, tile_first, total, blocks); }
};

// The plan for block b's segment of `tile` (nst stages a tile, `total` units over `blocks` blocks);
// slot_floats: BN x NTOK. Off where the tile is whole, has more than kSlotMaxBlocks contributors, or
// the workspace holds fewer than two slots a block.
__device__ __forceinline__ SlotPlan slot_plan(const QsMatmulArgs& a, int tile, int nst, int total, int blocks, int b,
                                              int slot_floats) {
  SlotPlan p;
  p.tile_first = (long long)tile * nst;
  p.b = b;
  p.b0 = block_of_unit(p.tile_first, total, blocks);
  p.b1 = block_of_unit(p.tile_first + nst - 1, total, blocks);
  p.total = total;
  p.blocks = blocks;
  p.slot_floats = slot_floats;
  p.on = p.b1 > p.b0 && p.b1 - p.b0 + 1 <= kSlotMaxBlocks && a.workspace != nullptr &&
         a.workspace_floats >= 2LL * blocks * slot_floats;
  return p;
}

// A split tile's contributor: its partial acc (tile_out's register layout, [SPW][NTOK / 2]) into
// its slot as float4 f = (strip s, quad j) at [f * NTH + tid], then its arrival counted on the
// tile's counter (mine of nst stages). s_last (a __shared__ int): whether this block arrived last;
// then acc holds the whole tile's sums (the others' slots added, kFly float4 loads in flight a
// thread over every other slot at once) and the counter is zero again. Every thread calls this.
template <int NTOK, int SPW, int NTH>
__device__ __forceinline__ void slot_out(const QsMatmulArgs& a, float (&acc)[SPW][NTOK / 2], int strip0, int mine,
                                         int nst, int& s_last, const SlotPlan& sp) {
  constexpr int Q = NTOK / 8;  // float4s a strip and thread
  constexpr int F = SPW * Q;   // float4s a thread's part of a slot
  const int tid = threadIdx.x;
  float4* own = reinterpret_cast<float4*>(a.workspace + sp.region(sp.b) * sp.slot_floats) + tid;
#pragma unroll
  for (int f = 0; f < F; ++f) {
    const int s = f / Q, j = f % Q;
    __stcg(own + f * NTH, make_float4(acc[s][4 * j], acc[s][4 * j + 1], acc[s][4 * j + 2], acc[s][4 * j + 3]));
  }
  fence_acq_rel_gpu();
  __syncthreads();
  QS_GTRACE_OUT();
  if (tid == 0) s_last = atomicAdd(a.accum_counters + strip0, mine) + mine == nst;
  __syncthreads();
  if (!s_last) return;
  QS_GTRACE_DRAIN();
  fence_acq_rel_gpu();
  constexpr int kOthers = kSlotMaxBlocks - 1;
  constexpr int kFly = 8;  // float4 loads in flight a thread (16 spilled in the 256-column kernels)
  const int others = sp.b1 - sp.b0;                  // 1 .. kOthers
  // The other contributors' slots as float4 offsets into the workspace (32-bit: fewer registers).
  const float4* ws = reinterpret_cast<const float4*>(a.workspace) + tid;
  int o[kOthers];
#pragma unroll
  for (int k = 0; k < kOthers; ++k) {
    const int bb = sp.b0 + k + (sp.b0 + k >= sp.b ? 1 : 0);  // the k-th contributor other than this block
    o[k] = k < others ? int(sp.region(bb) * (sp.slot_floats / 4)) : 0;
  }
  // Items it = k * F + f (slot k, float4 f), kFly at a time: one L2 round trip a batch.
#pragma unroll
  for (int c0 = 0; c0 < kOthers * F; c0 += kFly) {
    if (c0 >= others * F) break;
    float4 v[kFly];
#pragma unroll
    for (int i = 0; i < kFly; ++i) {
      const int it = c0 + i, k = it / F;
      v[i] = it < kOthers * F && k < others ? __ldcg(ws + o[k] + (it % F) * NTH) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int i = 0; i < kFly; ++i) {
      const int f = (c0 + i) % F, s = f / Q, j = f % Q;
      if (c0 + i < kOthers * F) {
        acc[s][4 * j] += v[i].x;
        acc[s][4 * j + 1] += v[i].y;
        acc[s][4 * j + 2] += v[i].z;
        acc[s][4 * j + 3] += v[i].w;
      }
    }
  }
  if (tid == 0) a.accum_counters[strip0] = 0;
}

}  // namespace qs
