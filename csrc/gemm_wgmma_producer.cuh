// The producer of the warp-specialised wgmma GEMM (gemm_wgmma.cuh with WS): one thread of the
// block's extra warp fills the stage buffers for the block's stream-K units, in the consumers'
// order, and hands each over through the stage's "full" mbarrier.
// Why: in the unspecialised kernel every thread issues its share of each stage's cp.async copies,
// and the block meets at a barrier per stage, so copy issue, address math and the barrier sit in
// series with the widening and the wgmmas (H200, 16-token probes: 0.99 ms of 1.86 for the
// decode-step linears without them). Here the copy engine does the work from a handful of
// instructions a stage, and the producer runs ahead of the consumers by as many stages as there
// are buffers, across tile ends too, so the next tile's weights stream in during the epilogue.
//
// A stage, as the consumers read it (gemm_wgmma.cuh):
//   x      [XSUB][NTOK][64] 16-bit, 128-byte swizzled: XSUB TMA boxes of the x tensor map
//          (tokens past m and k past K are zero-filled by the copy engine);
//   codes  [STRIPS][KB steps][32 lanes][V] uint4: one bulk copy per strip (a strip's steps are
//          contiguous in the repacked layout); strips past the layer and steps past K are not
//          copied (stale bytes: their products land in columns never written, or multiply x's
//          zero-filled k);
//   scales [GSLOTS][STRIPS][8] uint4, zeros after them: one bulk copy per group the stage meets
//          (a group's strips are contiguous).
// Buffer b's i-th fill waits for the consumers' release of its (i-1)-th (the "empty" barrier's
// phase i-1); the first `stages` fills wait for nothing, and their weights are copied before
// griddepcontrol.wait (constants of the layer), their x after it.
#pragma once

#include "gemm_wgmma_cfg.cuh"
#include "qs_mbar.cuh"
#include "qs_ptx.cuh"
#include "qs_streamk.cuh"
#include "quantserve_cuda.h"

namespace qs {

// smem_addr: the 1024-byte aligned stage area; full / empty: barrier b at full + 8b / empty + 8b;
// [u0, u1): the block's units, the first at `first`; n_strips, k_steps, nst: the layer's strips,
// k16 steps and stages per tile.
template <typename Cfg, int stages>
__device__ __forceinline__ void wgmma_produce(const QsMatmulArgs& a, const CUtensorMap* xmap, uint32_t smem_addr,
                                              uint32_t full, uint32_t empty, int u0, int u1, StageCursor first,
                                              int n_strips, int k_steps, int nst) {
  constexpr int KB = Cfg::KB, STRIPS = Cfg::STRIPS, V = Cfg::V;
  constexpr int kStepBytes = 32 * V * 16;  // one strip's codes of one k16 step
  const uint4* qw = reinterpret_cast<const uint4*>(a.qweight);
  const uint4* sc = reinterpret_cast<const uint4*>(a.scales);
  const uint4* zs = reinterpret_cast<const uint4*>(a.zeros);
  const bool has_zeros = zs != nullptr;
  auto x_at = [&](int b) { return smem_addr + uint32_t(b * Cfg::X_BYTES); };
  auto w_at = [&](int b) { return smem_addr + uint32_t(stages * Cfg::X_BYTES + b * Cfg::REST_BYTES); };
  auto bar = [](uint32_t base, int b) { return base + uint32_t(8 * b); };
  // The strips, steps and groups of a stage that exist, and their bytes.
  struct Extent {
    int strip0, step0, ns, nk, gfirst, ng;
  };
  auto extent = [&](const StageCursor& cu) {
    Extent e;
    e.strip0 = cu.tile * STRIPS;
    e.step0 = cu.st * KB;
    e.ns = min(STRIPS, n_strips - e.strip0);
    e.nk = min(KB, k_steps - e.step0);
    e.gfirst = e.step0 >> a.group_shift;
    e.ng = ((e.step0 + e.nk - 1) >> a.group_shift) - e.gfirst + 1;
    return e;
  };
  auto weight_bytes = [&](const Extent& e) {
    return uint32_t(e.ns * e.nk * kStepBytes + e.ng * e.ns * 128 * (has_zeros ? 2 : 1));
  };
  auto load_weights = [&](const Extent& e, int b) {
    const uint32_t fb = bar(full, b);
    for (int w = 0; w < e.ns; ++w)
      bulk_g2s(w_at(b) + uint32_t(w * KB * kStepBytes), qw + ((long long)(e.strip0 + w) * k_steps + e.step0) * 32 * V,
               uint32_t(e.nk * kStepBytes), fb);
    for (int gi = 0; gi < e.ng; ++gi) {
      const long long off = ((long long)(e.gfirst + gi) * n_strips + e.strip0) * 8;
      const uint32_t dst = w_at(b) + uint32_t(Cfg::W_BYTES + gi * STRIPS * 128);
      bulk_g2s(dst, sc + off, uint32_t(e.ns * 128), fb);
      if (has_zeros) bulk_g2s(dst + uint32_t(Cfg::S_BYTES), zs + off, uint32_t(e.ns * 128), fb);
    }
  };
  auto load_x = [&](const Extent& e, int b) {
#pragma unroll
    for (int s = 0; s < Cfg::XSUB; ++s)
      tma_load_2d(x_at(b) + uint32_t(s * Cfg::X_SUB_BYTES), xmap, e.step0 * 16 + 64 * s, 0, bar(full, b));
  };

  tma_prefetch_map(xmap);
  const int pre = min(stages, u1 - u0);
  StageCursor cu = first;
  for (int i = 0; i < pre; ++i) {
    const Extent e = extent(cu);
    mbar_arrive_expect_tx(bar(full, i), weight_bytes(e) + uint32_t(Cfg::X_BYTES));
    load_weights(e, i);
    cu.advance(nst);
  }
  pdl_launch_dependents();
  pdl_wait();
  StageCursor cx = first;
  for (int i = 0; i < pre; ++i) {
    load_x(extent(cx), i);
    cx.advance(nst);
  }
  int b = pre == stages ? 0 : pre;
  uint32_t phase = 0;
  for (int u = u0 + pre; u < u1; ++u) {
    const Extent e = extent(cu);
    mbar_wait(bar(empty, b), phase);
    mbar_arrive_expect_tx(bar(full, b), weight_bytes(e) + uint32_t(Cfg::X_BYTES));
    load_weights(e, b);
    load_x(e, b);
    cu.advance(nst);
    if (++b == stages) {
      b = 0;
      phase ^= 1;
    }
  }
}

}  // namespace qs
