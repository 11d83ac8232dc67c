// quantserve CPU kernel: y = x @ W + b with W as 4- or 8-bit GPTQ codes (repacked at load), x
// quantised on the fly to int8 per (row, K-block) so the inner loop is an integer dot product
// (AVX-512 VNNI vpdpbusd, AVX2 vpmaddubsw, NEON sdot, or plain C++). Why int8 activations: the
// 4-bit weights then cost 3 instructions per 128 codes instead of ~32 for a float dequant, which
// moves batch-1 decode from compute-bound to memory-bound on laptop/server cores alike.
//
// Packed layout (built by quant/cpu_int4.py, shared by every ISA path):
//   qweight  uint8 [n_blocks][k * bits / 8][16 columns] as 32-bit lanes: block nb holds output
//            columns nb*16 .. nb*16+15; each 64-byte row is one 32-bit word per column.
//            4-bit word w of a column: byte b = code(k=8w+b) | code(k=8w+4+b) << 4
//            8-bit word w of a column: byte b = code(k=4w+b)
//   scales   fp16  [n_blocks][num_kb][16]   scale of K-block kb (block_k rows) for each column
//   zeros    uint8 [n_blocks][num_kb][16]   TRUE integer zero (absent for symmetric layers: the
//            fixed zero 2^(bits-1) is passed as sym_zero)
// Rows are in kernel order (act-order layers are sorted by group at load; `perm` gathers x).
// y[m, n] = sum_kb  scale[kb, n] * xs[m, kb] * (sum_k q[k, n] * xq[m, k]  -  zero[kb, n] * sum_k xq[m, k])

#ifndef QS_STANDALONE  // a C++-only build (cross-compiled ISA checks) leaves the binding out
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_common.h"

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

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

using qs_cpu::parallel_for;

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

// ------------------------------------------------------------------------------------ dispatch
using TileFn = void (*)(const Problem&, int64_t, int64_t, float*);

template <int BITS, bool SYM, int MR>
void tile_scalar_fixed(const Problem& p, int64_t nb, int64_t r0, float* tile) {
  tile_scalar<BITS, SYM>(p, nb, r0, MR, tile);
}

template <int BITS, bool SYM>
TileFn pick_tile(int isa, int rows) {
  switch (isa) {
#ifdef QS_AVX512_VNNI
    case kAvx512Vnni: {
      static const TileFn fns[] = {tile_avx512<BITS, SYM, 1>, tile_avx512<BITS, SYM, 2>,
                                   tile_avx512<BITS, SYM, 3>, tile_avx512<BITS, SYM, 4>};
      return fns[rows - 1];
    }
#endif
#ifdef QS_AVX2
    case kAvx2: {
      static const TileFn fns[] = {tile_avx2<BITS, SYM, 1>, tile_avx2<BITS, SYM, 2>,
                                   tile_avx2<BITS, SYM, 3>, tile_avx2<BITS, SYM, 4>};
      return fns[rows - 1];
    }
#endif
#ifdef QS_NEON_DOT
    case kNeonDot: {
      static const TileFn fns[] = {tile_neon<BITS, SYM, 1>, tile_neon<BITS, SYM, 2>,
                                   tile_neon<BITS, SYM, 3>, tile_neon<BITS, SYM, 4>};
      return fns[rows - 1];
    }
#endif
    default: {
      static const TileFn fns[] = {tile_scalar_fixed<BITS, SYM, 1>, tile_scalar_fixed<BITS, SYM, 2>,
                                   tile_scalar_fixed<BITS, SYM, 3>, tile_scalar_fixed<BITS, SYM, 4>};
      return fns[rows - 1];
    }
  }
}

TileFn pick(int bits, bool sym, int isa, int rows) {
  if (bits == 4) return sym ? pick_tile<4, true>(isa, rows) : pick_tile<4, false>(isa, rows);
  return sym ? pick_tile<8, true>(isa, rows) : pick_tile<8, false>(isa, rows);
}

std::vector<int64_t> compiled_isas() {
  std::vector<int64_t> out{kScalar};
#ifdef QS_AVX2
  out.push_back(kAvx2);
#endif
#ifdef QS_NEON_DOT
  out.push_back(kNeonDot);
#endif
#ifdef QS_AVX512_VNNI
  out.push_back(kAvx512Vnni);
#endif
  return out;
}

