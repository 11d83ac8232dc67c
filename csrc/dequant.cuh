// Repacked int4/int8 codes -> a plain 16-bit W^T in global memory, for prefill-sized calls.
// Why: from a few hundred tokens a call is compute-bound, and cuBLAS's fp16 wgmma GEMM runs at
// ~2.7x the FLOP rate of our fused GEMMs (H100, 1024 tokens: ~600 vs ~220 TFLOP/s). Widening the
// codes once per call into a scratch and handing that to cuBLAS costs a pass over the int4 bytes
// plus the 16-bit writes (DRAM-bound: ~5.5 ms per 7B step), far less than the FLOP gap. The backend
// runs a layer as column chunks that fit the scratch (quant/backends/cuda.py).
//
// Block = 8 warps over one 64-column strip and 8 k16 steps (a 64 x 128 tile): warp w widens step w
// into registers with the same Dequant fragments as the GEMV, scatters its pairs into a padded
// shared tile (conflict-free), and the block writes the tile out as 256-byte row runs.
#pragma once

#include "qs_dequant.cuh"
#include "quantserve_cuda.h"

namespace qs {

constexpr int kDqWarps = 8;                   // one k16 step per warp
constexpr int kDqSteps = kDqWarps;            // k16 steps per block
constexpr int kDqPitch = 16 * kDqSteps + 8;   // shared row pitch in elements: +16 bytes keeps banks apart

template <typename T, int BITS>
__global__ void __launch_bounds__(32 * kDqWarps) dequant_kernel(const QsDequantArgs a) {
  __shared__ __align__(16) T tile[64 * kDqPitch];
  constexpr int WPL = Dequant<T, BITS>::kWordsPerLane;
  constexpr int V = WPL / 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int strip = a.strip_begin + int(blockIdx.y);
  const int step = int(blockIdx.x) * kDqSteps + warp;
  if (step < a.k_steps) {
    const uint4* wp = reinterpret_cast<const uint4*>(a.qweight) +
                      (((long long)strip * a.k_steps + step) * 32 + lane) * V;
    uint32_t words[WPL];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const uint4 q = ldg128(wp + v);
      words[4 * v + 0] = q.x;
      words[4 * v + 1] = q.y;
      words[4 * v + 2] = q.z;
      words[4 * v + 3] = q.w;
    }
    const int gi = min(step >> a.group_shift, a.groups - 1);
    const long long off = ((long long)gi * a.n_strips + strip) * 8 + g;
    const uint4* zs = reinterpret_cast<const uint4*>(a.zeros);
    const uint4 s_raw = __ldg(reinterpret_cast<const uint4*>(a.scales) + off);
    const uint4 z_raw = zs != nullptr ? __ldg(zs + off) : make_uint4(0, 0, 0, 0);
    GroupConsts<T, BITS> gc;
    gc.load(s_raw, z_raw, zs != nullptr, a.zero_point);
    // Tile row = column of W; its k runs along the row.
    dequant_step_pairs(words, gc, lane, [&](int col, int hk, uint32_t v) {
      *reinterpret_cast<uint32_t*>(&tile[col * kDqPitch + 16 * warp + 2 * t + 8 * hk]) = v;
    });
  }
  __syncthreads();
  // 64 rows x 16 pieces of 16 bytes; pieces past the padded k are not ours to write.
  const int k0 = int(blockIdx.x) * kDqSteps * 16;
  const int kp = a.k_steps * 16;
  T* out = reinterpret_cast<T*>(a.w) + (long long)blockIdx.y * 64 * a.ldw;
  for (int i = threadIdx.x; i < 64 * 2 * kDqSteps; i += 32 * kDqWarps) {
    const int row = i / (2 * kDqSteps), kk = (i % (2 * kDqSteps)) * 8;
    if (k0 + kk < kp)
      *reinterpret_cast<uint4*>(out + (long long)row * a.ldw + k0 + kk) =
          *reinterpret_cast<const uint4*>(&tile[row * kDqPitch + kk]);
  }
}

template <typename T>
cudaError_t dequant_dtype(const QsDequantArgs& a, cudaStream_t stream) {
  const dim3 grid(unsigned((a.k_steps + kDqSteps - 1) / kDqSteps), unsigned(a.strip_count));
  if (a.bits == 4)
    dequant_kernel<T, 4><<<grid, 32 * kDqWarps, 0, stream>>>(a);
  else if (a.bits == 8)
    dequant_kernel<T, 8><<<grid, 32 * kDqWarps, 0, stream>>>(a);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace qs
