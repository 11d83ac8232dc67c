// Tensor-core GEMV for M <= 32 tokens (decode): the one kernel that has to run at HBM speed.
// Why this shape: swap A and B of the MMA so the dequantised weights fill the 16-row A operand
// (16 output columns) and the few tokens sit in the 8-wide n side: one m16n8k16 per 16x16 weight
// tile, fp32 accumulation, and no CUDA-core FMAs per weight. The codes are widened raw (code plus the
// exponent magic's offset: one LOP3 per pair of weights and no packed op, no per-column constant)
// and each group's scale, zero and offset are applied once to its fp32 MMA sums, a "ones" MMA giving
// the sums of x they need (v8: 25% fewer instructions per chunk than scaling every pair; v24: the
// packed op per pair gone as well). Each lane streams one 16-byte load per
// k16 step of a 64-column strip (8 steps in flight per chunk); a warp-level stream-K grid of one
// resident wave balances the bytes over the SMs (qs_streamk.cuh), and on sm_90 a launch overlaps the
// previous kernel's tail (programmatic dependent launch: each warp pulls its first chunk of codes
// into L2 before the kernel waits for its inputs).
#pragma once

#include "gemv_chunk.cuh"
#include "qs_dequant.cuh"
#include "qs_launch.cuh"
#include "qs_streamk.cuh"
#include "quantserve_cuda.h"

