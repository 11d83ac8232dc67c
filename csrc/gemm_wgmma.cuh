// Hopper GEMM kernel for up to 256 tokens (gemm_wgmma_launch.cuh launches it, in 256-token slices
// above): warpgroup MMA (wgmma) with the dequantised weights as the register A operand and the
// tokens as the shared-memory B operand (swap-AB, like the GEMV).
// Why this shape: at 64-128 tokens the mma.sync GEMM (gemm.cuh) spends its time widening codes
// into a shared-memory tile, reading it back with ldmatrix and waiting on barriers; here each warp
// widens only its own 16 output columns of a k16 step (one 4-byte shared load, 4 LOP3 + 8 packed
// ops) straight into the A registers of an asynchronous m64nNk16 wgmma (N = 32 to 256 tokens),
// which reads the tokens from a 128-byte-swizzled tile that cp.async filled. Split tiles are summed
// with fp32 reds into the zeroed strip accumulators (as in the GEMV); the last contributor writes y.
//
// 16-token tiles (WgCfg::kMmaSync) issue the same A fragments as two mma.sync m16n8k16 a strip
// and step instead, with B from the x tile by ldmatrix; the accumulators have the same layout.
//
// Block: 2 warpgroups x SPW strips of 64 columns; warp w of a warpgroup owns columns 16w..16w+15
// of each of its strips. A stage is KB k16 steps: 8 (128 k: two 64-k x sub-tiles, each a
// 128-byte swizzled row per token) or, for the 128-token tiles of narrow layers and 8-bit
// 256-token tiles, 4 (one sub-tile).
#pragma once

#include "gemm_wgmma_cfg.cuh"
#include "gemm_wgmma_out.cuh"
#include "qs_gemm_trace.cuh"
#include "qs_dequant.cuh"
#include "qs_launch.cuh"
#include "qs_probe.cuh"
#include "qs_stage.cuh"
#include "qs_streamk.cuh"
#include "qs_wgmma.cuh"
#include "quantserve_cuda.h"

