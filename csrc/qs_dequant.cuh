// Int4 / int8 codes -> fp16 / bf16 MMA fragments in registers.
// Why: the weights stay 4 (or 8) bits in HBM; they are widened only in registers, right before the
// tensor-core instruction, with the exponent-magic trick (code | 0x6400 is the half 1024 + code),
// so one LOP3 (or PRMT) and two packed 16-bit ops turn 2 codes into 2 dequantised weights (Dequant),
// or one LOP3 (or PRMT) alone into 2 codes plus the magic's offset, which the caller's fp32 fold
// takes out again with the scale and zero (Widen, v24).
//
// Fragment convention (shared with quant/backends/cuda_layout.py, which packs the codes):
// for a 16 (k) x 16 (n) tile, lane = 4*g + t holds the codes of columns g and g+8 at rows
// 2t, 2t+1, 2t+8, 2t+9. A "pair" p = 2*h + hk is the two rows {2t, 2t+1} (hk = 0) or
// {2t+8, 2t+9} (hk = 1) of column g + 8*h. Packed 4-bit word: nibble e*4 + p is row (2t + 8*hk + e).
// Packed 8-bit: word (j, h), byte e*2 + hk.  Column c = 2*j + h of a 64-wide strip picks the scale.
#pragma once

#include "qs_ptx.cuh"

