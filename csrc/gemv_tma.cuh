// Hopper GEMV for up to 8 tokens: the weights stream into shared memory through the copy engine.
// Why: a decode step is ~130 GEMV launches of 3-70 MB each, and every launch pays a fixed cost
// (launch, first-load latency, the split-K fix-up at the end) during which HBM idles. With the codes
// in registers (gemv.cuh) a launch fills the SM's register file, so the next launch's blocks cannot
// start until this one's leave. Here each warp copies its chunks into a small shared-memory ring
// with 1-D bulk copies (cp.async.bulk + mbarrier: no registers held for data in flight) and issues
// the first STAGES chunks before griddepcontrol.wait. One 8-warp block per SM leaves room for the
// next launches' blocks (programmatic dependent launch), which start copying their own weights
// while this launch computes and runs its fix-up: the weight stream continues across launches.
//
// Same layout, stream-K split and fix-up as the register GEMV (gemv.cuh): warp w of W takes units
// [T*w/W, T*(w+1)/W) of the strip-major (strip, U-step chunk) space; a chunk's codes are one
// contiguous 4 KB run, its scales (zeros) one 128-byte row per group met.
#pragma once

#include "gemv.cuh"

namespace qs {

#ifndef QS_TMA_GEMV_WARPS
#define QS_TMA_GEMV_WARPS 8
#endif
constexpr int kTmaGemvWarps = QS_TMA_GEMV_WARPS;
constexpr int kTmaGemvThreads = 32 * kTmaGemvWarps;
constexpr int kTmaChunkBytes = 4096;  // U steps of one strip: 8 x 512 B (4-bit) or 4 x 1 KB (8-bit)

// Dynamic shared memory of one block: per warp and stage a chunk of codes, SPC scale rows, SPC
// zero rows, and an 8-byte mbarrier.
template <int STAGES, int SPC>
constexpr int tma_gemv_smem() {
  return kTmaGemvWarps * STAGES * (kTmaChunkBytes + 2 * SPC * 128 + 8);
}

template <typename T, int BITS, int SPC, bool PERM, int STAGES>
__global__ void __launch_bounds__(kTmaGemvThreads) gemv_tma_kernel(const QsMatmulArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  pdl_launch_dependents();
  constexpr int U = gemv_steps<BITS, 1>();
  constexpr int V = Dequant<T, BITS>::kWordsPerLane / 4;
  constexpr int SSTEP = U / SPC;
  constexpr int kStepBytes = 32 * V * 16;
  static_assert(U * kStepBytes == kTmaChunkBytes, "a chunk is 4 KB");
  constexpr int kConst = SPC * 128;  // one stage's scale rows; its zero rows follow
  extern __shared__ __align__(128) unsigned char smem[];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  unsigned char* codes = smem + warp * STAGES * kTmaChunkBytes;
  unsigned char* consts = smem + kTmaGemvWarps * STAGES * kTmaChunkBytes + warp * STAGES * 2 * kConst;
  uint64_t* bars =
      reinterpret_cast<uint64_t*>(smem + kTmaGemvWarps * STAGES * (kTmaChunkBytes + 2 * kConst)) + warp * STAGES;

  const int n_strips = (a.n + 63) >> 6;
  const int k_steps = (a.k + 15) >> 4;
  const int cps = (k_steps + U - 1) / U;  // chunks per strip
  const long long total = (long long)n_strips * cps;
  const int warps = gridDim.x * kTmaGemvWarps;
  const int w = blockIdx.x * kTmaGemvWarps + warp;
  const long long u_begin_w = unit_begin(total, w, warps);
  const long long u_end = unit_begin(total, w + 1, warps);
  const bool has_z = a.zeros != nullptr;
  const char* qb = reinterpret_cast<const char*>(a.qweight);
  const char* sb = reinterpret_cast<const char*>(a.scales);
  const char* zb = reinterpret_cast<const char*>(a.zeros);

  if (lane == 0)
    for (int st = 0; st < STAGES; ++st) mbar_init(&bars[st], 1);
  __syncwarp();

  // Lane 0 copies unit u into stage st: the chunk's codes up to k (steps past k keep stale codes,
  // which meet zero x) and its groups' scale (zero) rows, all counted on the stage's mbarrier.
  auto issue = [&](long long u, int st) {
    if (lane == 0) {
      const int strip = int(u / cps);
      const int step0 = int(u - (long long)strip * cps) * U;
      const uint32_t cbytes = uint32_t(min(U, k_steps - step0) * kStepBytes);
      mbar_arrive_expect_tx(&bars[st], cbytes + (has_z ? 2 : 1) * kConst);
      bulk_copy_g2s(codes + st * kTmaChunkBytes, qb + ((long long)strip * k_steps + step0) * kStepBytes, cbytes,
                    &bars[st]);
#pragma unroll
      for (int r = 0; r < SPC; ++r) {
        const long long row = group_row(min((step0 + r * SSTEP) >> a.group_shift, a.groups - 1), n_strips, strip, 0);
        bulk_copy_g2s(consts + (st * 2 * SPC + r) * 128, sb + row * 16, 128, &bars[st]);
        if (has_z) bulk_copy_g2s(consts + (st * 2 * SPC + SPC + r) * 128, zb + row * 16, 128, &bars[st]);
      }
    }
  };

  // The first stages' copies do not depend on the previous kernel: issue them before waiting for it.
#pragma unroll
  for (int st = 0; st < STAGES; ++st)
    if (u_begin_w + st < u_end) issue(u_begin_w + st, st);
  pdl_wait();  // x, the accumulators and y belong to earlier kernels until here

  int st = 0;
  uint32_t phase = 0;
  long long next = u_begin_w;  // the unit whose chunk sits in stage st
  for (long long u = u_begin_w; u < u_end;) {
    const int strip = int(u / cps);
    const long long tile_first = (long long)strip * cps;
    const int c_begin = int(u - tile_first);
    const int c_end = int(min((long long)cps, u_end - tile_first));
    float acc[1][4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[0][j][c] = 0.f;

    for (int ch = c_begin; ch < c_end; ++ch, ++next) {
      uint32_t xb[U][1][2];
      load_x_chunk<T, U, 1, PERM>(a, ch * U, lane, xb);
      mbar_wait_parity(&bars[st], phase);
      uint4 wq[U][V];
      const uint4* cs = reinterpret_cast<const uint4*>(codes + st * kTmaChunkBytes);
#pragma unroll
      for (int i = 0; i < U; ++i)
#pragma unroll
        for (int v = 0; v < V; ++v) wq[i][v] = cs[(i * 32 + lane) * V + v];
      uint4 sraw[SPC], zraw[SPC];
      const uint4* ks = reinterpret_cast<const uint4*>(consts + st * 2 * kConst);
#pragma unroll
      for (int r = 0; r < SPC; ++r) {
        sraw[r] = ks[r * 8 + g];
        zraw[r] = has_z ? ks[(SPC + r) * 8 + g] : make_uint4(0, 0, 0, 0);
      }
      __syncwarp();  // every lane has read the stage: it can take the chunk STAGES units ahead
      if (next + STAGES < u_end) issue(next + STAGES, st);
      gemv_chunk<T, BITS, U, 1, SPC>(wq, xb, sraw, zraw, has_z, a.zero_point, acc);
      if (++st == STAGES) {
        st = 0;
        phase ^= 1u;
      }
    }

    flush_strip<T, 1>(a, acc, strip, c_begin, c_end, cps, lane);
    u = tile_first + c_end;
  }
#endif
}

template <typename T, int BITS, int SPC, bool PERM>
cudaError_t launch_gemv_tma(const QsMatmulArgs& a, cudaStream_t stream) {
  constexpr int kStages = QS_TMA_GEMV_STAGES;
  static int occ_slot[kMaxDevices];
  auto kernel = gemv_tma_kernel<T, BITS, SPC, PERM, kStages>;
  constexpr int smem = tma_gemv_smem<kStages, SPC>();
  DeviceInfo dev;
  int device = 0, occ = 0;
  cudaError_t err = device_info(&dev, &device);
  if (err != cudaSuccess) return err;
  if (occ_slot[device] == 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               int(cudaSharedmemCarveoutMaxShared));
    if (err != cudaSuccess) return err;
  }
  err = resident_blocks(kernel, kTmaGemvThreads, smem, device, occ_slot, &occ);
  if (err != cudaSuccess) return err;
  const long long n_strips = (a.n + 63) / 64;
  if (a.accum == nullptr || a.accum_floats < n_strips * kAccumPerStrip || a.accum_counters == nullptr ||
      a.num_accum_counters < n_strips)
    return cudaErrorInvalidValue;
  constexpr int U = gemv_steps<BITS, 1>();
  const long long total = n_strips * (((a.k + 15) / 16 + U - 1) / U);
  const int per_sm = gemv_options().tma_blocks_per_sm < occ ? gemv_options().tma_blocks_per_sm : occ;
  long long blocks = (long long)dev.sms * per_sm;
  const long long warps_needed = (total + kTmaGemvWarps - 1) / kTmaGemvWarps;
  blocks = blocks < warps_needed ? blocks : warps_needed;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(blocks));
  cfg.blockDim = dim3(kTmaGemvThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = gemv_options().pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, a);
}