namespace qs {

constexpr int kGemvWarps = 4;
constexpr int kGemvThreads = 32 * kGemvWarps;

// Launch options of the GEMV (process-wide; set through qs_gemv_set_options before capture).
struct GemvOptions {
  int pdl = 1;       // programmatic dependent launch on sm_90+: weights stream before the wait
  int wave_div = 1;  // grid = resident blocks / wave_div (2 leaves room for the next launch's blocks)
  int pipeline = 1;  // up to 16 tokens on sm_90+, where it fits: the next chunk in flight (gemv_pipe.cuh)
};
inline GemvOptions& gemv_options() {
  static GemvOptions o;
  return o;
}

// Steps per chunk: 4 KB of codes per warp (2 KB when 32 tokens need the registers).
template <int BITS, int MB>
__host__ __device__ constexpr int gemv_steps() {
  return (BITS == 4 ? 8 : 4) / (MB > 2 ? 2 : 1);
}

// The token and the output column of a lane's accumulator acc[mb][j][c] of a strip.
__device__ __forceinline__ int acc_token(int mb, int c, int lane) { return mb * 8 + 2 * (lane & 3) + (c & 1); }
__device__ __forceinline__ int acc_column(int strip, int j, int c, int lane) {
  return strip * 64 + 16 * j + (lane >> 2) + 8 * (c >> 1);
}

// Hand a warp's partial sums of one strip segment to y: written directly when the warp covered the
// whole strip, else added into the strip's fp32 accumulator; the warp that completes the strip
// writes y (+ bias) and zeroes the accumulator and counter for the next call. With a.sums (up to 16
// tokens, no bias) the warp only stores or adds its sums there: no fence, counter or read-back.
// acc[mb][j][c] is column 16j + g + 8*(c >> 1), token mb*8 + 2t + (c & 1) (acc_token, acc_column).
template <typename T, int MB>
__device__ __forceinline__ void flush_strip(const QsMatmulArgs& a, const float (&acc)[MB][4][4], int strip,
                                            int c_begin, int c_end, int cps, int lane) {
  const int g = lane >> 2, t = lane & 3;
  if constexpr (MB <= 2) {
    if (a.sums != nullptr) {  // the caller's kernel converts: leave the fp32 sums, no fix-up here
      const bool whole = c_begin == 0 && c_end == cps;
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int m = acc_token(mb, c, lane), n = acc_column(strip, j, c, lane);
            if (m < a.m && n < a.n) {
              float* p = a.sums + (long long)m * a.n + n;
              if (whole)
                *p = acc[mb][j][c];
              else
                atomicAdd(p, acc[mb][j][c]);  // result unused: a fire-and-forget RED
            }
          }
      return;
    }
  }
  const T* bias = reinterpret_cast<const T*>(a.bias);
  T* y = reinterpret_cast<T*>(a.y);
  if (c_begin == 0 && c_end == cps) {  // the whole strip is ours: write y directly
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int m = acc_token(mb, c, lane), n = acc_column(strip, j, c, lane);
          if (m < a.m && n < a.n) {
            float o = acc[mb][j][c];
            if (bias != nullptr) o += Act<T>::to_float(bias[n]);
            y[(long long)m * a.n + n] = Act<T>::from_float(o);
          }
        }
  } else {
    // The strip's accumulator: [64 columns][32 tokens] from 9 tokens on (a lane's pairs of tokens of
    // one column are adjacent; lanes swap pairs and add 4 tokens with one 16-byte red), [m][64] up
    // to 8 tokens (the 64 columns of a token in 2 lines: at M=1 the column-major layout spread them
    // over 64 lines and was 11% slower per decode step on H200).
    float* sum = a.accum + (long long)strip * kAccumPerStrip;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = 16 * j + g + 8 * h;
        if constexpr (MB >= 2) {
#pragma unroll
          for (int i = 0; i < MB / 2; ++i)
            red_token_quads(sum + c * 32, 16 * i, acc[2 * i][j][2 * h], acc[2 * i][j][2 * h + 1],
                            acc[2 * i + 1][j][2 * h], acc[2 * i + 1][j][2 * h + 1], t, a.m);
        } else {
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (2 * t + e < a.m) atomicAdd(sum + (2 * t + e) * 64 + c, acc[0][j][2 * h + e]);
        }
      }
    fence_acq_rel_gpu();
    __syncwarp();
    int last = 0;
    if (lane == 0) {
      const int mine = c_end - c_begin;
      last = atomicAdd(a.accum_counters + strip, mine) + mine == cps;
    }
    last = __shfl_sync(0xffffffffu, last, 0);
    if (last) {
      fence_acq_rel_gpu();
      if constexpr (MB >= 2) {
        // [64 columns][32 tokens]: items of 2 columns x 4 tokens, a warp's 32 items being 16
        // column pairs x the two token quads of one octet, so lanes 2i and 2i+1 read the two
        // halves of each column's 32-byte sector and a y store writes 64 contiguous bytes in each
        // of two rows (as the wgmma GEMM's drain, v9). Lanes along one column's tokens (before)
        // made every 2-byte y store its own sector. 4 items' loads in flight per lane.
        constexpr int kBatch = 4;
        const int items = 64 * ((a.m + 7) >> 3);
        for (int base = 0; base < items; base += 32 * kBatch) {
          float4 v0[kBatch], v1[kBatch];
          float b0[kBatch], b1[kBatch];
          int off[kBatch], col[kBatch], tq[kBatch];
#pragma unroll
          for (int r = 0; r < kBatch; ++r) {
            const int grp = base / 32 + r;  // items base + 32r + lane
            const int cp = (grp & 1) * 16 + (lane >> 1);
            tq[r] = base + 32 * r < items ? 2 * (grp >> 1) + (lane & 1) : -1;
            col[r] = strip * 64 + 2 * cp;
            off[r] = (2 * cp) * 32 + 4 * tq[r];
            const bool ok = tq[r] >= 0;
            v0[r] = ok ? ldcg4(sum + off[r]) : make_float4(0.f, 0.f, 0.f, 0.f);
            v1[r] = ok ? ldcg4(sum + off[r] + 32) : make_float4(0.f, 0.f, 0.f, 0.f);
            b0[r] = ok && bias != nullptr && col[r] < a.n ? Act<T>::to_float(bias[col[r]]) : 0.f;
            b1[r] = ok && bias != nullptr && col[r] < a.n ? Act<T>::to_float(bias[col[r] + 1]) : 0.f;
          }
#pragma unroll
          for (int r = 0; r < kBatch; ++r) {
            if (tq[r] < 0) continue;
            stcg4(sum + off[r], make_float4(0.f, 0.f, 0.f, 0.f));
            stcg4(sum + off[r] + 32, make_float4(0.f, 0.f, 0.f, 0.f));
            if (col[r] >= a.n) continue;
            const float r0[4] = {v0[r].x, v0[r].y, v0[r].z, v0[r].w}, r1[4] = {v1[r].x, v1[r].y, v1[r].z, v1[r].w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int m = 4 * tq[r] + e;
              if (m < a.m)
                *reinterpret_cast<uint32_t*>(y + (long long)m * a.n + col[r]) =
                    Act<T>::pack2(r0[e] + b0[r], r1[e] + b1[r]);
            }
          }
        }
      } else {
        // [m][64] up to 8 tokens: lanes along the columns of a token (coalesced as it is).
        // 8 loads in flight per lane: the sums come from L2, one round trip per batch, not per value.
        constexpr int kBatch = 8;
        const int items = a.m * 64;
        for (int base = 0; base < items; base += 32 * kBatch) {
          float v[kBatch];
          int off[kBatch], col[kBatch], tok[kBatch];
#pragma unroll
          for (int r = 0; r < kBatch; ++r) {
            const int idx = base + r * 32 + lane;
            const int c = idx & 63;
            const int tk = idx >> 6;
            tok[r] = idx < items ? tk : -1;
            col[r] = strip * 64 + c;
            off[r] = tk * 64 + c;
            v[r] = tok[r] >= 0 ? __ldcg(sum + off[r]) : 0.f;
          }
#pragma unroll
          for (int r = 0; r < kBatch; ++r) {
            if (tok[r] < 0) continue;
            __stcg(sum + off[r], 0.f);
            if (col[r] < a.n) {
              float o = v[r];
              if (bias != nullptr) o += Act<T>::to_float(bias[col[r]]);
              y[(long long)tok[r] * a.n + col[r]] = Act<T>::from_float(o);
            }
          }
        }
      }
      if (lane == 0) a.accum_counters[strip] = 0;
    }
  }
}

