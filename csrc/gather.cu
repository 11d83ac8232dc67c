// Act-order gather y[m, k] = x[m, perm[k]] before every act-order call's plain kernel (the GEMVs,
// the GEMMs and the dequant path; only gather="fused" has the GEMV read x through the permutation).
// Why our own kernel and not index_select: on sm_90 the kernels around it use programmatic
// dependent launch. index_select neither lets the next kernel start early nor starts early itself,
// so the GEMM after it cannot copy its first weight stages during it, and it cannot start during
// the previous kernel's tail: measured 7-9 us per call at 16-64 tokens for a 128-512 KB gather.
// Here the permutation (which belongs to no earlier kernel) is loaded before griddepcontrol.wait,
// the next kernel may launch at once, and each thread writes 8 consecutive outputs (16 bytes).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "qs_launch.cuh"
#include "qs_ptx.cuh"
#include "quantserve_cuda.h"

namespace qs {

constexpr int kGatherThreads = 256;

// One thread per 8 outputs of one row (k % 8 == 0): perm[k0 .. k0 + 7] as two int4 loads, then eight
// 2-byte loads of x (L1/L2-resident: a decode call's x is a few KB) and one 16-byte store.
__global__ void __launch_bounds__(kGatherThreads) gather_cols_kernel(const unsigned short* __restrict__ x,
                                                                     const int* __restrict__ perm,
                                                                     unsigned short* __restrict__ y, int m, int k) {
  pdl_launch_dependents();
  const int per_row = k >> 3;
  const long long item = (long long)blockIdx.x * kGatherThreads + threadIdx.x;
  const bool live = item < (long long)m * per_row;
  const int row = live ? int(item / per_row) : 0;
  const int k0 = live ? int(item - (long long)row * per_row) * 8 : 0;
  int4 p0 = make_int4(0, 0, 0, 0), p1 = make_int4(0, 0, 0, 0);
  if (live) {
    p0 = __ldg(reinterpret_cast<const int4*>(perm + k0));
    p1 = __ldg(reinterpret_cast<const int4*>(perm + k0 + 4));
  }
  pdl_wait();  // x belongs to the previous kernel until here
  if (!live) return;
  const unsigned short* xr = x + (long long)row * k;
  const int idx[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
  uint32_t v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = uint32_t(xr[idx[2 * i]]) | (uint32_t(xr[idx[2 * i + 1]]) << 16);
  *reinterpret_cast<uint4*>(y + (long long)row * k + k0) = make_uint4(v[0], v[1], v[2], v[3]);
}

}  // namespace qs

extern "C" cudaError_t qs_gather_cols(const void* x, const int* perm, void* y, int m, int k, int pdl,
                                      cudaStream_t stream) {
  if (m < 1 || k < 8 || k % 8 || reinterpret_cast<uintptr_t>(y) % 16 || reinterpret_cast<uintptr_t>(perm) % 16)
    return cudaErrorInvalidValue;
  qs::DeviceInfo dev;
  int device = 0;
  cudaError_t err = qs::device_info(&dev, &device);
  if (err != cudaSuccess) return err;
  const long long items = (long long)m * (k / 8);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned((items + qs::kGatherThreads - 1) / qs::kGatherThreads));
  cfg.blockDim = dim3(qs::kGatherThreads);
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  qs::set_pdl(cfg, attr, pdl && dev.cc_major >= 9);
  return cudaLaunchKernelEx(&cfg, qs::gather_cols_kernel, static_cast<const unsigned short*>(x), perm,
                            static_cast<unsigned short*>(y), m, k);
}