// ------------------------------------------------------------------------- activation quantise
// One row: x (already gathered / converted to float) -> int8 per K-block with a symmetric scale.
// Written so the compiler vectorises it on any ISA: integer max of |x| bit patterns, and
// round-to-nearest-even through the 1.5 * 2^23 trick (|x * inv| <= 127 here).
void quantize_row(const float* xf, int64_t k, int64_t block_k, int64_t num_kb, float zero_mul,
                  int8_t* xq, float* xs, float* xc) {
  for (int64_t b = 0; b < num_kb; ++b) {
    const int64_t k0 = b * block_k, len = std::min(k, k0 + block_k) - k0;
    const float* v = xf + k0;
    uint32_t amax_bits = 0;
    for (int64_t i = 0; i < len; ++i) {
      uint32_t u;
      std::memcpy(&u, v + i, 4);
      u &= 0x7fffffffu;
      amax_bits = u > amax_bits ? u : amax_bits;
    }
    float amax;
    std::memcpy(&amax, &amax_bits, 4);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    int8_t* q = xq + k0;
    for (int64_t i = 0; i < len; ++i) {
      const float t = v[i] * inv + 12582912.0f;
      int32_t bits;
      std::memcpy(&bits, &t, 4);
      const int32_t iv = bits - 0x4B400000;
      q[i] = static_cast<int8_t>(iv);
      sum += iv;
    }
    xs[b] = amax / 127.f;
    xc[b] = xs[b] * static_cast<float>(sum) * zero_mul;
  }
}

// x rows (float32, or bfloat16 as uint16 bits) -> xq/xs/xc; `perm` gathers act-order inputs.
template <bool BF16>
void quantize_rows(const void* x, int64_t m, int64_t k, const int32_t* perm, int64_t block_k, int64_t num_kb,
                   float zero_mul, int threads, int8_t* xq, float* xs, float* xc) {
  parallel_for(m, m >= 16 ? threads : 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf;
    for (int64_t r = r0; r < r1; ++r) {
      const float* src;
      if (!BF16 && perm == nullptr) {
        src = static_cast<const float*>(x) + r * k;
      } else {
        buf.resize(k);
        for (int64_t i = 0; i < k; ++i) {
          const int64_t c = r * k + (perm ? perm[i] : i);
          buf[i] = BF16 ? bf16_to_float(static_cast<const uint16_t*>(x)[c]) : static_cast<const float*>(x)[c];
        }
        src = buf.data();
      }
      quantize_row(src, k, block_k, num_kb, zero_mul, xq + r * k, xs + r * num_kb, xc + r * num_kb);
    }
  });
}

template <bool BF16>
void store_tile(const float* tile, int rows, int64_t r0, int64_t n0, int64_t n, const float* bias, void* y) {
  const int64_t cols = std::min<int64_t>(kCols, n - n0);
  for (int r = 0; r < rows; ++r) {
    const int64_t off = (r0 + r) * n + n0;
    for (int64_t j = 0; j < cols; ++j) {
      const float v = tile[r * kCols + j] + (bias ? bias[n0 + j] : 0.f);
      if (BF16)
        static_cast<uint16_t*>(y)[off + j] = float_to_bf16(v);
      else
        static_cast<float*>(y)[off + j] = v;
    }
  }
}

struct GemmArgs {
  const void* x;           // [m, k] float32 or bfloat16, contiguous
  void* y;                 // [m, n] same dtype, contiguous
  const uint8_t* qweight;  // packed codes (layout at the top)
  const uint16_t* scales;  // fp16 [n_blocks, num_kb, 16]
  const uint8_t* zeros;    // uint8 [n_blocks, num_kb, 16] or null (symmetric)
  const int32_t* perm;     // int32 [k] or null
  const float* bias;       // float32 [n] or null
  int64_t m, k, n, bits, block_k, isa, threads;
  bool bf16;
};

// Per-thread scratch for the quantised activations (grows, never shrinks; decode reuses it).
struct Scratch {
  std::vector<int8_t> xq;
  std::vector<float> xs, xc;
};

void run_gemm(const GemmArgs& a) {
  const int64_t n_blocks = (a.n + kCols - 1) / kCols;
  const int64_t num_kb = (a.k + a.block_k - 1) / a.block_k;
  const bool sym = a.zeros == nullptr;
  // A thread pays off only past ~96 KB of packed weight per row tile: below that the OpenMP
  // fork/join (3-5 us) costs more than it saves (576x192: 1.8 us on 1 thread, 5.5 us on 2).
  const int64_t work = n_blocks * block_bytes(a.k, static_cast<int>(a.bits)) * ((a.m + kMaxRows - 1) / kMaxRows);
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.threads, work / 98304)));
  thread_local Scratch scratch;
  scratch.xq.resize(a.m * a.k);
  scratch.xs.resize(a.m * num_kb);
  scratch.xc.resize(a.m * num_kb);
  const float zero_mul = sym ? static_cast<float>(1 << (a.bits - 1)) : 1.f;
  if (a.bf16)
    quantize_rows<true>(a.x, a.m, a.k, a.perm, a.block_k, num_kb, zero_mul, threads, scratch.xq.data(),
                        scratch.xs.data(), scratch.xc.data());
  else
    quantize_rows<false>(a.x, a.m, a.k, a.perm, a.block_k, num_kb, zero_mul, threads, scratch.xq.data(),
                         scratch.xs.data(), scratch.xc.data());
  const Problem p{a.qweight, a.scales, a.zeros, scratch.xq.data(), scratch.xs.data(), scratch.xc.data(),
                  a.m, a.k, num_kb, a.block_k};
  const int ibits = static_cast<int>(a.bits), isa = static_cast<int>(a.isa);
  const int64_t m = a.m;
  const TileFn full = pick(ibits, sym, isa, static_cast<int>(std::min<int64_t>(m, kMaxRows)));
  const int64_t rem = m % kMaxRows;
  const TileFn tail = (m > kMaxRows && rem) ? pick(ibits, sym, isa, static_cast<int>(rem)) : nullptr;
  const int64_t full_rows = m <= kMaxRows ? m : m - rem;
  const int full_mr = static_cast<int>(std::min<int64_t>(m, kMaxRows));
  const auto store = a.bf16 ? store_tile<true> : store_tile<false>;
  parallel_for(n_blocks, threads, [&](int64_t b0, int64_t b1) {
    alignas(64) float tile[kMaxRows * kCols];
    for (int64_t nb = b0; nb < b1; ++nb) {
      for (int64_t r0 = 0; r0 < full_rows; r0 += full_mr) {
        full(p, nb, r0, tile);
        store(tile, full_mr, r0, nb * kCols, a.n, a.bias, a.y);
      }
      if (tail) {
        tail(p, nb, full_rows, tile);
        store(tile, static_cast<int>(rem), full_rows, nb * kCols, a.n, a.bias, a.y);
      }
    }
  });
}

}  // namespace

