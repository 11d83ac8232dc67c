// The end of a wgmma GEMM block's tile segment (gemm_wgmma.cuh): its fp32 sums go to y when the
// block computed the whole tile, else are added with reds into the tile's split-K accumulator,
// and the contributor that completes the tile drains the accumulator into y and zeroes it (and
// its counter) for the next call. Tiles of 64 tokens or more split over 2-4 blocks go through
// per-block slots instead (gemm_wgmma_slots.cuh), and whole tiles of 64 tokens or more at a
// block's last segment write y through shared memory (v38). A call leaving its sums (a.sums) only
// stores or adds them there.
#pragma once

#include "gemm_wgmma_slots.cuh"
#include "qs_dequant.cuh"
#include "qs_gemm_trace.cuh"
#include "qs_probe.cuh"
#include "qs_ptx.cuh"
#include "qs_streamk.cuh"
#include "quantserve_cuda.h"

namespace qs {

// Whole tiles of fewer tokens keep the plain y stores: staged, the decode-step linears at 16 tokens
// took +0.7% (H200, v38: 1.806-1.820 vs 1.794-1.802 ms), at 64 -1.2% (2.973-2.978 vs 2.996-3.021).
constexpr int kStagedYMinTok = 64;

// bias, y: a.bias, a.y as T. acc[s][4i + 2h + e] (this thread's sums): column (strip0 + wg*SPW + s)*64 + 16wq + g + 8h,
// token 8i + 2t + e, for warpgroup wg, warp wq of it, g = lane / 4, t = lane % 4. whole: the block
// covered all of the tile's nst stages; else it covered `mine` of them. s_last: a __shared__ int of
// the block. dsm: the block's dynamic shared memory where its pipeline is idle (its last segment),
// else null; a whole tile then writes y through it in 16-byte row chunks. sp: where a split tile's
// partials go through slots (gemm_wgmma_slots.cuh; the last contributor then adds the others' into
// acc and writes y as a whole tile). Every thread of the block calls this (it has barriers).
template <typename T, int NTOK, int SPW, int NTH, bool SUMS = false>
__device__ __forceinline__ void tile_out(const QsMatmulArgs& a, const T* bias, T* y, float (&acc)[SPW][NTOK / 2],
                                         int strip0, bool whole, int mine, int nst, int& s_last, uint8_t* dsm,
                                         const SlotPlan& sp) {
  constexpr int BN = 128 * SPW;  // the tile's columns: 2 warpgroups x SPW strips of 64
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, t = lane & 3;
  if constexpr (probe::on(probe::kNoEpilogue)) {  // keep the sums live, or the compiler drops the wgmmas
    float sum = 0.f;
#pragma unroll
    for (int s = 0; s < SPW; ++s)
#pragma unroll
      for (int r = 0; r < NTOK / 2; ++r) sum += acc[s][r];
    if (a.m < 0) a.accum[tid] = sum;
    return;
  }
  // The caller's next kernel converts: fp32 sums in a.sums as [column][NTOK slots]. n is a multiple
  // of 8 (the binding checks), so a warp's 8 columns of one (s, h) are all inside the layer or all
  // past it, and every lane of a warp that calls red_token_quads (which shuffles) calls it.
  if constexpr (SUMS) {
    float* tsum = a.sums + (long long)strip0 * 64 * NTOK;
#pragma unroll
    for (int s = 0; s < SPW; ++s)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int cl = (wg * SPW + s) * 64 + 16 * wq + g + 8 * h;
        if (strip0 * 64 + cl >= a.n) continue;
        float* col = tsum + cl * NTOK;
        if (whole) {  // the only writer of these sums: stores, tokens < m only
#pragma unroll
          for (int i = 0; i < NTOK / 8; ++i) {
            const int m = 8 * i + 2 * t;
            const float v0 = acc[s][4 * i + 2 * h], v1 = acc[s][4 * i + 2 * h + 1];
            if (m + 1 < a.m) {
              *reinterpret_cast<float2*>(col + m) = make_float2(v0, v1);
            } else if (m < a.m) {
              col[m] = v0;
            }
          }
        } else {  // one of the tile's contributors: reds, with the slots of tokens >= m left zero
#pragma unroll
          for (int ip = 0; ip < NTOK / 16; ++ip) {
            const float* lo = acc[s] + 8 * ip + 2 * h;
            const float* hi = acc[s] + 8 * ip + 4 + 2 * h;
            const int tl = 16 * ip + 2 * t, th = tl + 8;
            red_token_quads(col, 16 * ip, tl < a.m ? lo[0] : 0.f, tl + 1 < a.m ? lo[1] : 0.f,
                            th < a.m ? hi[0] : 0.f, th + 1 < a.m ? hi[1] : 0.f, t, a.m);
          }
        }
      }
    QS_GTRACE_OUT();
    return;
  }
  const bool drained = !whole && sp.on;  // through slots (the trace marks out at the slot stores)
  if (drained) {
    slot_out<NTOK, SPW, NTH>(a, acc, strip0, mine, nst, s_last, sp);
    if (!s_last) return;
    whole = true;  // the tile's sums are complete in this block's registers
  }
  if (whole && NTOK >= kStagedYMinTok && dsm != nullptr && a.n % 8 == 0 && (reinterpret_cast<uintptr_t>(y) & 15) == 0) {
    // y rows through shared memory: [NTOK][BN + 8] T (16 bytes of skew a row), then 16-byte stores
    // of whole row chunks (the plain path below stores 2 bytes a lane, 8 columns x 4 rows a warp:
    // 6.7 us for a 128 x 128 tile, v37).
    constexpr int RS = BN + 8;
    T* st = reinterpret_cast<T*>(dsm);
    __syncthreads();  // every warp's last reads of the stage buffers are done
#pragma unroll
    for (int s = 0; s < SPW; ++s)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int nl = (wg * SPW + s) * 64 + 16 * wq + g + 8 * h;
        const int n = strip0 * 64 + nl;
        const float bv = bias != nullptr && n < a.n ? Act<T>::to_float(bias[n]) : 0.f;
#pragma unroll
        for (int i = 0; i < NTOK / 8; ++i)
#pragma unroll
          for (int e = 0; e < 2; ++e) st[(8 * i + 2 * t + e) * RS + nl] = Act<T>::from_float(acc[s][4 * i + 2 * h + e] + bv);
      }
    __syncthreads();
    const int cols = min(BN, a.n - strip0 * 64);  // a multiple of 8 (n is)
    const int chunks = cols >> 3;
    for (int i = tid; i < a.m * chunks; i += NTH) {
      const int m = i / chunks, c = (i - m * chunks) * 8;
      *reinterpret_cast<uint4*>(y + (long long)m * a.n + strip0 * 64 + c) = *reinterpret_cast<const uint4*>(st + m * RS + c);
    }
    if (!drained) QS_GTRACE_OUT();
  } else if (whole) {
#pragma unroll
    for (int s = 0; s < SPW; ++s)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = (strip0 + wg * SPW + s) * 64 + 16 * wq + g + 8 * h;
        if (n >= a.n) continue;
        const float bv = bias != nullptr ? Act<T>::to_float(bias[n]) : 0.f;
#pragma unroll
        for (int i = 0; i < NTOK / 8; ++i)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int m = 8 * i + 2 * t + e;
            if (m < a.m) y[(long long)m * a.n + n] = Act<T>::from_float(acc[s][4 * i + 2 * h + e] + bv);
          }
      }
    if (!drained) QS_GTRACE_OUT();
  } else {
    // The tile's accumulator: [BN columns][NTOK tokens] fp32 over its strips' accumulators.
    float* tacc = a.accum + (long long)strip0 * kAccumPerStrip;
#pragma unroll
    for (int s = 0; s < SPW; ++s)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int cl = (wg * SPW + s) * 64 + 16 * wq + g + 8 * h;
        const int m_valid = strip0 * 64 + cl < a.n ? a.m : 0;
#pragma unroll
        for (int ip = 0; ip < NTOK / 16; ++ip) {
          const float* lo = acc[s] + 8 * ip + 2 * h;      // i = 2ip: tokens 16ip + 2t + e
          const float* hi = acc[s] + 8 * ip + 4 + 2 * h;  // i = 2ip + 1: tokens 16ip + 8 + 2t + e
          if constexpr (!probe::on(probe::kNoReds)) {
            red_token_quads<probe::on(probe::kStoresNotReds)>(tacc + cl * NTOK, 16 * ip, lo[0], lo[1], hi[0],
                                                              hi[1], t, m_valid);
          } else if (a.m < 0) {
            tacc[tid] = lo[0] + lo[1] + hi[0] + hi[1];
          }
        }
      }
    if constexpr (probe::on(probe::kRedsOnly)) return;
    fence_acq_rel_gpu();
    __syncthreads();
    QS_GTRACE_OUT();
    if (tid == 0) {
      s_last = atomicAdd(a.accum_counters + strip0, mine) + mine == nst;
    }
    __syncthreads();
    if constexpr (probe::on(probe::kNoDrain)) {
      if (s_last && tid == 0) a.accum_counters[strip0] = 0;
      __syncthreads();
      return;
    }
    if (s_last) {
      QS_GTRACE_DRAIN();
      fence_acq_rel_gpu();
      // Items of 2 columns x 4 tokens, a warp's 32 items being 16 column pairs x the two token
      // quads of one 8-token octet: the lane pair (2i, 2i+1) reads the two halves of each
      // column's 32-byte sector of the [column][token] accumulator (whole sectors per load and
      // zeroing store), and a y store writes 64 contiguous bytes in each of two rows. Before
      // (v4-v8) the lanes ran along one column's tokens: each 4-byte y store was its own sector,
      // and at 128-256 tokens the drains cost more than the reds. A batch of items' loads is in
      // flight per thread: one L2 round trip per batch.
      const int cols = min(BN, a.n - strip0 * 64);
      constexpr int CB = BN / 32;  // 16-pair column blocks of a tile
      const int items = CB * 32 * ((a.m + 7) >> 3);
      constexpr int kBatch = NTOK * SPW <= 128 ? 4 : 8;  // 4 where registers are capped at 128
      auto item_at = [&](int idx, int& cp, int& tq) {
        const int grp = idx >> 5, l = idx & 31;
        cp = (grp % CB) * 16 + (l >> 1);
        tq = 2 * (grp / CB) + (l & 1);
      };
      for (int base = 0; base < items; base += NTH * kBatch) {
        float4 v0[kBatch], v1[kBatch];
        float b0[kBatch], b1[kBatch];
        bool ok[kBatch];
#pragma unroll
        for (int r = 0; r < kBatch; ++r) {
          const int idx = base + r * NTH + tid;
          int cp, tq;
          item_at(idx, cp, tq);
          ok[r] = idx < items && 2 * cp < cols;
          const float* p0 = tacc + (2 * cp) * NTOK + 4 * tq;
          v0[r] = ok[r] ? ldcg4(p0) : make_float4(0.f, 0.f, 0.f, 0.f);
          v1[r] = ok[r] ? ldcg4(p0 + NTOK) : make_float4(0.f, 0.f, 0.f, 0.f);
          const int n = strip0 * 64 + 2 * cp;
          b0[r] = ok[r] && bias != nullptr ? Act<T>::to_float(bias[n]) : 0.f;
          b1[r] = ok[r] && bias != nullptr ? Act<T>::to_float(bias[n + 1]) : 0.f;
        }
#pragma unroll
        for (int r = 0; r < kBatch; ++r) {
          if (!ok[r]) continue;
          int cp, tq;
          item_at(base + r * NTH + tid, cp, tq);
          float* p0 = tacc + (2 * cp) * NTOK + 4 * tq;
          if constexpr (!probe::on(probe::kDrainNoZero)) {
            stcg4(p0, make_float4(0.f, 0.f, 0.f, 0.f));
            stcg4(p0 + NTOK, make_float4(0.f, 0.f, 0.f, 0.f));
          }
          const int n = strip0 * 64 + 2 * cp;
          const float r0[4] = {v0[r].x, v0[r].y, v0[r].z, v0[r].w}, r1[4] = {v1[r].x, v1[r].y, v1[r].z, v1[r].w};
          if constexpr (probe::on(probe::kDrainNoY)) {  // keep the loads live
            if (a.m < 0) y[n] = Act<T>::from_float(r0[0] + r1[1] + r0[2] + r1[3] + b0[r] + b1[r]);
            continue;
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int m = 4 * tq + e;
            if (m < a.m)
              *reinterpret_cast<uint32_t*>(y + (long long)m * a.n + n) = Act<T>::pack2(r0[e] + b0[r], r1[e] + b1[r]);
          }
        }
      }
      if (tid == 0) a.accum_counters[strip0] = 0;
    }
    __syncthreads();
  }
}

}  // namespace qs