// MB: token blocks of 8 (m <= 8*MB). SPC: scale loads per chunk (groups met in a chunk).
// Warp-level stream-K: warp w of W takes chunks [T*w/W, T*(w+1)/W) of the strip-major chunk
// space, accumulates while the strip stays the same, then adds its partial into the strip's
// fp32 accumulator (red.global.add, fire-and-forget) and bumps the strip's counter; the warp that
// completes a strip writes y (+ bias) and zeroes the accumulator and counter for the next call.
// On sm_90 the launch overlaps the previous kernel's tail (programmatic dependent launch).
template <typename T, int BITS, int MB, int SPC>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(const QsMatmulArgs a) {
  pdl_launch_dependents();
  constexpr int U = gemv_steps<BITS, MB>();
  constexpr int V = Dequant<T, BITS>::kWordsPerLane / 4;  // 16-byte loads per lane per step

  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int n_strips = (a.n + 63) >> 6;
  const int k_steps = (a.k + 15) >> 4;
  const int cps = (k_steps + U - 1) / U;  // chunks per strip
  const long long total = (long long)n_strips * cps;
  const int warps = gridDim.x * kGemvWarps;
  const int w = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  const long long u_begin_w = unit_begin(total, w, warps);
  const long long u_end = unit_begin(total, w + 1, warps);
  const uint4* qw = reinterpret_cast<const uint4*>(a.qweight);
  const uint32_t opaque_zero = uint32_t(a.m) >> 31;  // m >= 1: always 0

  if (u_begin_w < u_end) {
    const int strip = int(u_begin_w / cps);
    prefetch_chunk_l2<U, V>(qw, strip, int(u_begin_w - (long long)strip * cps), k_steps, lane);
  }
  pdl_wait();  // x, the accumulators and y belong to earlier kernels until here

  for (long long u = u_begin_w; u < u_end;) {
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
      load_chunk_codes<U, V>(qw, strip, k_steps, step0, lane, wq);
      // The first step's codes and x depend on every load of the chunk (through a zero the compiler
      // cannot see), so ptxas issues them all before any MMA instead of interleaving them with the
      // steps to save registers, which would serialise their memory latencies.
      uint32_t gate = opaque_zero;
#pragma unroll
      for (int i = 1; i < U; ++i) gate &= wq[i][V - 1].x | wq[i][0].y;
      wq[0][0].x |= gate;
      uint32_t xb[U][MB][2];
      load_x_chunk<T, U, MB>(a, step0, lane, xb);
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) xb[0][mb][0] |= gate;
      uint4 sraw[SPC], zraw[SPC];
      load_group_rows<U, SPC>(a, n_strips, strip, step0, g, a.zeros != nullptr, sraw, zraw);
      gemv_chunk<T, BITS, U, MB, SPC>(wq, xb, sraw, zraw, a.zeros != nullptr, a.zero_point, acc);
    }

    flush_strip<T, MB>(a, acc, strip, c_begin, c_end, cps, lane);
    u = tile_first + c_end;
  }
}


