// Tensor-core GEMV for M <= 32 tokens (decode): the one kernel that has to run at HBM speed.
// Why this shape: swap A and B of the MMA so the dequantised weights fill the 16-row A operand
// (16 output columns) and the few tokens sit in the 8-wide n side: one m16n8k16 per 16x16 weight
// tile, fp32 accumulation, and no CUDA-core FMAs per weight. Each lane streams one 16-byte load per
// k16 step of a 64-column strip (8 steps in flight per chunk); a stream-K grid of exactly one
// resident wave balances the bytes over the SMs (qs_streamk.cuh).
#include "qs_dequant.cuh"
#include "qs_launch.cuh"
#include "qs_streamk.cuh"
#include "quantserve_cuda.h"

namespace qs {

constexpr int kGemvWarps = 4;
constexpr int kGemvThreads = 32 * kGemvWarps;
constexpr int kGemvAccumPerStrip = 32 * 64;  // fp32 accumulator of one 64-column strip, m <= 32

// Hand a warp's partial sums of one strip segment to y: written directly when the warp covered the
// whole strip, else added into the strip's fp32 accumulator; the warp that completes the strip
// writes y (+ bias) and zeroes the accumulator and counter for the next call.
// acc[mb][j][c] is column 16j + g + 8*(c >> 1), token mb*8 + 2t + (c & 1).
template <typename T, int MB>
__device__ __forceinline__ void flush_strip(const QsMatmulArgs& a, const float (&acc)[MB][4][4], int strip,
                                            int c_begin, int c_end, int cps, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const T* bias = reinterpret_cast<const T*>(a.bias);
  T* y = reinterpret_cast<T*>(a.y);
  if (c_begin == 0 && c_end == cps) {  // the whole strip is ours: write y directly
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int m = mb * 8 + 2 * t + (c & 1);
          const int n = strip * 64 + 16 * j + g + 8 * (c >> 1);
          if (m < a.m && n < a.n) {
            float o = acc[mb][j][c];
            if (bias != nullptr) o += Act<T>::to_float(bias[n]);
            y[(long long)m * a.n + n] = Act<T>::from_float(o);
          }
        }
  } else {
    float* sum = a.accum + (long long)strip * kGemvAccumPerStrip;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int m = mb * 8 + 2 * t + (c & 1);
          if (m < a.m) atomicAdd(sum + m * 64 + 16 * j + g + 8 * (c >> 1), acc[mb][j][c]);
        }
    __threadfence();
    __syncwarp();
    int last = 0;
    if (lane == 0) {
      const int mine = c_end - c_begin;
      last = atomicAdd(a.accum_counters + strip, mine) + mine == cps;
    }
    last = __shfl_sync(0xffffffffu, last, 0);
    if (last) {
      __threadfence();
      for (int idx = lane; idx < a.m * 64; idx += 32) {
        const int m = idx >> 6, n = strip * 64 + (idx & 63);
        float o = __ldcg(sum + idx);
        __stcg(sum + idx, 0.f);
        if (n < a.n) {
          if (bias != nullptr) o += Act<T>::to_float(bias[n]);
          y[(long long)m * a.n + n] = Act<T>::from_float(o);
        }
      }
      if (lane == 0) a.accum_counters[strip] = 0;
    }
  }
}

// Steps per chunk: 4 KB of codes per warp (2 KB when 32 tokens need the registers).
template <int BITS, int MB>
__host__ __device__ constexpr int gemv_steps() {
  return (BITS == 4 ? 8 : 4) / (MB > 2 ? 2 : 1);
}