template <typename T, int BITS, bool PERM>
cudaError_t gemv_tma_spc(const QsMatmulArgs& a, cudaStream_t s) {
  constexpr int U = gemv_steps<BITS, 1>();
  int spc = U;
  for (int i = 0; i < a.group_shift && spc > 1; ++i) spc >>= 1;
  switch (spc) {
    case 1: return launch_gemv_tma<T, BITS, 1, PERM>(a, s);
    case 2: return launch_gemv_tma<T, BITS, 2, PERM>(a, s);
    case 4: return launch_gemv_tma<T, BITS, 4, PERM>(a, s);
    default:
      if constexpr (U >= 8) return launch_gemv_tma<T, BITS, 8, PERM>(a, s);
      return cudaErrorInvalidValue;
  }
}

// Up to 8 tokens on sm_90+ when the option is on (the default); the register GEMV otherwise.
template <typename T>
bool gemv_tma_takes(const QsMatmulArgs& a) {
  if (a.m > 8 || !gemv_options().tma || (a.bits != 4 && a.bits != 8)) return false;
  DeviceInfo dev;
  int device = 0;
  return device_info(&dev, &device) == cudaSuccess && dev.cc_major >= 9;
}

template <typename T>
cudaError_t gemv_tma_dtype(const QsMatmulArgs& a, cudaStream_t s) {
  if (a.bits == 4) return a.perm != nullptr ? gemv_tma_spc<T, 4, true>(a, s) : gemv_tma_spc<T, 4, false>(a, s);
  return a.perm != nullptr ? gemv_tma_spc<T, 8, true>(a, s) : gemv_tma_spc<T, 8, false>(a, s);
}

}  // namespace qs