namespace qs {

// FOLD (layers whose groups span whole stages, 16-token tiles, so mma.sync): the widening leaves
// out the scale (code - zero, exact), the MMAs of a stage accumulate into a per-stage partial, and
// the stage ends by adding scale x partial into the accumulators in fp32 and zeroing the partial.
// SUMS (a call that leaves its sums, a.sums set): tile ends store or add fp32 sums there instead
// of writing y (tile_out); a kernel of its own, so the y kernel's code and registers stay its own.
template <typename T, int BITS, int NTOK, int SPW, bool FOLD = false, bool SUMS = false>
__global__ void __launch_bounds__(256, WgCfg<T, BITS, NTOK, SPW>::kBlocksPerSm)
    gemm_wgmma_kernel(const QsMatmulArgs a) {
#if QS_HAS_WGMMA
  using Cfg = WgCfg<T, BITS, NTOK, SPW>;
  constexpr bool MS = Cfg::kMmaSync;
  static_assert(!FOLD || MS, "the fold is built for the 16-token (mma.sync) tiles");
  static_assert(NTOK * (Cfg::BN + 8) * int(sizeof(T)) <= Cfg::kStages * (Cfg::X_BYTES + Cfg::REST_BYTES),
                "a whole tile's y rows fit the stage buffers");
  constexpr int KB = Cfg::KB, V = Cfg::V, WPL = Cfg::WPL, NACC = Cfg::NACC, STRIPS = Cfg::STRIPS;
  constexpr int NTH = Cfg::kThreads, stages = Cfg::kStages;
  extern __shared__ uint8_t smem_raw[];
  __shared__ int s_last;
  // wgmma's 128-byte swizzle is computed on shared addresses: x tiles start 1024-byte aligned.
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  uint8_t* smem = smem_raw + ((1024 - (raw_addr & 1023)) & 1023);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wq = warp & 3;
  const int g = lane >> 2;
  const int n_strips = (a.n + 63) >> 6;
  const int k_steps = (a.k + 15) >> 4;
  const int nst = (k_steps + KB - 1) / KB;  // stages per tile
  const int tiles = (n_strips + STRIPS - 1) / STRIPS;
  const int total = tiles * nst;  // the launcher checks that it fits an int
  const int blocks = gridDim.x, b = blockIdx.x;
  const int u0 = int(unit_begin(total, b, blocks)), u1 = int(unit_begin(total, b + 1, blocks));
  QS_GTRACE_ENTER(a.qweight, NTOK, 0);

  const T* x = reinterpret_cast<const T*>(a.x);
  const T* bias = reinterpret_cast<const T*>(a.bias);
  T* y = reinterpret_cast<T*>(a.y);
  const uint4* qw = reinterpret_cast<const uint4*>(a.qweight);
  const bool has_zeros = a.zeros != nullptr;

  // Stage buffers as 32-bit shared-window addresses (x tiles first, then codes / scales / zeros).
  const uint32_t smem_addr = raw_addr + ((1024 - (raw_addr & 1023)) & 1023);
  auto x_at = [&](int buf) { return smem_addr + uint32_t(buf * Cfg::X_BYTES); };
  auto w_at = [&](int buf) { return smem_addr + uint32_t(stages * Cfg::X_BYTES + buf * Cfg::REST_BYTES); };
  auto rest = [&](int buf) { return smem + stages * Cfg::X_BYTES + buf * Cfg::REST_BYTES; };
  auto stage_s = [&](int buf) { return reinterpret_cast<uint4*>(rest(buf) + Cfg::W_BYTES); };
  auto stage_z = [&](int buf) { return reinterpret_cast<uint4*>(rest(buf) + Cfg::W_BYTES + Cfg::S_BYTES); };

  using Cursor = StageCursor;
  auto advance = [&](Cursor& c) { c.advance(nst); };
  // One stage: x [XSUB][NTOK][64] (k >= K zero-filled), the codes of STRIPS strips x KB steps, and
  // their scales / zeros. The per-thread parts of the addresses that do not move with the stage are
  // computed once here: a stage's copies then cost a few adds each.
  // (x rounds: at 16 tokens with 64-k stages only half the threads copy x.)
  constexpr int XR = (Cfg::X_CHUNKS + NTH - 1) / NTH, WR = Cfg::W_CHUNKS / NTH;
  constexpr int XCPR = 8 * Cfg::XSUB, XRS = NTH / XCPR;  // x chunks per token row; rows per copy round
  static_assert(NTH == 256 && XRS % 8 == 0, "x rows x_row + XRS r keep the row's swizzle phase");
  // This thread copies chunk x_cc of rows x_row + XRS r: sub-tile x_cc / 8, 16-byte chunk x_cc % 8.
  const int x_row = tid / XCPR, x_cc = tid % XCPR;
  const int x_dst = (x_cc >> 3) * (NTOK * 64) + x_row * 64 + (((x_cc & 7) ^ (x_row & 7)) << 3);
  const T* x_src = x + (long long)x_row * a.k + x_cc * 8;
  int w_off[WR], w_strip[WR], w_step[WR];  // per copy: offset in the tile's code stream, strip, step
#pragma unroll
  for (int r = 0; r < WR; ++r) {
    const int idx = tid + r * NTH;
    const int v = idx % V, ln = (idx / V) % 32, s = (idx / (V * 32)) % KB, w = idx / (V * 32 * KB);
    w_strip[r] = w;
    w_step[r] = s;
    w_off[r] = ((w * k_steps + s) * 32 + ln) * V + v;
  }
  // The common stage lies wholly inside the layer (all STRIPS strips exist, its KB steps end at or
  // before K): its copies need no bounds, so they take a path of one address add each, from
  // per-thread offsets computed here once. Only the layer's last tile (n tail) and last stage (K
  // tail) take the bounded copies below.
  // x: rows past m read row m - 1 (their products land in tokens that are never written).
  int x_off[XR];  // byte offset of copy r's chunk in x, at k = 0
#pragma unroll
  for (int r = 0; r < XR; ++r) x_off[r] = (min(x_row + XRS * r, a.m - 1) * a.k + x_cc * 8) * 2;
  const bool x_copies = Cfg::X_CHUNKS % NTH == 0 || x_row < NTOK;  // (16 tokens x 64 k: half the threads)
  auto k_inside = [&](const Cursor& cu) { return (cu.st + 1) * KB * 16 <= a.k; };
  auto stage_inside = [&](const Cursor& cu) { return (cu.tile + 1) * STRIPS <= n_strips && k_inside(cu); };
  auto load_x = [&](const Cursor& cu, int buf) {
    const int step0 = cu.st * KB;
    const uint32_t sx = x_at(buf) + uint32_t(x_dst * 2);
    if (k_inside(cu)) {
      const T* xs = x + step0 * 16;
#pragma unroll
      for (int r = 0; r < XR; ++r)
        if (x_copies) cp_async16_full(sx + r * XRS * 128, gaddr(xs, x_off[r]));
      return;
    }
    const int gk = step0 * 16 + x_cc * 8;
#pragma unroll
    for (int r = 0; r < XR; ++r) {
      if (Cfg::X_CHUNKS % NTH != 0 && x_row >= NTOK) break;
      const bool ok = x_row + XRS * r < a.m && gk < a.k;
      cp_async16_at(sx + r * XRS * 128, ok ? x_src + (long long)(XRS * r) * a.k + step0 * 16 : x, ok);
    }
  };
  // Scales / zeros: STRIPS x GSLOTS x 8 items of 16 bytes (strip, group slot, lane group), at most
  // one per thread; a stage inside the layer stages the same number of groups (gs_full) every time.
  constexpr int GSLOTS = Cfg::GSLOTS;
  constexpr int kGcItems = STRIPS * GSLOTS * 8;
  static_assert(kGcItems <= NTH, "one group-constant item per thread");
  const int gc_g8 = tid % 8, gc_slot = (tid / 8) % GSLOTS, gc_w = tid / (8 * GSLOTS);
  const int gs_full = groups_per_chunk<KB>(a.group_shift);
  const bool gc_copies = tid < kGcItems && gc_slot < gs_full;
  // Byte offsets: of this thread's code chunks in a stage's [strip][step] block, and of its
  // scale / zero item from the stage's first group and strip (the launcher checks that the
  // scales, and a slice of x, fit 31 bits of bytes).
  int w_off_b[WR];
#pragma unroll
  for (int r = 0; r < WR; ++r) w_off_b[r] = w_off[r] * 16;
  const int gc_off_b = ((gc_slot * n_strips + gc_w) * 8 + gc_g8) * 16;
  const uint4* g_sc = reinterpret_cast<const uint4*>(a.scales);
  const uint4* g_zs = reinterpret_cast<const uint4*>(a.zeros);
  // The stage's codes, scales and zeros: constants of the layer, so they may be copied before
  // the kernels this one depends on have finished (programmatic dependent launch).
  auto load_weights = [&](const Cursor& cu, int buf) {
    const int strip0 = cu.tile * STRIPS, step0 = cu.st * KB;
    const uint32_t sw = w_at(buf) + uint32_t(tid * 16);
    const uint4* wsrc = qw + ((long long)strip0 * k_steps + step0) * 32 * V;
    if (stage_inside(cu)) {
#pragma unroll
      for (int r = 0; r < WR; ++r) cp_async16_full(sw + r * NTH * 16, gaddr(wsrc, w_off_b[r]));
      if (gc_copies) {
        const int off = ((step0 >> a.group_shift) * n_strips + strip0) * 128 + gc_off_b;
        const uint32_t ss = w_at(buf) + uint32_t(Cfg::W_BYTES + tid * 16);
        cp_async16_full(ss, gaddr(g_sc, off));
        if (has_zeros) cp_async16_full(ss + Cfg::S_BYTES, gaddr(g_zs, off));
      }
      return;
    }
#pragma unroll
    for (int r = 0; r < WR; ++r) {
      const bool ok = strip0 + w_strip[r] < n_strips && step0 + w_step[r] < k_steps;
      cp_async16_at(sw + r * NTH * 16, ok ? wsrc + w_off[r] : qw, ok);
    }
    stage_group_consts<STRIPS, KB, NTH, GSLOTS>(a, stage_s(buf), stage_z(buf), strip0, step0, n_strips, k_steps, tid);
  };
  auto load_unit = [&](const Cursor& cu, int buf) {
    load_x(cu, buf);
    load_weights(cu, buf);
  };

  float acc[SPW][NACC];
  float part[FOLD ? SPW : 1][FOLD ? NACC : 1];  // FOLD: this stage's unscaled sums
#pragma unroll
  for (int s = 0; s < SPW; ++s)
#pragma unroll
    for (int r = 0; r < NACC; ++r) acc[s][r] = 0.f;
  if constexpr (FOLD) {
#pragma unroll
    for (int s = 0; s < SPW; ++s)
#pragma unroll
      for (int r = 0; r < NACC; ++r) part[s][r] = 0.f;
  }

  // The KB k16 steps of a stage. Steps past K multiply zero-filled x, so they add nothing and the
  // loop stays uniform. A registers are double-buffered: step kk's wgmmas run while step kk+1 is
  // widened; wait_group 1 retires step kk - 1 before its registers are reused. The pipeline does
  // not drain at the end of a stage: the last step's wgmmas are still running when the next
  // stage's first step is widened (KB is even, so the buffers alternate across stages too), and
  // only a flush waits for all. (MS tiles' mma.sync needs none of this.)
  static_assert(KB % 2 == 0, "A-register buffers alternate across stages");
  uint32_t af[2][SPW][4];
  // Group constants stay in registers while the group does: a stage reloads them only when its
  // steps reach a new group (g128: every other stage) or a new tile starts (gc_group = -1).
  GroupConsts<T, BITS> gc[SPW];  // only columns 2wq, 2wq+1 (slots 0, 1) are used
  int gc_group = -1;
  // Steps 1..KB-1 of a stage that start a group (groups of fewer than KB steps; their power-of-two
  // length divides the stage, so the pattern is the same in every stage): a bit mask built once,
  // so a step tests one bit instead of recomputing its group.
  uint32_t inner_starts = 0;
  if (a.group_shift < 3 && (1 << a.group_shift) < KB) {
    for (int kk = 1 << a.group_shift; kk < KB; kk += 1 << a.group_shift) inner_starts |= 1u << kk;
  }
  // This lane's code word of warp n-tile wq in strip sl, step kk: [strip][step][lane] x V uint4.
  const uint32_t w_lane = uint32_t(lane * V * 16 + (BITS == 4 ? 4 * wq : 8 * wq));
  const uint32_t sc_lane = uint32_t(g * 16 + 4 * wq);  // scale / zero word of this lane's 2 columns
  // MS: this lane's ldmatrix row in a 64-k x sub-tile for the 32-byte k column j of a step: token
  // (lane / 16) * 8 + lane % 8 of each 16-token block, 16-byte chunk 2j + (lane / 8) % 2, swizzled
  // as the copies placed it (chunk ^ token % 8). Matrices 0 / 1: tokens 0-7, k lo / hi (the first
  // n8 block's b0 / b1); 2 / 3: tokens 8-15.
  static_assert(!MS || NTOK % 16 == 0, "16-token ldmatrix blocks");
  uint32_t ms_off[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int ri = lane & 7, tok = ((lane >> 4) << 3) + ri;
    ms_off[j] = uint32_t(tok * 128 + (((2 * j + ((lane >> 3) & 1)) ^ ri) << 4));
  }
  // This lane's code words of step kk for each of the warp's strips (4-bit: one word, 8-bit: two).
  // They are loaded a step ahead (step 0's by the caller, before it issues the stage's copies):
  // shared loads are ordered after the wgmma wait of the step before, so loaded in their own step
  // their latency would sit between that wait and the widening, with the tensor pipe idle.
  constexpr int NW = BITS == 4 ? 1 : 2;
  using StepWords = uint32_t[SPW][NW];
  auto step_words = [&](int buf, int kk, StepWords& w) {
    const uint32_t sw = w_at(buf) + w_lane;
#pragma unroll
    for (int s = 0; s < SPW; ++s) {
      // This warp's n-tile wq of the step: word wq (4-bit) or words 2wq, 2wq+1 (8-bit) of the lane.
      const uint32_t at = sw + uint32_t(((wg * SPW + s) * KB + kk) * 32 * V * 16);
      if constexpr (BITS == 4) {
        w[s][0] = lds32_at(at);
      } else {
        const uint2 q = lds64_at(at);
        w[s][0] = q.x;
        w[s][1] = q.y;
      }
    }
  };
  auto compute_unit = [&](const Cursor& cu, int buf, StepWords& wn) {
    const int step0 = cu.st * KB;
    const int gfirst = step0 >> a.group_shift;
    // The steps that reload group constants: the first where its group is not the one held (a new
    // tile, or a group that starts on this stage), and the inner group starts before K's end
    // (steps past K multiply zero-filled x and keep the last group: scales were staged up to it).
    const int valid_steps = k_steps - step0;
    uint32_t reload = valid_steps >= KB ? inner_starts : inner_starts & ((1u << valid_steps) - 1u);
    if (gfirst != gc_group) reload |= 1u;
    // x's descriptor: step kk reads 64-k sub-tile kk / 4 at 32-byte column kk % 4 (the address
    // field counts 16 bytes and stays below 2^14 for any shared address).
    const uint64_t desc = wgmma_desc_sw128(x_at(buf));
    const uint32_t ss = w_at(buf) + uint32_t(Cfg::W_BYTES) + sc_lane;
    static_for<KB>([&](auto kc) {
      constexpr int kk = decltype(kc)::value;
      if (reload & (1u << kk)) {
        const int grp = (step0 + kk) >> a.group_shift;
        gc_group = grp;
        const int slot = grp - gfirst;
#pragma unroll
        for (int s = 0; s < SPW; ++s) {
          const uint32_t off = uint32_t((((wg * SPW + s) * GSLOTS + slot) * 8) * 16);
          const uint32_t sw32 = lds32_at(ss + off);
          const uint32_t zw32 = has_zeros ? lds32_at(ss + uint32_t(Cfg::S_BYTES) + off) : 0u;
          gc[s].load(make_uint4(sw32, 0, 0, 0), make_uint4(zw32, 0, 0, 0), has_zeros, a.zero_point);
        }
      }
#pragma unroll
      for (int s = 0; s < SPW; ++s) {
        uint32_t words[WPL];
#pragma unroll
        for (int i = 0; i < WPL; ++i) words[i] = i < NW ? wn[s][i] : 0u;
        uint32_t pr[4];
        if constexpr (probe::on(probe::kNoWiden)) {
          for (int i = 0; i < 4; ++i) pr[i] = words[0] ^ uint32_t(i);
        } else {
          Dequant<T, BITS>::template tile<!FOLD>(words, 0, gc[s], pr);  // FOLD: the scale comes at the fold
        }
        // A rows = 16 columns of W: a0 (col g, k lo), a1 (col g+8, k lo), a2 (col g, k hi), a3 (col g+8, k hi).
        af[kk & 1][s][0] = pr[0];
        af[kk & 1][s][1] = pr[2];
        af[kk & 1][s][2] = pr[1];
        af[kk & 1][s][3] = pr[3];
      }
      if constexpr (kk + 1 < KB) step_words(buf, kk + 1, wn);  // wn is widened: the next step's words
      if constexpr (MS) {
        // mma.sync: the widened A fragment is the m16n8k16 A of the warp's 16 columns; B (16 tokens
        // x k16 a ldmatrix.x4) from the swizzled x tile; the accumulators keep wgmma's layout.
        const uint32_t xb = x_at(buf) + uint32_t((kk >> 2) * Cfg::X_SUB_BYTES) + ms_off[kk & 3];
#pragma unroll
        for (int tb = 0; tb < NTOK / 16; ++tb) {
          uint32_t bq[4];
          ldmatrix_x4_at(bq, xb + uint32_t(tb * 16 * 128));
          const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
#pragma unroll
          for (int s = 0; s < SPW; ++s) {
            float* d = FOLD ? part[s] : acc[s];
            mma_16816<T>(*reinterpret_cast<float(*)[4]>(d + tb * 8), af[kk & 1][s], b0);
            mma_16816<T>(*reinterpret_cast<float(*)[4]>(d + tb * 8 + 4), af[kk & 1][s], b1);
          }
        }
      } else {
        const uint64_t x_desc = desc + uint64_t((kk >> 2) * (Cfg::X_SUB_BYTES >> 4) + 2 * (kk & 3));
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < SPW; ++s) {
          if constexpr (probe::on(probe::kSharedA) && NTOK == 64) {
            // timing probe: A as a stale 64 x 16 tile at the start of stage buffer 0
            const uint64_t a_desc = wgmma_desc_sw128(x_at(0)) + uint64_t(2 * (kk & 3));
            wgmma_ss_probe<NTOK>(acc[s], a_desc, x_desc);
          } else {
            wgmma_rs<T, NTOK>(acc[s], af[kk & 1][s], x_desc);
          }
        }
        wgmma_commit();
        if constexpr (probe::on(probe::kStageWait)) {
          if constexpr (kk + 1 == KB) wgmma_wait<0>();
        } else {
          wgmma_wait<1>();
        }
#pragma unroll
        for (int s = 0; s < SPW; ++s) pin_regs(af[(kk - 1) & 1][s]);
      }
    });
    if constexpr (FOLD) {
      // The stage's group constants are still the ones in gc (a group spans whole stages):
      // acc[s][4i + 2h + e] (column g + 8h of the warp's n-tile) += scale(column) x part.
#pragma unroll
      for (int s = 0; s < SPW; ++s) {
        const float s0 = gc[s].scale(0), s1 = gc[s].scale(1);
#pragma unroll
        for (int r = 0; r < NACC; ++r) {
          acc[s][r] = fmaf((r & 2) ? s1 : s0, part[s][r], acc[s][r]);
          part[s][r] = 0.f;
        }
      }
    }
  };