// Variant 0 (default). MB: token blocks of 8 (m <= 8*MB). SPC: scale loads per chunk.
// Warp-level stream-K: warp w of W takes chunks [T*w/W, T*(w+1)/W) of the strip-major chunk
// space, accumulates while the strip stays the same, then adds its partial into the strip's
// fp32 accumulator (red.global.add, fire-and-forget) and bumps the strip's counter; the warp that
// completes a strip writes y (+ bias) and zeroes the accumulator and counter for the next call.
template <typename T, int BITS, int MB, int SPC>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(const QsMatmulArgs a) {
  constexpr int U = gemv_steps<BITS, MB>();
  constexpr int WPL = Dequant<T, BITS>::kWordsPerLane;  // 32-bit words per lane per step
  constexpr int V = WPL / 4;                            // 16-byte loads per lane per step
  constexpr int SSTEP = U / SPC;                        // steps sharing one scale load
  static_assert(SSTEP >= 1, "more scale loads than steps");

  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n_strips = (a.n + 63) >> 6;
  const int k_steps = (a.k + 15) >> 4;
  const int cps = (k_steps + U - 1) / U;  // chunks per strip
  const long long total = (long long)n_strips * cps;
  const int warps = gridDim.x * kGemvWarps;
  const int w = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  const long long u_end = unit_begin(total, w + 1, warps);
  const T* x = reinterpret_cast<const T*>(a.x);
  const uint4* qw = reinterpret_cast<const uint4*>(a.qweight);
  const uint4* sc = reinterpret_cast<const uint4*>(a.scales);
  const uint4* zs = reinterpret_cast<const uint4*>(a.zeros);

  for (long long u = unit_begin(total, w, warps); u < u_end;) {
    const int strip = int(u / cps);
    const long long tile_first = (long long)strip * cps;
    const int c_begin = int(u - tile_first);
    const int c_end = int(min((long long)cps, u_end - tile_first));
    float acc[MB][4][4];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mb][j][c] = 0.f;

    for (int ch = c_begin; ch < c_end; ++ch) {
      const int step0 = ch * U;
      uint4 wq[U][V];
      const uint4* wp = qw + (((long long)strip * k_steps + step0) * 32 + lane) * V;
#pragma unroll
      for (int i = 0; i < U; ++i)
#pragma unroll
        for (int v = 0; v < V; ++v)
          wq[i][v] = step0 + i < k_steps ? ldg128(wp + i * 32 * V + v) : make_uint4(0, 0, 0, 0);
      uint32_t xb[U][MB][2];
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
      uint4 sraw[SPC], zraw[SPC];
#pragma unroll
      for (int s = 0; s < SPC; ++s) {
        const int gi = min((step0 + s * SSTEP) >> a.group_shift, a.groups - 1);
        const long long off = ((long long)gi * n_strips + strip) * 8 + g;
        sraw[s] = __ldg(sc + off);
        zraw[s] = zs != nullptr ? __ldg(zs + off) : make_uint4(0, 0, 0, 0);
      }
      GroupConsts<T, BITS> gc;
#pragma unroll
      for (int i = 0; i < U; ++i) {
        if (i % SSTEP == 0) gc.load(sraw[i / SSTEP], zraw[i / SSTEP], zs != nullptr, a.zero_point);
        if (step0 + i < k_steps) {
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
            Dequant<T, BITS>::tile(words, j, gc, pr);
            // A = W^T tile (rows = 16 columns of W): a0 (col g, k lo), a1 (col g+8, k lo),
            // a2 (col g, k hi), a3 (col g+8, k hi).
            const uint32_t af[4] = {pr[0], pr[2], pr[1], pr[3]};
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) mma_16816<T>(acc[mb][j], af, xb[i][mb]);
          }
        }
      }
    }

    flush_strip<T, MB>(a, acc, strip, c_begin, c_end, cps, lane);
    u = tile_first + c_end;
  }
}


