// quantserve CPU kernel, the inner loops: one register tile of y (up to kMaxRows rows of x by the
// 16 columns of a packed block) per ISA: plain C++, AVX-512 VNNI (vpdpbusd), AVX2 (vpmaddubsw +
// vpmaddwd) and Arm NEON (sdot). All share the packed layout and the arithmetic described at the
// top of gptq_cpu.cpp, which includes this header once and picks a tile function per call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define QS_NEON_DOT 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define QS_AVX512_VNNI 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QS_AVX2 1
#endif

namespace {

constexpr int kCols = 16;  // output columns per packed block
constexpr int kMaxRows = 4;  // rows of x per register tile

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2, kNeonDot = 3 };

struct Problem {
  const uint8_t* qweight;
  const uint16_t* scales;  // fp16 bits
  const uint8_t* zeros;    // null when symmetric
  const int8_t* xq;        // [m][k]
  const float* xs;         // [m][num_kb] activation scale
  const float* xc;         // [m][num_kb] activation scale * sum(xq) (* sym_zero when symmetric)
  int64_t m, k, num_kb, block_k;
};

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// IEEE half -> float (normals, subnormals, inf/nan), portable.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    exp = 113;
    while (!(man & 0x400u)) { man <<= 1; --exp; }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline int64_t block_bytes(int64_t k, int bits) { return k * bits * 2; }  // k/ (32/bits) words * 64 B

// ------------------------------------------------------------------------------------------ scalar
// Portable path: same arithmetic, int32 sums per (row, column, K-block).
template <int BITS, bool SYM>
void tile_scalar(const Problem& p, int64_t nb, int64_t r0, int rows, float* tile) {
  const uint8_t* w = p.qweight + nb * block_bytes(p.k, BITS);
  constexpr int kpw = 32 / BITS;  // k per 32-bit word
  for (int i = 0; i < rows * kCols; ++i) tile[i] = 0.f;
  for (int64_t b = 0; b < p.num_kb; ++b) {
    const int64_t k0 = b * p.block_k, k1 = std::min(p.k, k0 + p.block_k);
    int32_t acc[kMaxRows][kCols] = {};
    for (int64_t kk = k0; kk < k1; kk += kpw, w += 64) {
      for (int j = 0; j < kCols; ++j) {
        const uint8_t* wb = w + 4 * j;
        for (int r = 0; r < rows; ++r) {
          const int8_t* x = p.xq + (r0 + r) * p.k + kk;
          int32_t s = 0;
          if (BITS == 4) {
            for (int t = 0; t < 4; ++t) s += (wb[t] & 15) * x[t] + (wb[t] >> 4) * x[4 + t];
          } else {
            for (int t = 0; t < 4; ++t) s += wb[t] * x[t];
          }
          acc[r][j] += s;
        }
      }
    }
    const int64_t sb = (nb * p.num_kb + b) * kCols;
    for (int j = 0; j < kCols; ++j) {
      const float sc = half_to_float(p.scales[sb + j]);
      const float z = SYM ? 1.f : static_cast<float>(p.zeros[sb + j]);
      for (int r = 0; r < rows; ++r) {
        const int64_t xi = (r0 + r) * p.num_kb + b;
        tile[r * kCols + j] += sc * (static_cast<float>(acc[r][j]) * p.xs[xi] - z * p.xc[xi]);
      }
    }
  }
}