// Launch a GEMV kernel (gemv_kernel here, gemv_pipe_kernel in gemv_pipe.cuh) of kGemvThreads
// threads over U-step chunks: one resident wave (divided by the wave_div option), no more warps
// than chunks; pdl_ok: whether this kernel may use programmatic dependent launch (sm_90+, option on).
template <typename Kernel>
cudaError_t launch_gemv_wave(Kernel kernel, int (&occ_slot)[kMaxDevices], int U, bool pdl_ok, const QsMatmulArgs& a,
                             cudaStream_t stream) {
  DeviceInfo dev;
  int device = 0, occ = 0;
  cudaError_t err = device_info(&dev, &device);
  if (err != cudaSuccess) return err;
  err = resident_blocks(kernel, kGemvThreads, 0, device, occ_slot, &occ);
  if (err != cudaSuccess) return err;
  const GemvOptions opt = gemv_options();
  const int per_sm = opt.wave_div > 1 && occ >= opt.wave_div ? occ / opt.wave_div : occ;
  long long blocks = (long long)dev.sms * per_sm;
  const long long n_strips = (a.n + 63) / 64;
  if (a.accum == nullptr || a.accum_floats < n_strips * kAccumPerStrip || a.accum_counters == nullptr ||
      a.num_accum_counters < n_strips)
    return cudaErrorInvalidValue;
  const long long total = n_strips * (((a.k + 15) / 16 + U - 1) / U);
  const long long warps_needed = (total + kGemvWarps - 1) / kGemvWarps;
  blocks = blocks < warps_needed ? blocks : warps_needed;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(blocks));
  cfg.blockDim = dim3(kGemvThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  set_pdl(cfg, attr, opt.pdl && pdl_ok && dev.cc_major >= 9);
  return cudaLaunchKernelEx(&cfg, kernel, a);
}

template <typename T, int BITS, int MB, int SPC>
cudaError_t launch_gemv(const QsMatmulArgs& a, cudaStream_t stream) {
  static int occ_slot[kMaxDevices];
  // PDL up to 16 tokens: measured 9 % (M=1) to 3 % (M=16) faster per decode step on H100, but 2 %
  // slower at M=32, where a warp's chunks are half the size and the prefetched share is small.
  return launch_gemv_wave(gemv_kernel<T, BITS, MB, SPC>, occ_slot, gemv_steps<BITS, MB>(), MB <= 2, a, stream);
}

template <typename T, int BITS, int MB>
cudaError_t gemv_spc(const QsMatmulArgs& a, cudaStream_t s) {
  constexpr int U = gemv_steps<BITS, MB>();
  switch (groups_per_chunk<U>(a.group_shift)) {
    case 1: return launch_gemv<T, BITS, MB, 1>(a, s);
    case 2: return launch_gemv<T, BITS, MB, 2>(a, s);
    case 4:
      if constexpr (U >= 4) return launch_gemv<T, BITS, MB, 4>(a, s);
      return cudaErrorInvalidValue;
    default:
      if constexpr (U >= 8) return launch_gemv<T, BITS, MB, 8>(a, s);
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t gemv_dtype(const QsMatmulArgs& a, cudaStream_t s) {
  if (a.bits == 4) {
    if (a.m <= 8) return gemv_spc<T, 4, 1>(a, s);
    if (a.m <= 16) return gemv_spc<T, 4, 2>(a, s);
    return gemv_spc<T, 4, 4>(a, s);
  }
  if (a.bits == 8) {
    if (a.m <= 8) return gemv_spc<T, 8, 1>(a, s);
    if (a.m <= 16) return gemv_spc<T, 8, 2>(a, s);
    return gemv_spc<T, 8, 4>(a, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qs