// Variant 1 (measured slower on H100, kept for the record and for other GPUs): as gemv_kernel,
// plus (1) the next chunk's codes, activations and scales are loaded
// while the current chunk is multiplied (two chunks in flight per warp), and (2) the scale is not
// applied per weight: codes become exact (q - z) 16-bit values, the MMAs accumulate one group's
// partial sum in fp32, and the group's scale multiplies that sum (2 FFMA per output instead of a
// packed multiply per pair of weights: ~30% fewer ALU ops per code, and no rounding of w).
// On the H100 it ran 14% slower than variant 0 at M = 1 (bench/NOTES.md): the second chunk in
// registers takes it to 168 registers, 3 blocks per SM instead of 4, and fewer warps in flight
// cost more than the overlap gains.
template <typename T, int BITS, int MB, int SPC>
__global__ void __launch_bounds__(kGemvThreads, (MB == 1 && SPC <= 2) ? 3 : 2)
    gemv_kernel_v3(const QsMatmulArgs a) {
  constexpr int U = gemv_steps<BITS, MB>();
  constexpr int WPL = Dequant<T, BITS>::kWordsPerLane;
  constexpr int V = WPL / 4;
  constexpr int SSTEP = U / SPC;
  static_assert(SSTEP >= 1, "more scale loads than steps");

  struct Chunk {
    uint4 wq[U][V];
    uint32_t xb[U][MB][2];
    uint4 sraw[SPC], zraw[SPC];
  };

  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n_strips = (a.n + 63) >> 6;
  const int k_steps = (a.k + 15) >> 4;
  const int cps = (k_steps + U - 1) / U;
  const long long total = (long long)n_strips * cps;
  const int warps = gridDim.x * kGemvWarps;
  const int w = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  const long long u_end = unit_begin(total, w + 1, warps);
  const T* x = reinterpret_cast<const T*>(a.x);
  const uint4* qw = reinterpret_cast<const uint4*>(a.qweight);
  const uint4* sc = reinterpret_cast<const uint4*>(a.scales);
  const uint4* zs = reinterpret_cast<const uint4*>(a.zeros);
  const bool has_z = zs != nullptr;

  auto load_x = [&](int ch, Chunk& c) {
    const int step0 = ch * U;
#pragma unroll
    for (int i = 0; i < U; ++i)
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        const int m = mb * 8 + g;
        const int k0 = (step0 + i) * 16 + 2 * t;
        const unsigned int* xr = reinterpret_cast<const unsigned int*>(x + (long long)m * a.k + k0);
        c.xb[i][mb][0] = (m < a.m && k0 < a.k) ? __ldg(xr) : 0u;
        c.xb[i][mb][1] = (m < a.m && k0 + 8 < a.k) ? __ldg(xr + 4) : 0u;
      }
  };
  // Codes and scales of chunk `ch` (and its activations when they are few enough to prefetch).
  auto load = [&](int strip, int ch, Chunk& c) {
    const int step0 = ch * U;
    const uint4* wp = qw + (((long long)strip * k_steps + step0) * 32 + lane) * V;
#pragma unroll
    for (int i = 0; i < U; ++i)
#pragma unroll
      for (int v = 0; v < V; ++v)
        c.wq[i][v] = step0 + i < k_steps ? ldg128(wp + i * 32 * V + v) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int s = 0; s < SPC; ++s) {
      const int gi = min((step0 + s * SSTEP) >> a.group_shift, a.groups - 1);
      const long long off = ((long long)gi * n_strips + strip) * 8 + g;
      c.sraw[s] = __ldg(sc + off);
      c.zraw[s] = has_z ? __ldg(zs + off) : make_uint4(0, 0, 0, 0);
    }
    if constexpr (MB == 1) load_x(ch, c);
  };

  for (long long u = unit_begin(total, w, warps); u < u_end;) {
    const int strip = int(u / cps);
    const long long tile_first = (long long)strip * cps;
    const int c_begin = int(u - tile_first);
    const int c_end = int(min((long long)cps, u_end - tile_first));
    float acc[MB][4][4];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mb][j][c] = 0.f;

    Chunk cur;
    load(strip, c_begin, cur);
    for (int ch = c_begin; ch < c_end; ++ch) {
      Chunk nxt;
      const bool more = ch + 1 < c_end;
      if (more) load(strip, ch + 1, nxt);
      if constexpr (MB > 1) load_x(ch, cur);
      const int step0 = ch * U;
      GroupConsts<T, BITS> gc;
      float part[MB][4][4];
#pragma unroll
      for (int i = 0; i < U; ++i) {
        if (i % SSTEP == 0) {
          gc.load(cur.sraw[i / SSTEP], cur.zraw[i / SSTEP], has_z, a.zero_point);
#pragma unroll
          for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
              for (int c = 0; c < 4; ++c) part[mb][j][c] = 0.f;
        }
        if (step0 + i < k_steps) {
          uint32_t words[WPL];
#pragma unroll
          for (int v = 0; v < V; ++v) {
            words[4 * v + 0] = cur.wq[i][v].x;
            words[4 * v + 1] = cur.wq[i][v].y;
            words[4 * v + 2] = cur.wq[i][v].z;
            words[4 * v + 3] = cur.wq[i][v].w;
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            uint32_t pr[4];
            Dequant<T, BITS>::tile_q(words, j, gc, pr);
            const uint32_t af[4] = {pr[0], pr[2], pr[1], pr[3]};
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) mma_16816<T>(part[mb][j], af, cur.xb[i][mb]);
          }
        }
        if (i % SSTEP == SSTEP - 1) {
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const float sv = scale_at<T>(cur.sraw[i / SSTEP], 2 * j + h);
#pragma unroll
              for (int mb = 0; mb < MB; ++mb) {
                acc[mb][j][2 * h] = fmaf(part[mb][j][2 * h], sv, acc[mb][j][2 * h]);
                acc[mb][j][2 * h + 1] = fmaf(part[mb][j][2 * h + 1], sv, acc[mb][j][2 * h + 1]);
              }
            }
        }
      }
      if (more) cur = nxt;
    }
    flush_strip<T, MB>(a, acc, strip, c_begin, c_end, cps, lane);
    u = tile_first + c_end;
  }
}

