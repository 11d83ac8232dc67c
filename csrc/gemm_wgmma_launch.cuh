// How the Hopper wgmma GEMM (gemm_wgmma.cuh) is chosen and launched: whether the loaded binary has
// it, the process-wide options, the tile shape per call, the launch (PDL), and calls above 128 tokens
// as 128-token slices.
#pragma once

#include "gemm_wgmma.cuh"

namespace qs {

// Per device: 1 when the loaded binary has the sm_90a wgmma code (set by qs_wgmma_probe).
inline int (&wgmma_ready())[kMaxDevices] {
  static int ready[kMaxDevices];
  return ready;
}

// Process-wide GEMM options (set through qs_gemm_set_options before capture).
struct GemmOptions {
  int wgmma = 1;  // Hopper: 16..kWgmmaSlicedMaxM tokens take the wgmma kernel (0: the mma.sync GEMM)
  int pdl = 1;    // wgmma kernel: programmatic dependent launch (weights prefetched before the wait)
};
inline GemmOptions& gemm_options() {
  static GemmOptions o;
  return o;
}

template <typename T, int BITS, int NTOK, int SPW>
cudaError_t launch_gemm_wgmma(const QsMatmulArgs& a, cudaStream_t stream) {
  using Cfg = WgCfg<T, BITS, NTOK, SPW>;
  static int occ_slot[kMaxDevices];
  static int stage_slot[kMaxDevices];
  auto kernel = gemm_wgmma_kernel<T, BITS, NTOK, SPW>;
  PipelineShape ps;
  cudaError_t err = pipeline_shape(kernel, Cfg::kThreads, Cfg::kStages, Cfg::smem_bytes, stage_slot, occ_slot, &ps);
  if (err != cudaSuccess) return err;
  const long long n_strips = (a.n + 63) / 64, k_steps = (a.k + 15) / 16;
  const long long total = ((n_strips + Cfg::STRIPS - 1) / Cfg::STRIPS) * ((k_steps + Cfg::KB - 1) / Cfg::KB);
  long long blocks = (long long)ps.dev.sms * ps.occ;
  blocks = blocks < total ? blocks : total;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(blocks));
  cfg.blockDim = dim3(Cfg::kThreads);
  cfg.dynamicSmemBytes = ps.smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = gemm_options().pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, a, ps.stages);
}

// Calls of 129 to this many tokens run the wgmma kernel over 128-token slices. H100,
// decode-step linears: M=256 14.65 ms vs 16.96 with the mma.sync GEMM, M=512 29.73 vs 31.46; larger
// calls (prefill chunks) keep the mma.sync GEMM until measured.
constexpr int kWgmmaSlicedMaxM = 512;

// Whether this call can take the wgmma kernel: option on, sm_90a code loaded on this device,
// m <= kWgmmaSlicedMaxM, and strip accumulators sized for n.
inline bool wgmma_usable(const QsMatmulArgs& a) {
  if (!gemm_options().wgmma || a.m > kWgmmaSlicedMaxM || a.accum == nullptr || a.accum_counters == nullptr)
    return false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return false;
  const long long n_strips = (a.n + 63) / 64;
  return wgmma_ready()[device] == 1 && a.accum_floats >= n_strips * kAccumPerStrip &&
         a.num_accum_counters >= n_strips;
}

// Tile shape of a call of up to 128 tokens.
template <typename T, int BITS>
cudaError_t gemm_wgmma_slice(const QsMatmulArgs& a, cudaStream_t s) {
  // 4 strips per block in both: one strip per warpgroup (128 columns) measured 1.5% faster at M=64
  // and 5% slower at M=128 on H200.
  // Narrow layers (o, down of a 7B: 16 tiles of 256 columns) split each tile over ~16 blocks; from
  // 33 tokens 128-column tiles (half the partial, and the reds, per block) are faster. H100, decode
  // step with n <= 8192 narrow: M=64 4.268 vs 4.629 ms, M=128 7.112 vs 7.624; but M=16 3.048 vs
  // 2.871, M=32 3.208 vs 3.079, so up to 32 tokens the tiles stay 256 columns wide.
  if (a.n <= 8192 && a.m > 32) {
    if (a.m <= 64) return launch_gemm_wgmma<T, BITS, 64, 1>(a, s);
    return launch_gemm_wgmma<T, BITS, 128, 1>(a, s);
  }
  if (a.m <= 64) return launch_gemm_wgmma<T, BITS, 64, 2>(a, s);
  return launch_gemm_wgmma<T, BITS, 128, 2>(a, s);
}

// A call the wgmma kernel takes (wgmma_usable): 128-token slices of x and y, one launch each; the
// launches share the strip accumulators, which each one's drains leave zeroed for the next.
template <typename T, int BITS>
cudaError_t gemm_wgmma_by_m(const QsMatmulArgs& a, cudaStream_t s) {
  QsMatmulArgs c = a;
  for (int m0 = 0; m0 < a.m; m0 += 128) {
    c.m = a.m - m0 < 128 ? a.m - m0 : 128;
    c.x = static_cast<const T*>(a.x) + (long long)m0 * a.k;
    c.y = static_cast<T*>(a.y) + (long long)m0 * a.n;
    const cudaError_t err = gemm_wgmma_slice<T, BITS>(c, s);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace qs
