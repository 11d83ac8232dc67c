// y from the fp32 sums a wgmma GEMM left as [column][token slot] (gemm_wgmma_launch.cuh: a call that
// writes y at 17-128 tokens, on a layer whose tiles the grid splits over kYSumsSplit blocks or more,
// runs the GEMM that leaves its sums in the zeroed strip accumulators, then this kernel). Each block turns 32 columns into y rows (+ bias) through shared memory and
// zeroes the sums it read, so the accumulators are zero again for the next call.
// Why: the GEMM's own split-K fix-up (the last contributor to a tile reads the tile's sums back,
// writes y and zeroes them) runs once per tile, after that tile's reds, on one block, at the end
// of the block's work; the grid's tail waits for the last ones. Here the same bytes move in one
// short kernel over every SM, after the GEMM (programmatic dependent launch: its blocks start
// while the GEMM finishes, and the next layer's GEMM copies its weights while this one runs).
#pragma once

#include <cuda_runtime.h>

#include "qs_dequant.cuh"
#include "qs_gemm_trace.cuh"
#include "qs_launch.cuh"
#include "qs_ptx.cuh"
#include "quantserve_cuda.h"

namespace qs {

constexpr int kSumsCols = 32;                       // columns a block converts
constexpr int kSumsMaxSlots = QS_GEMM_SUMS_MAX_M;  // token slots a column, at most (the largest sums tile)

// sums: fp32 [n][slots] (column c's token t at c * slots + t; slots a multiple of 4, at most kSumsMaxSlots);
// y: [m][n] T, row-major; bias: [n] T or null. n a multiple of 8.
template <typename T>
__global__ void __launch_bounds__(256) sums_to_y_kernel(float* sums, T* y, const T* bias, int m, int n, int slots) {
  __shared__ float tile[kSumsCols][kSumsMaxSlots + 1];  // [column][token], +1: conflict-free column reads
  pdl_launch_dependents();
  QS_GTRACE_ENTER(nullptr, slots, 1);
  pdl_wait();  // the GEMM's sums, and y's last readers, belong to earlier kernels until here
  QS_GTRACE_WAIT();
  const int c0 = blockIdx.x * kSumsCols, cols = min(kSumsCols, n - c0), tid = threadIdx.x;
  float* src = sums + (long long)c0 * slots;
  // The block's cols x slots floats are contiguous: 16-byte loads of tokens < m, zeroed after. All of a
  // thread's loads (up to kPer) are issued before any zeroing store: in a loop of load, store, the
  // store may alias the next load, so each load waited for the one before (v37).
  constexpr int kPer = kSumsCols * kSumsMaxSlots / 4 / 256;
  const int quads = slots >> 2, items = cols * quads;
  float4 v[kPer];
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int i = tid + 256 * r, c = i / quads, t = (i - c * quads) * 4;
    v[r] = i < items && t < m ? ldcg4(src + c * slots + t) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int i = tid + 256 * r, c = i / quads, t = (i - c * quads) * 4;
    if (i >= items || t >= m) continue;  // slots of tokens >= m are zero and stay so
    stcg4(src + c * slots + t, make_float4(0.f, 0.f, 0.f, 0.f));
    tile[c][t] = v[r].x;
    tile[c][t + 1] = v[r].y;
    tile[c][t + 2] = v[r].z;
    tile[c][t + 3] = v[r].w;
  }
  __syncthreads();
  // y rows: column pairs of one token row per 16 lanes, 4-byte stores.
  constexpr int kPairs = kSumsCols / 2;
  for (int i = tid; i < m * kPairs; i += 256) {
    const int t = i / kPairs, c = 2 * (i - t * kPairs);
    if (c >= cols) continue;
    float v0 = tile[c][t], v1 = tile[c + 1][t];
    if (bias != nullptr) {
      v0 += Act<T>::to_float(bias[c0 + c]);
      v1 += Act<T>::to_float(bias[c0 + c + 1]);
    }
    *reinterpret_cast<uint32_t*>(y + (long long)t * n + c0 + c) = Act<T>::pack2(v0, v1);
  }
  QS_GTRACE_EXIT();
}

template <typename T>
cudaError_t launch_sums_to_y(float* sums, void* y, const void* bias, int m, int n, int slots, bool pdl,
                             cudaStream_t stream) {
  if (m < 1 || m > slots || slots > kSumsMaxSlots || slots % 4 != 0 || n % 8 != 0) return cudaErrorInvalidValue;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned((n + kSumsCols - 1) / kSumsCols));
  cfg.blockDim = dim3(256);
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  set_pdl(cfg, attr, pdl);
  return cudaLaunchKernelEx(&cfg, sums_to_y_kernel<T>, sums, static_cast<T*>(y), static_cast<const T*>(bias), m, n,
                            slots);
}

}  // namespace qs