namespace qs {

template <typename T>
struct Act;

template <>
struct Act<__half> {
  using T = __half;
  using T2 = __half2;
  static constexpr uint32_t kMagic2 = 0x64006400u;  // 1024.0 in both halves
  static constexpr uint32_t kOne2 = 0x3C003C00u;    // 1.0 in both halves
  static constexpr int kMagic = 1024;
  __device__ static __forceinline__ T from_float(float v) { return __float2half_rn(v); }
  __device__ static __forceinline__ float to_float(T v) { return __half2float(v); }
  __device__ static __forceinline__ uint32_t pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Act<__nv_bfloat16> {
  using T = __nv_bfloat16;
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic2 = 0x43004300u;  // 128.0 in both halves
  static constexpr uint32_t kOne2 = 0x3F803F80u;    // 1.0 in both halves
  static constexpr int kMagic = 128;
  __device__ static __forceinline__ T from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static __forceinline__ float to_float(T v) { return __bfloat162float(v); }
  __device__ static __forceinline__ uint32_t pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <typename T>
__device__ __forceinline__ typename Act<T>::T2 as_t2(uint32_t v) {
  return *reinterpret_cast<typename Act<T>::T2*>(&v);
}
template <typename T>
__device__ __forceinline__ uint32_t as_u32(typename Act<T>::T2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ T bit_half(uint32_t bits) {
  const unsigned short b = static_cast<unsigned short>(bits);
  return *reinterpret_cast<const T*>(&b);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Per-group constants of one lane: the 8 columns c = 2j + h of its strip.
// Half-precision paths hold (s, s) and (magic + z, magic + z); bf16 8-bit works in fp32
// (128 + code is not exact in bf16 beyond 127) and holds s and 2^23 + z as floats.
template <typename T, int BITS>
struct GroupConsts {
  uint32_t s2[8];
  uint32_t zz[8];
  uint32_t zh[8];  // fp16: (64 + z, 64 + z), for the pairs widened under the magic 64 (magic_pair4)

  __device__ __forceinline__ void load(const uint4& s_raw, const uint4& z_raw, bool has_z, int zero_point) {
    using T2 = typename Act<T>::T2;
    const T2 magic = as_t2<T>(Act<T>::kMagic2);
    uint32_t zc = 0;
    if (!has_z) {
      T2 z = as_t2<T>(Act<T>::pack2(float(zero_point), float(zero_point)));
      zc = as_u32<T>(__hadd2(z, magic));
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      uint32_t w = word_of(s_raw, c >> 1);
      s2[c] = __byte_perm(w, w, (c & 1) ? 0x3232 : 0x1010);
      if (has_z) {
        uint32_t zw = word_of(z_raw, c >> 1);
        zz[c] = as_u32<T>(__hadd2(as_t2<T>(__byte_perm(zw, zw, (c & 1) ? 0x3232 : 0x1010)), magic));
      } else {
        zz[c] = zc;
      }
      if constexpr (std::is_same<T, __half>::value)
        zh[c] = as_u32<T>(__hsub2(as_t2<T>(zz[c]), as_t2<T>(0x63806380u)));  // 1024 + z - 960, exact
    }
  }
  // Column c's scale as a float (the fold of a GEMM that widens without it).
  __device__ __forceinline__ float scale(int c) const { return __low2float(as_t2<T>(s2[c])); }
};

template <>
struct GroupConsts<__nv_bfloat16, 8> {
  float s[8];
  float zf[8];

  __device__ __forceinline__ void load(const uint4& s_raw, const uint4& z_raw, bool has_z, int zero_point) {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      uint32_t w = word_of(s_raw, c >> 1);
      s[c] = __uint_as_float((c & 1) ? (w & 0xffff0000u) : (w << 16));
      float z = float(zero_point);
      if (has_z) {
        uint32_t zw = word_of(z_raw, c >> 1);
        z = __uint_as_float((c & 1) ? (zw & 0xffff0000u) : (zw << 16));
      }
      zf[c] = 8388608.0f + z;
    }
  }
  __device__ __forceinline__ float scale(int c) const { return s[c]; }
};

// Pair p of a packed 4-bit word as two 16-bit floats holding the codes plus the exponent magic's
// offset (see the fragment convention above). fp16: pairs 0 and 2 are 1024 + q; pairs 1 and 3, whose
// nibbles sit 4 bits up, go under the magic 64, whose ulp is 1/16: 64 + q with no shift, so a word
// costs one shift instead of three. bf16 has 7 mantissa bits, so a nibble 4 bits up would reach the
// exponent: every pair is shifted down, 128 + q.
// q8: q >> 8 (fp16 only), which the caller computes once for its 4 pairs.
template <typename T>
__device__ __forceinline__ uint32_t magic_pair4(uint32_t q, uint32_t q8, int p) {
  if constexpr (std::is_same<T, __half>::value) {
    const uint32_t src = p < 2 ? q : q8;
    return (p & 1) ? lop3_and_or<0x00f000f0u>(src, 0x54005400u) : lop3_and_or<0x000f000fu>(src, Act<T>::kMagic2);
  } else {
    return lop3_and_or<0x000f000fu>(q >> (4 * p), Act<T>::kMagic2);
  }
}

// Dequantise n-tile j (16 columns) of one k16 step into 4 pairs (p = 2h + hk), each a 32-bit
// register holding two 16-bit weights of one column, ready to be an MMA fragment register.
template <typename T, int BITS>
struct Dequant;

// tile<true>: the scaled weights; tile<false>: code - zero only, exact small integers (for a GEMM
// that applies the scale to its fp32 partial sums once a group). The zero subtracted is the pair's
// magic offset plus z (fp16 pairs 1 and 3: 64 + z, GroupConsts::zh).
template <typename T>
struct Dequant<T, 4> {
  static constexpr int kWordsPerLane = 4;  // per k16 step: 4 n-tiles x 1 word
  template <bool kScale = true>
  __device__ static __forceinline__ void tile(const uint32_t* words, int j, const GroupConsts<T, 4>& gc,
                                              uint32_t (&out)[4]) {
    const uint32_t q = words[j], q8 = q >> 8;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int c = 2 * j + (p >> 1);
      const uint32_t z = std::is_same<T, __half>::value && (p & 1) ? gc.zh[c] : gc.zz[c];
      auto v = __hsub2(as_t2<T>(magic_pair4<T>(q, q8, p)), as_t2<T>(z));
      if constexpr (kScale) v = __hmul2(v, as_t2<T>(gc.s2[c]));
      out[p] = as_u32<T>(v);
    }
  }
};

template <>
struct Dequant<__half, 8> {
  static constexpr int kWordsPerLane = 8;  // per k16 step: 4 n-tiles x 2 words (h = 0, 1)
  template <bool kScale = true>
  __device__ static __forceinline__ void tile(const uint32_t* words, int j, const GroupConsts<__half, 8>& gc,
                                              uint32_t (&out)[4]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t w = words[2 * j + h];
      const int c = 2 * j + h;
#pragma unroll
      for (int hk = 0; hk < 2; ++hk) {
        uint32_t v = __byte_perm(w, 0x64646464u, hk ? 0x4341 : 0x4240);
        auto r = __hsub2(as_t2<__half>(v), as_t2<__half>(gc.zz[c]));
        if constexpr (kScale) r = __hmul2(r, as_t2<__half>(gc.s2[c]));
        out[2 * h + hk] = as_u32<__half>(r);
      }
    }
  }
};

template <>
struct Dequant<__nv_bfloat16, 8> {
  static constexpr int kWordsPerLane = 8;
  template <bool kScale = true>
  __device__ static __forceinline__ void tile(const uint32_t* words, int j,
                                              const GroupConsts<__nv_bfloat16, 8>& gc, uint32_t (&out)[4]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t w = words[2 * j + h];
      const int c = 2 * j + h;
#pragma unroll
      for (int hk = 0; hk < 2; ++hk) {
        float a = __uint_as_float(__byte_perm(w, 0x4B000000u, hk ? 0x7441 : 0x7440));
        float b = __uint_as_float(__byte_perm(w, 0x4B000000u, hk ? 0x7443 : 0x7442));
        if constexpr (kScale)
          out[2 * h + hk] = Act<__nv_bfloat16>::pack2((a - gc.zf[c]) * gc.s[c], (b - gc.zf[c]) * gc.s[c]);
        else
          out[2 * h + hk] = Act<__nv_bfloat16>::pack2(a - gc.zf[c], b - gc.zf[c]);
      }
    }
  }
};

// Raw widening for kernels that apply the group's scale and zero in fp32 after the MMA (the GEMV):
// the fragment holds the code plus a fixed offset (the exponent magic is not subtracted), so a pair
// costs one LOP3 (4-bit; and a shift: one a word in fp16, three in bf16) or one PRMT (8-bit), and
// no packed op. The caller's "ones" MMA (A = kOnes0..3, below) sums the step's x into the offset's
// share of the sums and into sum(x), and folds each group's MMA sums in fp32 as
// s * (part - offset share - z * sum(x)). The offsets are exact: 1024 + q in fp16 up to q = 255,
// 64 + q up to 63, 128 + q in bf16 up to 127 (4-bit pairs: magic_pair4). bf16 8-bit keeps q - 128
// (128 + q is not exact beyond 127), in fp32.
//
// kOnes0..3: the A fragment {row g k lo, row g+8 k lo, row g k hi, row g+8 k hi}: D rows g get
// the offset of the rows k lo (2t, 2t+1) times their x plus that of the rows k hi (2t+8, 2t+9),
// and D rows g + 8 get sum(x).
template <typename T, int BITS>
struct Widen;

template <>
struct Widen<__half, 4> {
  // Row g: 1024 (k lo), 64 (k hi); row g + 8: 1.
  static constexpr uint32_t kOnes0 = Act<__half>::kMagic2, kOnes1 = Act<__half>::kOne2, kOnes2 = 0x54005400u,
                            kOnes3 = Act<__half>::kOne2;
  __device__ static __forceinline__ void tile(const uint32_t* words, int j, uint32_t (&out)[4]) {
    const uint32_t q = words[j], q8 = q >> 8;
    out[0] = magic_pair4<__half>(q, q8, 0);
    out[1] = magic_pair4<__half>(q, q8, 1);
    out[2] = magic_pair4<__half>(q, q8, 2);
    out[3] = magic_pair4<__half>(q, q8, 3);
  }
};

template <>
struct Widen<__nv_bfloat16, 4> {
  // Row g: 128 (k lo and hi); row g + 8: 1.
  static constexpr uint32_t kOnes0 = Act<__nv_bfloat16>::kMagic2, kOnes1 = Act<__nv_bfloat16>::kOne2,
                            kOnes2 = Act<__nv_bfloat16>::kMagic2, kOnes3 = Act<__nv_bfloat16>::kOne2;
  __device__ static __forceinline__ void tile(const uint32_t* words, int j, uint32_t (&out)[4]) {
    const uint32_t q = words[j];
#pragma unroll
    for (int p = 0; p < 4; ++p) out[p] = magic_pair4<__nv_bfloat16>(q, 0u, p);
  }
};

template <>
struct Widen<__half, 8> {
  // Row g: 1024; row g + 8: 1.
  static constexpr uint32_t kOnes0 = Act<__half>::kMagic2, kOnes1 = Act<__half>::kOne2, kOnes2 = Act<__half>::kMagic2,
                            kOnes3 = Act<__half>::kOne2;
  __device__ static __forceinline__ void tile(const uint32_t* words, int j, uint32_t (&out)[4]) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int hk = 0; hk < 2; ++hk)  // 1024 + q
        out[2 * h + hk] = __byte_perm(words[2 * j + h], 0x64646464u, hk ? 0x4341 : 0x4240);
  }
};