  // The end of a tile segment: its sums to y or the split-K accumulator (tile_out, gemm_wgmma_out.cuh).
  auto flush = [&](int tile, int seg_first, int seg_end) {
    if constexpr (!MS) {
      wgmma_wait<0>();
#pragma unroll
      for (int s = 0; s < SPW; ++s) {
        pin_regs(af[(KB - 1) & 1][s]);
        pin_acc(acc[s]);
      }
    }
    const int tile_first = tile * nst;
    const bool whole = seg_first == tile_first && seg_end == tile_first + nst;
    QS_GTRACE_LOOP();
    SlotPlan sp;
    sp.on = false;
    if constexpr (!SUMS && NTOK >= kSlotMinTok) {
      if (!whole) sp = slot_plan(a, tile, nst, total, blocks, b, Cfg::BN * NTOK);
    }
    // The block's last segment: its pipeline is idle (every copy landed and was read), so a whole
    // tile may stage its y rows in the stage buffers.
    tile_out<T, NTOK, SPW, NTH, SUMS>(a, bias, y, acc, tile * STRIPS, whole, seg_end - seg_first, nst, s_last,
                                      seg_end == u1 ? smem : nullptr, sp);
#pragma unroll
    for (int s = 0; s < SPW; ++s)
#pragma unroll
      for (int r = 0; r < NACC; ++r) acc[s][r] = 0.f;
  };

