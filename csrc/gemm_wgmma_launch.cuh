// How the Hopper wgmma GEMM (gemm_wgmma.cuh) is chosen and launched: whether the loaded binary has
// it, the process-wide options, the tile shape per call, the launch (PDL), and calls above 256 tokens
// as 256-token slices.
#pragma once

#include "gemm_wgmma.cuh"
#include "sums_to_y.cuh"

namespace qs {

// Per device: 1 when the loaded binary has the sm_90a wgmma code (set by qs_wgmma_probe).
inline int (&wgmma_ready())[kMaxDevices] {
  static int ready[kMaxDevices];
  return ready;
}

// Whether the current device runs the wgmma kernel (its probe found the sm_90a code).
inline bool wgmma_ready_here() {
  int device = 0;
  return cudaGetDevice(&device) == cudaSuccess && device >= 0 && device < kMaxDevices && wgmma_ready()[device] == 1;
}

// Process-wide GEMM options (set through qs_gemm_set_options before capture).
struct GemmOptions {
  int wgmma = 1;  // Hopper: GEMM calls take the wgmma kernel (0: the mma.sync GEMM)
  int pdl = 1;    // wgmma kernel: programmatic dependent launch (weights prefetched before the wait)
  int y_sums = 1;  // calls writing y at 17-128 tokens, tiles split over kYSumsSplit+ blocks: sums, then sums_to_y
};
inline GemmOptions& gemm_options() {
  static GemmOptions o;
  return o;
}

// The grid of a call: one resident wave (`blocks`, at most the call's units), or, where fewer
// blocks would split every tile evenly, `tiles` x c blocks (c = blocks / tiles). Stream-K over a
// full wave gives each block a range that usually ends inside one tile and starts inside another,
// so most blocks flush two partial tiles and each tile's last arrival drains it after everyone has
// finished. With c blocks a tile, each block computes exactly 1/c of one tile: one flush, and with
// c = 1 whole tiles that write y with no reds and no drain. Taken where it costs at most 1/16 of
// the wave. H200, Llama-2-7B decode-step linears, this rule against plain stream-K (v28): -0.8 to
// -2.6% at 16-256 tokens; lm_head at 128 tokens (125 whole tiles on 132 SMs) 59.4 vs 76.2 us, at
// 64 (250 of 264 blocks) 46.4 vs 53.9; down at 256 (4 a tile, 128 of 132) 55.8 vs 59.0. Fewer
// blocks than that lose (a trial capping the grid at c blocks a tile): qkv at 64 tokens on 192 of
// 264 blocks 28.1 vs 24.2 us, gate_up at 128 tokens as 86 whole tiles on 132 SMs 56.7 vs 54.5.
inline long long aligned_blocks(long long blocks, long long tiles) {
  if (tiles >= blocks) return blocks;
  const long long even = tiles * (blocks / tiles);
  return even * 16 >= blocks * 15 ? even : blocks;
}

// Blocks a tile from which a call writing y goes through sums_to_y (launch_gemm_wgmma).
constexpr int kYSumsSplit = 4;

// One wgmma kernel's stages and resident blocks an SM on the current device (cached per device).
template <typename T, int BITS, int NTOK, int SPW, bool FOLD, bool SUMS>
cudaError_t wgmma_shape(PipelineShape* ps) {
  using Cfg = WgCfg<T, BITS, NTOK, SPW>;
  static int occ_slot[kMaxDevices];
  static int stage_slot[kMaxDevices];
  return pipeline_shape(gemm_wgmma_kernel<T, BITS, NTOK, SPW, FOLD, SUMS>, Cfg::kThreads, Cfg::kStages,
                        Cfg::smem_bytes, stage_slot, occ_slot, ps);
}

template <typename T, int BITS, int NTOK, int SPW, bool FOLD = false, bool SUMS = false>
cudaError_t launch_gemm_wgmma(const QsMatmulArgs& a, cudaStream_t stream) {
  using Cfg = WgCfg<T, BITS, NTOK, SPW>;
  auto kernel = gemm_wgmma_kernel<T, BITS, NTOK, SPW, FOLD, SUMS>;
  PipelineShape ps;
  cudaError_t err = wgmma_shape<T, BITS, NTOK, SPW, FOLD, SUMS>(&ps);
  if (err != cudaSuccess) return err;
  if (ps.stages != Cfg::kStages) return cudaErrorInvalidConfiguration;  // a device with less shared memory
  // Fewer group slots than steps (4-bit 256-token tiles): only layers whose groups fit them
  // (wgmma_slice_m sends the others to smaller tiles).
  if (groups_per_chunk<Cfg::KB>(a.group_shift) > Cfg::GSLOTS) return cudaErrorInvalidValue;
  const long long n_strips = (a.n + 63) / 64, k_steps = (a.k + 15) / 16;
  const long long tiles = (n_strips + Cfg::STRIPS - 1) / Cfg::STRIPS;
  const long long total = tiles * ((k_steps + Cfg::KB - 1) / Cfg::KB);
  // The kernel counts units in int, and addresses x and the scales by 32-bit byte offsets.
  if (total > 0x7fffffff || (long long)a.m * a.k * 2 > 0x7fffffff || (long long)a.groups * n_strips * 128 > 0x7fffffff)
    return cudaErrorInvalidValue;
  long long blocks = (long long)ps.dev.sms * ps.occ;
  blocks = blocks < total ? blocks : total;
  blocks = aligned_blocks(blocks, tiles);
  // A call writing y whose tiles are each split over kYSumsSplit blocks or more: the kernel leaving
  // its sums in the (zero) strip accumulators, as [n][NTOK], then sums_to_y (y_sums option; n a
  // multiple of 8, the sums kernel's condition). H200, Llama-2-7B layers, against the fix-up (v34):
  // o at 32 / 64 tokens (16 / 8 blocks a tile) -6.5%, down at 64 -5%, qkv at 32 (5.5) -3%; qkv and
  // gate_up at 64 (2.8 / 1.5) +8%, lm_head (about one) +16%, where each tile's fix-up is on its own
  // SM and sums_to_y only adds bytes. Not 16-token tiles: there o / down (16 a tile) gained
  // nothing and qkv (5.5) lost 7% that way; the decode-step linears at 16 tokens 1.866 / 1.861 ms
  // without against 1.912 / 1.915 with (v35, H200).
  if constexpr (!SUMS && NTOK >= 32 && NTOK <= QS_GEMM_SUMS_MAX_M) {
    if (gemm_options().y_sums && a.n % 8 == 0 && blocks >= kYSumsSplit * tiles &&
        a.accum_floats >= (long long)a.n * NTOK) {
      QsMatmulArgs c = a;
      c.sums = a.accum;  // a SUMS kernel's tile_out touches no accumulator but its sums
      c.bias = nullptr;
      c.y = nullptr;
      err = launch_gemm_wgmma<T, BITS, NTOK, SPW, FOLD, true>(c, stream);
      if (err != cudaSuccess) return err;
      return launch_sums_to_y<T>(a.accum, a.y, a.bias, a.m, a.n, NTOK, gemm_options().pdl, stream);
    }
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(blocks));
  cfg.blockDim = dim3(Cfg::kThreads);
  cfg.dynamicSmemBytes = ps.smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  set_pdl(cfg, attr, gemm_options().pdl);
  return cudaLaunchKernelEx(&cfg, kernel, a);
}

// Workspace floats the split-K slots (gemm_wgmma_slots.cuh) of the largest grid of one kernel take
// on the current device: two BN x NTOK slots a block; the larger of that and *floats in *floats.
// None for tiles that keep the reds (under kSlotMinTok tokens).
template <typename T, int BITS, int NTOK, int SPW, bool FOLD>
cudaError_t wgmma_slot_floats(long long* floats) {
  if constexpr (NTOK < kSlotMinTok) return cudaSuccess;
  using Cfg = WgCfg<T, BITS, NTOK, SPW>;
  PipelineShape ps;
  const cudaError_t err = wgmma_shape<T, BITS, NTOK, SPW, FOLD, false>(&ps);
  if (err != cudaSuccess) return err;
  const long long f = 2LL * ps.dev.sms * ps.occ * Cfg::BN * NTOK;
  if (f > *floats) *floats = f;
  return cudaSuccess;
}

// The same over every wgmma kernel a call can launch (both widths, every tile).
template <typename T, int BITS>
cudaError_t wgmma_slots_need_bits(long long* floats) {
  cudaError_t err;
  if ((err = wgmma_slot_floats<T, BITS, 16, 2, true>(floats)) != cudaSuccess) return err;
  if ((err = wgmma_slot_floats<T, BITS, 16, 2, false>(floats)) != cudaSuccess) return err;
  if ((err = wgmma_slot_floats<T, BITS, 32, 2, false>(floats)) != cudaSuccess) return err;
  if ((err = wgmma_slot_floats<T, BITS, 64, 1, false>(floats)) != cudaSuccess) return err;
  if ((err = wgmma_slot_floats<T, BITS, 128, 1, false>(floats)) != cudaSuccess) return err;
  if ((err = wgmma_slot_floats<T, BITS, 128, 2, false>(floats)) != cudaSuccess) return err;
  return wgmma_slot_floats<T, BITS, 256, 1, false>(floats);
}
template <typename T>
cudaError_t wgmma_slots_need(long long* floats) {
  const cudaError_t err = wgmma_slots_need_bits<T, 4>(floats);
  return err != cudaSuccess ? err : wgmma_slots_need_bits<T, 8>(floats);
}

// Whether this call can take the wgmma kernel: option on, sm_90a code loaded on this device, and
// strip accumulators sized for n. Any m: above 256 tokens it runs in 256-token slices (H100,
// decode-step linears, v7: M=512 23.06 ms vs 31.43 with the mma.sync GEMM).
inline bool wgmma_usable(const QsMatmulArgs& a) {
  if (!gemm_options().wgmma || a.accum == nullptr || a.accum_counters == nullptr) return false;
  const long long n_strips = (a.n + 63) / 64;
  return wgmma_ready_here() && a.accum_floats >= n_strips * kAccumPerStrip && a.num_accum_counters >= n_strips;
}

// Tile shape of a call of up to 256 tokens: the wgmma N is the call's token count rounded up to
// 16 / 32 / 64 / 128 / 256, so no tensor-core work and no zero-filled x rows are spent past the
// next size. H100, decode-step linears, one process (v7): M=16 2.353 ms with 16-token tiles vs
// 2.862 with 64; M=32 2.870 with 32-token tiles vs 3.170; M=256 11.41 with one 256-token tile
// (one strip per warpgroup, 195 registers) vs 14.70 as two 128-token slices, each of which widened
// every weight again.
// The tile's token count for a call of m <= 256 tokens (gemm_wgmma_slice's choice; the token slots a
// column of the sums that a call leaving them fills).
inline int wgmma_tile_tokens(int m) { return m <= 16 ? 16 : m <= 32 ? 32 : m <= 64 ? 64 : m <= 128 ? 128 : 256; }

// SUMS: the call leaves its sums (up to 128 tokens; the launcher of gemm_wgmma_by_m checks).
template <typename T, int BITS, bool SUMS = false>
cudaError_t gemm_wgmma_slice(const QsMatmulArgs& a, cudaStream_t s) {
  // Up to 16 tokens, layers whose groups span a 128-k stage or more (g128, per-channel) apply the
  // scale to fp32 partial sums once a stage instead of to every widened pair (FOLD). H200 (v21),
  // decode-step linears: M=16 1.932 / 1.939 ms vs 1.988 / 2.000; at 32 tokens it gained nothing
  // (2.600 / 2.606 vs 2.601 / 2.637: twice the fold per stage, and the 8-bit kernel spilled).
  if (a.m <= 16) {
    if (a.group_shift >= 3) return launch_gemm_wgmma<T, BITS, 16, 2, true, SUMS>(a, s);
    return launch_gemm_wgmma<T, BITS, 16, 2, false, SUMS>(a, s);
  }
  if (a.m <= 32) return launch_gemm_wgmma<T, BITS, 32, 2, false, SUMS>(a, s);
  // 33-64 tokens: one strip per warpgroup (128-column tiles), whose smaller stages leave room for
  // 128-k stages with two blocks per SM. H100, decode-step linears (v7e): M=40 3.327 ms vs 3.549
  // with 2 strips per warpgroup on the big layers and 64-k stages, M=64 3.868 vs 4.237; one strip
  // with 64-k stages gave 3.60-3.70 / 4.11.
  if (a.m <= 64) return launch_gemm_wgmma<T, BITS, 64, 1, false, SUMS>(a, s);
  if constexpr (SUMS) {
    if (a.m > 128) return cudaErrorInvalidValue;
  } else {
    if (a.m > 128) return launch_gemm_wgmma<T, BITS, 256, 1>(a, s);
  }
  // 65-128 tokens: 4 strips per block; one strip per warpgroup (128 columns) measured 5% slower at
  // M=128 on H200. Narrow layers (o, down of a 7B: 16 tiles of 256 columns) split each tile over
  // ~16 blocks; there 128-column tiles (half the partial, and the reds, per block) are faster.
  // H100, decode step with n <= 8192 narrow: M=128 7.112 vs 7.624 (v5e). Still so once the wide
  // tile staged 128 k (v22, H200): narrow layers on it too made M=128 5.14 ms vs 5.00.
  if (a.n <= 8192) return launch_gemm_wgmma<T, BITS, 128, 1, false, SUMS>(a, s);
  return launch_gemm_wgmma<T, BITS, 128, 2, false, SUMS>(a, s);
}

// Token rows per launch of the wgmma kernel: the largest tile, 256 tokens; 128 for layers whose
// groups a 256-token stage has no slots for (4-bit, 16-k groups).
template <typename T, int BITS>
int wgmma_slice_m(const QsMatmulArgs& a) {
  using Cfg = WgCfg<T, BITS, 256, 1>;
  return groups_per_chunk<Cfg::KB>(a.group_shift) > Cfg::GSLOTS ? 128 : 256;
}

// A call the wgmma kernel takes (wgmma_usable): slices of x and y (wgmma_slice_m), one launch each;
// the launches share the strip accumulators, which each one's drains leave zeroed for the next.
template <typename T, int BITS>
cudaError_t gemm_wgmma_by_m(const QsMatmulArgs& a, cudaStream_t s) {
  if (a.sums != nullptr) return gemm_wgmma_slice<T, BITS, true>(a, s);  // one launch: qs_gemm caps m
  QsMatmulArgs c = a;
  const int slice = wgmma_slice_m<T, BITS>(a);
  for (int m0 = 0; m0 < a.m; m0 += slice) {
    c.m = a.m - m0 < slice ? a.m - m0 : slice;
    c.x = static_cast<const T*>(a.x) + (long long)m0 * a.k;
    c.y = static_cast<T*>(a.y) + (long long)m0 * a.n;
    const cudaError_t err = gemm_wgmma_slice<T, BITS>(c, s);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace qs
