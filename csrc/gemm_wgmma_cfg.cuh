// The Hopper wgmma GEMM's tile configuration (gemm_wgmma.cuh runs it, gemm_wgmma_launch.cuh sizes
// and picks it): per dtype, code width, tile token count NTOK and strips per warpgroup SPW, the
// stage's k16 steps and byte layout, the blocks an SM and the pipeline's stage count.
#pragma once

#include "qs_dequant.cuh"
#include "qs_streamk.cuh"

namespace qs {

template <typename T, int BITS, int NTOK, int SPW>
struct WgCfg {
  // 16-token tiles multiply with mma.sync (two m16n8k16 a strip and step, B by ldmatrix.x4 from
  // the same swizzled x tile) instead of a register-A m64n16k16 wgmma: at n16 the wgmma takes
  // ~33 cycles an SM for 16K MACs (v32), no faster than mma.sync, and the synchronous MMA needs no
  // fence, commit or wait. H200, decode-step linears at 16 tokens (v35): 1.786 / 1.798 ms vs
  // 1.866 / 1.861; leaving sums 1.637 / 1.639 vs 1.667 / 1.670. At 32 / 64 tokens mma.sync was
  // 6% / 27% slower.
  static constexpr bool kMmaSync = NTOK == 16;
  static constexpr int kWarpgroups = 2;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int STRIPS = kWarpgroups * SPW;
  static constexpr int BN = 64 * STRIPS;
  // k16 steps per stage: 8 (128 k, x in two 64-k sub-tiles) wherever the stages still fit, since
  // the per-stage work (barrier, copies, addresses) is a large share of a stage's instructions;
  // 4 where the x tile is too large for that: 128-token tiles with two blocks an SM (one strip
  // per warpgroup) and 8-bit 256-token tiles. H100, decode-step linears: M=24 / 32 2.532-2.596 /
  // 2.694 ms vs 2.732 / 2.800 with 4 steps (v7d); M=40 / 64 3.327-3.347 / 3.868 vs 3.549 / 4.237
  // (v7e). H200 (v22): M=128 4.94 vs 5.13 with two strips a warpgroup, M=256 8.35 vs 8.53.
  static constexpr int KB = NTOK <= 64 || (NTOK == 128 && SPW == 2) || (NTOK == 256 && BITS == 4) ? 8 : 4;
  static constexpr int XSUB = KB / 4;  // 64-k sub-tiles of x per stage
  static constexpr int WPL = Dequant<T, BITS>::kWordsPerLane;
  static constexpr int V = WPL / 4;
  static constexpr int X_SUB_BYTES = NTOK * 128;  // [NTOK][64] 16-bit, a multiple of 1024
  static constexpr int X_BYTES = XSUB * X_SUB_BYTES;
  static constexpr int W_BYTES = STRIPS * KB * 32 * V * 16;
  // Group slots per stage and strip: KB (any group length), but KB / 2 for 256-token tiles, whose
  // 128-k stages fit three to an SM only so (the launcher gives them layers with groups of 32 k or
  // more).
  static constexpr int GSLOTS = NTOK == 256 && KB == 8 ? KB / 2 : KB;
  static constexpr int S_BYTES = STRIPS * GSLOTS * 8 * 16;
  static constexpr int REST_BYTES = W_BYTES + 2 * S_BYTES;
  static constexpr int NACC = NTOK / 2;  // fp32 accumulators per thread and strip
  static constexpr int X_CHUNKS = NTOK * 8 * XSUB;    // 16-byte chunks of x per stage
  static constexpr int W_CHUNKS = STRIPS * KB * 32 * V;  // 16-byte chunks of codes per stage
  static_assert((X_CHUNKS % kThreads == 0 || X_CHUNKS == 128) && W_CHUNKS % kThreads == 0,
                "whole cp.async rounds");
  static_assert(NTOK == 16 || NTOK == 32 || NTOK == 64 || NTOK == 128 || NTOK == 256, "a wgmma N (16: the mma.sync tile)");
  static_assert(BN * NTOK <= STRIPS * kAccumPerStrip, "a tile's partials fit its strips' accumulators");
  // Two blocks share an SM where their registers allow (4-bit, up to 128 accumulators per thread).
  static constexpr int kBlocksPerSm = NTOK * SPW <= 128 && BITS == 4 ? 2 : 1;
  // Stages (stages - 2 of them in flight): 3 of 128 k where two blocks share an SM at up to 64
  // tokens (2 x 97 KB at 32, 2 x 85 KB at 64 with one strip per warpgroup; 4 stages at 16 tokens
  // fill the SM to the byte and measured slower), 4 where one block has the SM (128 tokens, two
  // strips a warpgroup: 4 x 56 KB); 5 of 64 k at 128 tokens, one strip per warpgroup (2 x 111 KB),
  // 6 otherwise; fewer where a stage is larger (4-bit 256 tokens: 74 KB a stage, 3 fit; 8-bit:
  // 42 KB of 64 k, 5 fit).
  static constexpr int kStagesWanted = KB == 8 ? (kBlocksPerSm == 2 ? 3 : 4) : kBlocksPerSm == 2 ? 5 : 6;
  // The stage count is a compile-time constant of the kernel (cp.async.wait_group takes an
  // immediate, and the buffer addresses fold; v19 passed it at run time and branched to the wait):
  // as many as the sm_90 per-block opt-in (227 KB) holds. The launcher checks the device agrees.
  static constexpr int kSmemOptin = 227 * 1024;
  static constexpr int kStages = (1024 + kStagesWanted * (X_BYTES + REST_BYTES) <= kSmemOptin)
                                     ? kStagesWanted
                                     : (kSmemOptin - 1024) / (X_BYTES + REST_BYTES);
  static_assert(kStages >= 3, "at least one stage in flight");
  static int smem_bytes(int stages) { return 1024 + stages * (X_BYTES + REST_BYTES); }
};

}  // namespace qs