template <>
struct Widen<__nv_bfloat16, 8> {
  // Row g: -128; row g + 8: 1.
  static constexpr uint32_t kOnes0 = 0xC300C300u, kOnes1 = Act<__nv_bfloat16>::kOne2, kOnes2 = 0xC300C300u,
                            kOnes3 = Act<__nv_bfloat16>::kOne2;
  __device__ static __forceinline__ void tile(const uint32_t* words, int j, uint32_t (&out)[4]) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int hk = 0; hk < 2; ++hk) {
        const uint32_t w = words[2 * j + h];
        const float a = __uint_as_float(__byte_perm(w, 0x4B000000u, hk ? 0x7441 : 0x7440)) - 8388736.0f;
        const float b = __uint_as_float(__byte_perm(w, 0x4B000000u, hk ? 0x7443 : 0x7442)) - 8388736.0f;
        out[2 * h + hk] = Act<__nv_bfloat16>::pack2(a, b);  // q - 128
      }
  }
};

// One lane's fp32 scale and zero for its 8 columns c = 2j + h of a strip (the GEMV's fold), from the
// raw 16-byte rows of the scales and zeros (8 halves each; zeros absent: the layer's zero point).
template <typename T>
struct FoldConsts {
  float s[8];
  float z[8];

  __device__ __forceinline__ void load(const uint4& s_raw, const uint4& z_raw, bool has_z, int zero_point) {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const uint32_t w = word_of(s_raw, c >> 1);
      s[c] = Act<T>::to_float(bit_half<T>(c & 1 ? w >> 16 : w & 0xffffu));
      float zv = float(zero_point);
      if (has_z) {
        const uint32_t zw = word_of(z_raw, c >> 1);
        zv = Act<T>::to_float(bit_half<T>(c & 1 ? zw >> 16 : zw & 0xffffu));
      }
      z[c] = zv;
    }
  }
};

// Widen a lane's codes of one k16 step and hand every pair to store(col, hk, value): `value` holds
// rows 2t + 8hk and 2t + 8hk + 1 (t = lane & 3) of column `col` = 16j + 8h + (lane >> 2) of the
// 64-wide strip, as two 16-bit weights (low half = the lower row). For kernels that put the
// widened weights somewhere (a shared tile, a global W^T) rather than straight into an MMA.
template <typename T, int BITS, typename Store>
__device__ __forceinline__ void dequant_step_pairs(const uint32_t* words, const GroupConsts<T, BITS>& gc, int lane,
                                                   Store&& store) {
  const int g = lane >> 2;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t pr[4];
    Dequant<T, BITS>::tile(words, j, gc, pr);
#pragma unroll
    for (int p = 0; p < 4; ++p) store(16 * j + 8 * (p >> 1) + g, p & 1, pr[p]);
  }
}

}  // namespace qs