template <typename T, int BITS, int MB, int SPC>
cudaError_t launch_gemv(const QsMatmulArgs& a, cudaStream_t stream, long long* need_floats, int* need_counters) {
  static int occ_slot[kMaxDevices];
  static int occ_slot_v3[kMaxDevices];
  constexpr int U = gemv_steps<BITS, MB>();
  const bool v3 = a.variant == 1;
  auto kernel = v3 ? gemv_kernel_v3<T, BITS, MB, SPC> : gemv_kernel<T, BITS, MB, SPC>;
  DeviceInfo dev;
  int device = 0, occ = 0;
  cudaError_t err = device_info(&dev, &device);
  if (err != cudaSuccess) return err;
  err = resident_blocks(kernel, kGemvThreads, 0, device, v3 ? occ_slot_v3 : occ_slot, &occ);
  if (err != cudaSuccess) return err;
  long long blocks = (long long)dev.sms * occ;
  if (need_floats != nullptr) return cudaSuccess;
  const long long n_strips = (a.n + 63) / 64;
  if (a.accum == nullptr || a.accum_floats < n_strips * kGemvAccumPerStrip || a.accum_counters == nullptr ||
      a.num_accum_counters < n_strips)
    return cudaErrorInvalidValue;
  const long long total = n_strips * (((a.k + 15) / 16 + U - 1) / U);
  // With more tokens a warp's partial (m x 64 floats) grows: give each warp >= MB chunks (v3) so
  // the accumulator traffic stays below the code traffic.
  const long long per_warp = v3 ? MB : 1;
  const long long warps_needed = (total + per_warp * kGemvWarps - 1) / (per_warp * kGemvWarps);
  blocks = blocks < warps_needed ? blocks : warps_needed;
  kernel<<<int(blocks), kGemvThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int BITS, int MB>
cudaError_t gemv_spc(const QsMatmulArgs& a, cudaStream_t s, long long* nf, int* nc) {
  constexpr int U = gemv_steps<BITS, MB>();
  const int steps_per_group_log2 = a.group_shift;
  int spc = U;
  for (int i = 0; i < steps_per_group_log2 && spc > 1; ++i) spc >>= 1;
  switch (spc) {
    case 1: return launch_gemv<T, BITS, MB, 1>(a, s, nf, nc);
    case 2: return launch_gemv<T, BITS, MB, 2>(a, s, nf, nc);
    case 4:
      if constexpr (U >= 4) return launch_gemv<T, BITS, MB, 4>(a, s, nf, nc);
      return cudaErrorInvalidValue;
    default:
      if constexpr (U >= 8) return launch_gemv<T, BITS, MB, 8>(a, s, nf, nc);
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t gemv_dtype(const QsMatmulArgs& a, cudaStream_t s, long long* nf, int* nc) {
  if (a.bits == 4) {
    if (a.m <= 8) return gemv_spc<T, 4, 1>(a, s, nf, nc);
    if (a.m <= 16) return gemv_spc<T, 4, 2>(a, s, nf, nc);
    return gemv_spc<T, 4, 4>(a, s, nf, nc);
  }
  if (a.bits == 8) {
    if (a.m <= 8) return gemv_spc<T, 8, 1>(a, s, nf, nc);
    if (a.m <= 16) return gemv_spc<T, 8, 2>(a, s, nf, nc);
    return gemv_spc<T, 8, 4>(a, s, nf, nc);
  }
  return cudaErrorInvalidValue;
}

cudaError_t gemv_entry(const QsMatmulArgs& a, cudaStream_t s, long long* nf, int* nc) {
  if (a.m < 1 || a.m > 32 || a.k < 1 || a.n < 1 || a.groups < 1 || a.group_shift < 0 || a.group_shift > 31)
    return cudaErrorInvalidValue;
  if (a.dtype == QS_F16) return gemv_dtype<__half>(a, s, nf, nc);
  if (a.dtype == QS_BF16) return gemv_dtype<__nv_bfloat16>(a, s, nf, nc);
  return cudaErrorInvalidValue;
}

}  // namespace qs

extern "C" cudaError_t qs_gemv(const QsMatmulArgs* args, cudaStream_t stream) {
  return qs::gemv_entry(*args, stream, nullptr, nullptr);
}

extern "C" int qs_gemv_max_m(void) { return 32; }

extern "C" long long qs_gemv_accum_floats(int n) { return (long long)((n + 63) / 64) * qs::kGemvAccumPerStrip; }
