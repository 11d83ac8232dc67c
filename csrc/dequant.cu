// The dequantise-to-16-bit kernel (dequant.cuh), both dtypes: small enough for one file.
#include "dequant.cuh"

extern "C" cudaError_t qs_dequant(const QsDequantArgs* a, cudaStream_t stream) {
  if (a->n_strips < 1 || a->k_steps < 1 || a->strip_begin < 0 || a->strip_count < 1 ||
      a->strip_begin + a->strip_count > a->n_strips || a->strip_count > 65535 || a->groups < 1 ||
      a->group_shift < 0 || a->group_shift > 31 || a->ldw < (long long)a->k_steps * 16 || a->ldw % 8)
    return cudaErrorInvalidValue;
  if (a->dtype == QS_F16) return qs::dequant_dtype<__half>(*a, stream);
  if (a->dtype == QS_BF16) return qs::dequant_dtype<__nv_bfloat16>(*a, stream);
  return cudaErrorInvalidValue;
}