  // The pipeline: stages - 2 stages in flight ahead of the one computed. At the top of stage u the
  // barrier also guarantees that every warp has retired stage u - 2's wgmmas (wait_group 1 after
  // each step), so stage u + stages - 2 may be copied into that buffer. The loop runs one tile's
  // segment at a time and flushes after it, outside the per-stage loop.
  // (MS: a warp's shared reads of a stage are done by the next barrier, so stages - 1 could be in
  // flight; measured 2% slower at 16 tokens than stages - 2, v35.)
  constexpr int ahead = stages - 2;
  // Prologue: the first stages' weights are copied before griddepcontrol.wait (they overlap the
  // tail of the kernel before this one); x, the accumulators and y belong to earlier kernels until
  // the wait. Group i then holds stage i's x (and group 0 every prologue stage's weights).
  const Cursor first = {int(u0 / nst), int(u0 % nst)};
  Cursor loader = first, comp = first;
  for (int i = 0; i < ahead; ++i) {
    if (u0 + i < u1) {
      load_weights(loader, i);
      advance(loader);
    }
  }
  pdl_launch_dependents();
  pdl_wait();
  QS_GTRACE_WAIT();
  loader = first;
  for (int i = 0; i < ahead; ++i) {
    if (u0 + i < u1) {
      load_x(loader, i);
      advance(loader);
    }
    cp_async_commit();
  }
  int buf = 0, load_buf = ahead;
  for (int u = u0; u < u1;) {
    const int tile = comp.tile;
    const int seg_first = u, seg_end = min(u1, (tile + 1) * nst);
    gc_group = -1;  // a new tile: new strips, new scales
    for (; u < seg_end; ++u) {
      cp_async_wait(ahead - 1);  // stage u has landed (this thread's copies)
      if constexpr (!MS) fence_proxy_async_smem();  // ... and is visible to wgmma's operand reads
      // every thread's copies; stage u - 2's wgmmas all retired
      if constexpr (!probe::on(probe::kNoBarrier)) __syncthreads();
      StepWords wn;
      step_words(buf, 0, wn);  // before the copies: its latency hides behind their issue
      if (!probe::on(probe::kNoCopies) && u + ahead < u1) {
        load_unit(loader, load_buf);
        advance(loader);
      }
      cp_async_commit();
      compute_unit(comp, buf, wn);
      advance(comp);
      buf = buf + 1 == stages ? 0 : buf + 1;
      load_buf = load_buf + 1 == stages ? 0 : load_buf + 1;
    }
    flush(tile, seg_first, seg_end);
  }
  cp_async_wait(0);
  QS_GTRACE_EXIT();
#endif
}

}  // namespace qs