#ifndef QS_STANDALONE
// ------------------------------------------------------------------------------ Python binding
// Plain CPython API (no pybind11, no torch headers) keeps the JIT build to a few seconds. The
// Python wrapper (quant/cpu_int4.py) checks every shape and dtype and passes data pointers.

static PyObject* py_gemm(PyObject*, PyObject* args) {
  unsigned long long x, y, qweight, scales, zeros, perm, bias;
  long long m, k, n, bits, block_k, isa, threads;
  int bf16;
  if (!PyArg_ParseTuple(args, "KKKKKKKLLLLLLLp", &x, &y, &qweight, &scales, &zeros, &perm, &bias, &m, &k, &n,
                        &bits, &block_k, &isa, &threads, &bf16))
    return nullptr;
  const auto isas = compiled_isas();
  if (std::find(isas.begin(), isas.end(), isa) == isas.end()) {
    PyErr_Format(PyExc_ValueError, "isa %lld is not compiled into this build", isa);
    return nullptr;
  }
  GemmArgs a{reinterpret_cast<const void*>(x), reinterpret_cast<void*>(y),
             reinterpret_cast<const uint8_t*>(qweight), reinterpret_cast<const uint16_t*>(scales),
             reinterpret_cast<const uint8_t*>(zeros), reinterpret_cast<const int32_t*>(perm),
             reinterpret_cast<const float*>(bias), m, k, n, bits, block_k, isa, threads, bf16 != 0};
  Py_BEGIN_ALLOW_THREADS run_gemm(a);
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject* py_compiled_isas(PyObject*, PyObject*) {
  const auto isas = compiled_isas();
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(isas.size()));
  for (size_t i = 0; i < isas.size(); ++i) PyList_SET_ITEM(out, i, PyLong_FromLongLong(isas[i]));
  return out;
}

static PyObject* py_best_isa(PyObject*, PyObject*) { return PyLong_FromLongLong(compiled_isas().back()); }

static PyMethodDef kMethods[] = {
    {"gemm", py_gemm, METH_VARARGS,
     "gemm(x, y, qweight, scales, zeros, perm, bias, m, k, n, bits, block_k, isa, threads, bf16): data pointers "
     "(0 = absent); y[m, n] = x[m, k] @ W + bias"},
    {"rotary", qs_py_rotary, METH_VARARGS,
     "rotary(q, k, cos, sin, t, nq, nk, d, q_row, k_row, cs_row): float32, in place, rotate-half layout"},
    {"rms_norm", qs_py_rms_norm, METH_VARARGS,
     "rms_norm(x, res, w, out, res_out, t, h, x_row, res_row, eps): float32; res/res_out 0 when absent"},
    {"decode_attention", qs_py_decode_attention, METH_VARARGS,
     "decode_attention(q, k, v, kc, vc, block_tables, context_lens, slots, out, b, nh, nkv, hd, block_size, "
     "max_blocks, q_row, k_row, v_row, threads, scale): float32 paged decode, k/v stored at slots first"},
    {"compiled_isas", py_compiled_isas, METH_NOARGS, "ISA paths in this build: 0 scalar, 1 avx2, 2 avx512-vnni, 3 neon-dot"},
    {"best_isa", py_best_isa, METH_NOARGS, "the fastest ISA path in this build"},
    {nullptr, nullptr, 0, nullptr}};

#define QS_CONCAT_(a, b) a##b
#define QS_CONCAT(a, b) QS_CONCAT_(a, b)
#define QS_STR_(a) #a
#define QS_STR(a) QS_STR_(a)

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, QS_STR(TORCH_EXTENSION_NAME),
                                     "quantserve CPU kernels: GPTQ 4/8-bit weights x int8-quantised activations", -1,
                                     kMethods};

PyMODINIT_FUNC QS_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&kModule); }
#endif  // QS_STANDALONE
