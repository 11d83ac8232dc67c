// cp.async staging shared by the two GEMMs: the scales and zeros one pipeline stage needs.
// Why: both kernels stage KB k16 steps of STRIPS 64-column strips per cp.async stage, and the groups
// those steps meet (1 to KB of them) are what the dequantisation reads; one copy of the indexing.
#pragma once

#include "qs_ptx.cuh"
#include "quantserve_cuda.h"

namespace qs {

// Scales (and zeros, when the layer has them) of the groups met by k16 steps [step0, step0 + KB) of
// strips [strip0, strip0 + STRIPS): into ss / sz as [STRIPS][SLOTS group slots][8 lane groups] uint4
// (slot = group - the stage's first group; strips past n_strips are zero-filled).
// SLOTS (default KB): group slots per strip in the layout; a caller with fewer slots than steps
// only stages layers whose groups are at least KB / SLOTS steps long.
template <int STRIPS, int KB, int NTH, int SLOTS = KB>
__device__ __forceinline__ void stage_group_consts(const QsMatmulArgs& a, uint4* ss, uint4* sz, int strip0,
                                                   int step0, int n_strips, int k_steps, int tid) {
  const uint4* sc = reinterpret_cast<const uint4*>(a.scales);
  const uint4* zs = reinterpret_cast<const uint4*>(a.zeros);
  const int gfirst = step0 >> a.group_shift;
  const int ng = (min(step0 + KB - 1, k_steps - 1) >> a.group_shift) - gfirst + 1;
  // Every (strip, slot, lane group) of the stage's slot grid, in the smem order; slots >= ng idle.
  // The grid's shape is compile-time, so the index splits into shifts (no integer division).
#pragma unroll
  for (int base = 0; base < STRIPS * SLOTS * 8; base += NTH) {
    const int idx = base + tid;
    const int g8 = idx % 8, gg = (idx / 8) % SLOTS, w = idx / (8 * SLOTS);
    if ((STRIPS * SLOTS * 8) % NTH != 0 && idx >= STRIPS * SLOTS * 8) break;
    if (gg >= ng) continue;
    const int strip = strip0 + w;
    const int gi = min(gfirst + gg, a.groups - 1);
    const bool ok = strip < n_strips;
    const long long off = ((long long)gi * n_strips + strip) * 8 + g8;
    cp_async16(ss + idx, ok ? sc + off : sc, ok);
    if (zs != nullptr) cp_async16(sz + idx, ok ? zs + off : zs, ok);
  }
}

}  // namespace qs