// ------------------------------------------------------------------------------- AVX-512 VNNI
#ifdef QS_AVX512_VNNI
template <int BITS, bool SYM, int MR>
void tile_avx512(const Problem& p, int64_t nb, int64_t r0, float* tile) {
  const uint8_t* w = p.qweight + nb * block_bytes(p.k, BITS);
  constexpr int kpw = 32 / BITS;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int8_t* x[MR];
  __m512 facc[MR];
  for (int r = 0; r < MR; ++r) {
    x[r] = p.xq + (r0 + r) * p.k;
    facc[r] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < p.num_kb; ++b) {
    const int64_t k0 = b * p.block_k, k1 = std::min(p.k, k0 + p.block_k);
    __m512i acc0[MR], acc1[MR];
    for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_si512();
    int64_t kk = k0;
    if (BITS == 4) {
      for (; kk < k1; kk += kpw, w += 64) {
        const __m512i v = _mm512_loadu_si512(w);
        const __m512i lo = _mm512_and_si512(v, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(v, 4), low4);
        for (int r = 0; r < MR; ++r) {
          acc0[r] = _mm512_dpbusd_epi32(acc0[r], lo, _mm512_set1_epi32(load_i32(x[r] + kk)));
          acc1[r] = _mm512_dpbusd_epi32(acc1[r], hi, _mm512_set1_epi32(load_i32(x[r] + kk + 4)));
        }
      }
    } else {
      for (; kk + kpw < k1; kk += 2 * kpw, w += 128) {  // two words: two independent chains
        const __m512i v0 = _mm512_loadu_si512(w), v1 = _mm512_loadu_si512(w + 64);
        for (int r = 0; r < MR; ++r) {
          acc0[r] = _mm512_dpbusd_epi32(acc0[r], v0, _mm512_set1_epi32(load_i32(x[r] + kk)));
          acc1[r] = _mm512_dpbusd_epi32(acc1[r], v1, _mm512_set1_epi32(load_i32(x[r] + kk + 4)));
        }
      }
      for (; kk < k1; kk += kpw, w += 64) {
        const __m512i v0 = _mm512_loadu_si512(w);
        for (int r = 0; r < MR; ++r)
          acc0[r] = _mm512_dpbusd_epi32(acc0[r], v0, _mm512_set1_epi32(load_i32(x[r] + kk)));
      }
    }
    const int64_t sb = (nb * p.num_kb + b) * kCols;
    const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.scales + sb)));
    __m512 z = _mm512_set1_ps(1.f);
    if (!SYM)
      z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zeros + sb))));
    for (int r = 0; r < MR; ++r) {
      const int64_t xi = (r0 + r) * p.num_kb + b;
      const __m512 d = _mm512_cvtepi32_ps(_mm512_add_epi32(acc0[r], acc1[r]));
      __m512 t;
      if (SYM)
        t = _mm512_fmsub_ps(d, _mm512_set1_ps(p.xs[xi]), _mm512_set1_ps(p.xc[xi]));
      else
        t = _mm512_fnmadd_ps(z, _mm512_set1_ps(p.xc[xi]), _mm512_mul_ps(d, _mm512_set1_ps(p.xs[xi])));
      facc[r] = _mm512_fmadd_ps(sc, t, facc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(tile + r * kCols, facc[r]);
}
#endif

// ------------------------------------------------------------------------------------------ AVX2
#ifdef QS_AVX2
// u8 (0..15) x s8 dot of 4 lanes -> int32, via vpmaddubsw + vpmaddwd (no overflow: |sum| <= 3810).
inline __m256i dot4_avx2(__m256i u, __m256i s, __m256i mul16) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), mul16);
}

template <int BITS, bool SYM, int MR>
void tile_avx2(const Problem& p, int64_t nb, int64_t r0, float* tile) {
  const uint8_t* w = p.qweight + nb * block_bytes(p.k, BITS);
  constexpr int kpw = 32 / BITS;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i one16 = _mm256_set1_epi16(1);
  const __m256i sixteen16 = _mm256_set1_epi16(16);
  const int8_t* x[MR];
  for (int r = 0; r < MR; ++r) x[r] = p.xq + (r0 + r) * p.k;
  for (int i = 0; i < MR * kCols; ++i) tile[i] = 0.f;
  for (int64_t b = 0; b < p.num_kb; ++b) {
    const int64_t k0 = b * p.block_k, k1 = std::min(p.k, k0 + p.block_k);
    __m256i acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t kk = k0; kk < k1; kk += kpw, w += 64) {
      for (int h = 0; h < 2; ++h) {  // columns 0-7, 8-15
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h));
        const __m256i lo = _mm256_and_si256(v, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi32(v, 4), low4);
        for (int r = 0; r < MR; ++r) {
          const __m256i a0 = _mm256_set1_epi32(load_i32(x[r] + kk));
          if (BITS == 4) {
            const __m256i a1 = _mm256_set1_epi32(load_i32(x[r] + kk + 4));
            // both halves' 16-bit pair sums fit: 2 * 2 * 15 * 127 < 32767
            const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a0), _mm256_maddubs_epi16(hi, a1));
            acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(s16, one16));
          } else {  // 8-bit code = 16 * hi + lo, each nibble safe in vpmaddubsw
            acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_add_epi32(dot4_avx2(lo, a0, one16),
                                                                     dot4_avx2(hi, a0, sixteen16)));
          }
        }
      }
    }
    const int64_t sb = (nb * p.num_kb + b) * kCols;
    for (int h = 0; h < 2; ++h) {
      const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.scales + sb + 8 * h)));
      __m256 z = _mm256_set1_ps(1.f);
      if (!SYM) {
        const __m128i z8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.zeros + sb + 8 * h));
        z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z8));
      }
      for (int r = 0; r < MR; ++r) {
        const int64_t xi = (r0 + r) * p.num_kb + b;
        const __m256 d = _mm256_cvtepi32_ps(acc[r][h]);
        const __m256 t = _mm256_fnmadd_ps(z, _mm256_set1_ps(p.xc[xi]), _mm256_mul_ps(d, _mm256_set1_ps(p.xs[xi])));
        float* out = tile + r * kCols + 8 * h;
        _mm256_storeu_ps(out, _mm256_fmadd_ps(sc, t, _mm256_loadu_ps(out)));
      }
    }
  }
}
#endif

