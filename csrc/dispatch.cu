// The C entry points of quantserve_cuda.h that route to the per-dtype kernels.
#include "gemm_wgmma_launch.cuh"
#include "gemv_pipe.cuh"
#include "quantserve_cuda.h"

cudaError_t qs_gemv_f16(const QsMatmulArgs& a, cudaStream_t s);
cudaError_t qs_gemv_bf16(const QsMatmulArgs& a, cudaStream_t s);
cudaError_t qs_gemm_f16(const QsMatmulArgs& a, cudaStream_t s);
cudaError_t qs_gemm_bf16(const QsMatmulArgs& a, cudaStream_t s);
cudaError_t qs_gemm_f16_need(long long* floats, int* counters);
cudaError_t qs_gemm_bf16_need(long long* floats, int* counters);

namespace {
constexpr int kGemvMaxM = 32;

// 1 in the sm_90a code of this module, 0 in every other target's: tells which binary the driver loaded.
__global__ void wgmma_probe_kernel(int* out) { *out = QS_HAS_WGMMA; }
}  // namespace

extern "C" cudaError_t qs_gemv(const QsMatmulArgs* a, cudaStream_t stream) {
  if (a->m < 1 || a->m > kGemvMaxM || a->k < 1 || a->n < 1 || a->groups < 1 || a->group_shift < 0 ||
      a->group_shift > 31)
    return cudaErrorInvalidValue;
  if (a->sums != nullptr && (a->m > QS_SUMS_MAX_M || a->bias != nullptr)) return cudaErrorInvalidValue;
  if (a->dtype == QS_F16) return qs_gemv_f16(*a, stream);
  if (a->dtype == QS_BF16) return qs_gemv_bf16(*a, stream);
  return cudaErrorInvalidValue;
}

extern "C" void qs_gemv_set_options(int pdl, int wave_div, int pipeline) {
  qs::gemv_options().pdl = pdl ? 1 : 0;
  qs::gemv_options().wave_div = wave_div < 1 ? 1 : wave_div;
  qs::gemv_options().pipeline = pipeline ? 1 : 0;
}

extern "C" void qs_gemv_get_options(int* pdl, int* wave_div, int* pipeline) {
  *pdl = qs::gemv_options().pdl;
  *wave_div = qs::gemv_options().wave_div;
  *pipeline = qs::gemv_options().pipeline;
}

extern "C" int qs_gemv_max_m(void) { return kGemvMaxM; }

extern "C" int qs_gemv_pipe_takes(int device, int m, int bits, int group_shift, int has_zeros) {
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) return 0;
  if (prev != device && cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  const int takes =
      m >= 1 && group_shift >= 0 && group_shift <= 31 && qs::gemv_pipe_takes(m, bits, group_shift, has_zeros != 0);
  if (prev != device) cudaSetDevice(prev);
  return takes;
}

extern "C" long long qs_gemv_accum_floats(int n) { return (long long)((n + 63) / 64) * qs::kAccumPerStrip; }

extern "C" cudaError_t qs_gemm(const QsMatmulArgs* a, cudaStream_t stream) {
  if (a->m < 1 || a->k < 1 || a->n < 1 || a->groups < 1 || a->group_shift < 0 || a->group_shift > 31 ||
      (a->sums != nullptr && (a->m > QS_GEMM_SUMS_MAX_M || a->bias != nullptr || a->n % 8 != 0)))
    return cudaErrorInvalidValue;
  if (a->dtype == QS_F16) return qs_gemm_f16(*a, stream);
  if (a->dtype == QS_BF16) return qs_gemm_bf16(*a, stream);
  return cudaErrorInvalidValue;
}

extern "C" int qs_gemm_sums_tokens(int m) { return qs::wgmma_tile_tokens(m); }

extern "C" void qs_gemm_set_options(int wgmma, int pdl, int y_sums) {
  qs::gemm_options().wgmma = wgmma ? 1 : 0;
  qs::gemm_options().pdl = pdl ? 1 : 0;
  qs::gemm_options().y_sums = y_sums ? 1 : 0;
}

extern "C" void qs_gemm_get_options(int* wgmma, int* pdl, int* y_sums) {
  *wgmma = qs::gemm_options().wgmma;
  *pdl = qs::gemm_options().pdl;
  *y_sums = qs::gemm_options().y_sums;
}

extern "C" int qs_wgmma_probe(int device) {
  if (device < 0 || device >= qs::kMaxDevices) return 0;
  int& ready = qs::wgmma_ready()[device];
  if (ready != 0) return ready == 1;
  int prev = 0, found = 0, current = 0;
  cudaGetDevice(&prev);
  if (cudaSetDevice(device) != cudaSuccess) return 0;
  qs::DeviceInfo dev;
  int* flag = nullptr;
  if (qs::device_info(&dev, &current) == cudaSuccess && dev.cc_major == 9 &&
      cudaMalloc(&flag, sizeof(int)) == cudaSuccess) {
    wgmma_probe_kernel<<<1, 1>>>(flag);
    if (cudaMemcpy(&found, flag, sizeof(int), cudaMemcpyDeviceToHost) != cudaSuccess) found = 0;
    cudaFree(flag);
  }
  cudaGetLastError();  // a probe that could not run leaves no sticky error behind
  ready = found == 1 ? 1 : 2;
  cudaSetDevice(prev);
  return found == 1;
}

extern "C" void qs_workspace_need(int device, long long* floats, int* counters) {
  *floats = 0;
  *counters = 0;
  qs_wgmma_probe(device);  // at prepare time, outside any graph capture
  int prev = 0;
  cudaGetDevice(&prev);
  if (cudaSetDevice(device) != cudaSuccess) return;
  long long f = 0;
  int c = 0;
  for (int d = 0; d < 2; ++d) {
    cudaError_t err = d == 0 ? qs_gemm_f16_need(&f, &c) : qs_gemm_bf16_need(&f, &c);
    if (err != cudaSuccess) {  // some tile shape does not fit this GPU: no GEMM here
      *floats = 0;
      *counters = 0;
      break;
    }
    if (f > *floats) *floats = f;
    if (c > *counters) *counters = c;
  }
  cudaGetLastError();  // clear a sticky launch-configuration error of a probe
  cudaSetDevice(prev);
}