// ------------------------------------------------------------------------------ NEON (dotprod)
#ifdef QS_NEON_DOT
template <int BITS, bool SYM, int MR>
void tile_neon(const Problem& p, int64_t nb, int64_t r0, float* tile) {
  const uint8_t* w = p.qweight + nb * block_bytes(p.k, BITS);
  constexpr int kpw = 32 / BITS;
  const uint8x16_t low4 = vdupq_n_u8(0x0F);
  const int8_t* x[MR];
  for (int r = 0; r < MR; ++r) x[r] = p.xq + (r0 + r) * p.k;
  for (int i = 0; i < MR * kCols; ++i) tile[i] = 0.f;
  for (int64_t b = 0; b < p.num_kb; ++b) {
    const int64_t k0 = b * p.block_k, k1 = std::min(p.k, k0 + p.block_k);
    int32x4_t acc[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int q = 0; q < 4; ++q) acc[r][q] = vdupq_n_s32(0);
    for (int64_t kk = k0; kk < k1; kk += kpw, w += 64) {
      for (int q = 0; q < 4; ++q) {  // 4 columns per 128-bit register
        const uint8x16_t v = vld1q_u8(w + 16 * q);
        // codes 0..15 are valid signed bytes, so sdot (s8 x s8) applies directly
        const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, low4));
        const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        for (int r = 0; r < MR; ++r) {
          const int8x16_t a0 = vreinterpretq_s8_s32(vdupq_n_s32(load_i32(x[r] + kk)));
          if (BITS == 4) {
            const int8x16_t a1 = vreinterpretq_s8_s32(vdupq_n_s32(load_i32(x[r] + kk + 4)));
            acc[r][q] = vdotq_s32(vdotq_s32(acc[r][q], lo, a0), hi, a1);
          } else {  // 8-bit code = 16 * hi + lo
            acc[r][q] = vaddq_s32(vdotq_s32(acc[r][q], lo, a0), vshlq_n_s32(vdotq_s32(vdupq_n_s32(0), hi, a0), 4));
          }
        }
      }
    }
    const int64_t sb = (nb * p.num_kb + b) * kCols;
    for (int q = 0; q < 4; ++q) {
      float32x4_t sc, z = vdupq_n_f32(1.f);
      float s4[4], z4[4];
      for (int j = 0; j < 4; ++j) {
        s4[j] = half_to_float(p.scales[sb + 4 * q + j]);
        z4[j] = SYM ? 1.f : static_cast<float>(p.zeros[sb + 4 * q + j]);
      }
      sc = vld1q_f32(s4);
      if (!SYM) z = vld1q_f32(z4);
      for (int r = 0; r < MR; ++r) {
        const int64_t xi = (r0 + r) * p.num_kb + b;
        const float32x4_t t = vmlsq_n_f32(vmulq_n_f32(vcvtq_f32_s32(acc[r][q]), p.xs[xi]), z, p.xc[xi]);
        float* out = tile + r * kCols + 4 * q;
        vst1q_f32(out, vfmaq_f32(vld1q_f32(out), sc, t));
      }
    }
  }
}
#endif

}  // namespace
