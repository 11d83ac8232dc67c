// quantserve CPU decode-step ops: rotary, RMSNorm (+ residual) and paged decode attention in
// float32. Small ops of a decode step that cost more in torch dispatch than in arithmetic
// (server/models/cpu_ops.py calls them; the torch formulation stays the fallback and the
// reference of tests/kernels/test_cpu_ops.py). Part of the quantserve_cpu extension, built with
// the same flags as gptq_cpu.cpp (-ffp-contract=off: the rotary is bit-identical to torch's).
#ifndef QS_STANDALONE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

using qs_cpu::parallel_for;

// Rotate q [t][nq][d] and k [t][nk][d] in place by cos/sin [t][d] (rotate-half layout). Same
// roundings as the torch formula x * cos + rotate_half(x) * sin (products rounded, then the sum;
// this file is built with -ffp-contract=off), so the result is bit-identical to it.
void rotary_inplace(float* q, float* k, const float* cos, const float* sin, int64_t t, int64_t nq, int64_t nk,
                    int64_t d, int64_t q_row, int64_t k_row, int64_t cs_row) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < t; ++i) {
    const float* c = cos + i * cs_row;
    const float* s = sin + i * cs_row;
    for (int which = 0; which < 2; ++which) {
      float* base = which == 0 ? q + i * q_row : k + i * k_row;
      const int64_t heads = which == 0 ? nq : nk;
      for (int64_t h = 0; h < heads; ++h) {
        float* x = base + h * d;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = x[j], x2 = x[j + half];
          const float a = x1 * c[j], b = -x2 * s[j];
          const float e = x2 * c[j + half], f = x1 * s[j + half];
          x[j] = a + b;
          x[j + half] = e + f;
        }
      }
    }
  }
}

// out[i] = w * (s * rsqrt(mean(s^2) + eps)) with s = x[i] (+ res[i], also stored to res_out).
void rms_norm_rows(const float* x, const float* res, const float* w, float* out, float* res_out, int64_t t,
                   int64_t h, int64_t x_row, int64_t res_row, float eps) {
  for (int64_t i = 0; i < t; ++i) {
    const float* xi = x + i * x_row;
    float* oi = out + i * h;
    const float* si = xi;
    if (res != nullptr) {
      const float* ri = res + i * res_row;
      float* so = res_out + i * h;
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) so[j] = xi[j] + ri[j];
      si = so;
    }
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < h; ++j) acc += si[j] * si[j];
    const float r = 1.f / std::sqrt(acc / static_cast<float>(h) + eps);
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) oi[j] = (si[j] * r) * w[j];
  }
}

// exp(x) for x <= 0 (softmax after subtracting the max), in plain arithmetic so that `omp simd`
// loops vectorise it (a libm expf call per score cost more than the whole dot products): Cephes'
// range reduction x = n ln2 + r and degree-6 polynomial, ~1 ulp; below -87 it returns ~0.
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return y * scale;
}

struct DecodeAttnArgs {
  const float* q;  // [b][nh][hd], token stride q_row
  const float* k;  // [b][nkv][hd], token stride k_row
  const float* v;  // [b][nkv][hd], token stride v_row
  float* kc;       // [blocks][block_size][nkv][hd]
  float* vc;
  const int32_t* block_tables;  // [b][max_blocks]
  const int32_t* context_lens;  // [b] (including this step's token)
  const int64_t* slots;         // [b] flat slot of this step's token
  float* out;                   // [b][nh][hd] contiguous
  int64_t b, nh, nkv, hd, block_size, max_blocks, q_row, k_row, v_row, threads;
  float scale;
};

// One (sequence, kv head) of a decode step: the `group` query heads sharing kv head g attend over
// the sequence's ctx cached rows, read through its block table. HD > 0 fixes the head size at
// compile time (the dot products unroll into whole vectors); HD == 0 reads it from `a`.
template <int HD>
void attend_group(const DecodeAttnArgs& a, int64_t i, int64_t g, int64_t group, std::vector<float>& scores,
                  std::vector<float>& acc) {
  const int64_t hd = HD > 0 ? HD : a.hd, block_size = a.block_size, row = a.nkv * hd;
  const int64_t ctx = a.context_lens[i];
  const int32_t* table = a.block_tables + i * a.max_blocks;
  if (static_cast<int64_t>(scores.size()) < group * ctx) scores.resize(group * ctx);
  if (static_cast<int64_t>(acc.size()) < group * hd) acc.resize(group * hd);
  float* sc = scores.data();
  float* ac = acc.data();
  const float scale = a.scale;
  const float* qg = a.q + i * a.q_row + g * group * hd;
  for (int64_t j = 0; j < ctx; ++j) {
    const float* kr = a.kc + (static_cast<int64_t>(table[j / block_size]) * block_size + j % block_size) * row + g * hd;
    for (int64_t h = 0; h < group; ++h) {
      const float* qh = qg + h * hd;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < hd; ++d) dot += qh[d] * kr[d];
      sc[h * ctx + j] = dot * scale;
    }
  }
  std::fill(ac, ac + group * hd, 0.f);
  for (int64_t h = 0; h < group; ++h) {
    float* sh = sc + h * ctx;
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < ctx; ++j) mx = sh[j] > mx ? sh[j] : mx;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < ctx; ++j) {
      const float e = exp_nonpos(sh[j] - mx);
      sh[j] = e;
      sum += e;
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t j = 0; j < ctx; ++j) sh[j] *= inv;  // probabilities, as SDPA weights v
  }
  for (int64_t j = 0; j < ctx; ++j) {
    const float* vr = a.vc + (static_cast<int64_t>(table[j / block_size]) * block_size + j % block_size) * row + g * hd;
    for (int64_t h = 0; h < group; ++h) {
      const float p = sc[h * ctx + j];
      float* ah = ac + h * hd;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) ah[d] += p * vr[d];
    }
  }
  for (int64_t h = 0; h < group; ++h)
    std::memcpy(a.out + (i * a.nh + g * group + h) * hd, ac + h * hd, hd * sizeof(float));
}

// One new token per sequence: store its k/v at its slot, then attend over the sequence's context
// through its block table (no gather). Work items are (sequence, kv head): the query heads that
// share a kv head read each cached row once.
void decode_attention(const DecodeAttnArgs& a) {
  const int64_t row = a.nkv * a.hd;
  for (int64_t i = 0; i < a.b; ++i) {
    std::memcpy(a.kc + a.slots[i] * row, a.k + i * a.k_row, row * sizeof(float));
    std::memcpy(a.vc + a.slots[i] * row, a.v + i * a.v_row, row * sizeof(float));
  }
  const int64_t group = a.nh / a.nkv;
  int64_t work = 0;
  for (int64_t i = 0; i < a.b; ++i) work += static_cast<int64_t>(a.context_lens[i]) * a.nh * a.hd;
  // below ~1 M multiply-adds a step of threads costs more than it saves (fork/join of a few us)
  const int threads = work >= (1 << 20) ? static_cast<int>(a.threads) : 1;
  const auto fn = a.hd == 64 ? attend_group<64> : a.hd == 128 ? attend_group<128> : attend_group<0>;
  parallel_for(a.b * a.nkv, threads, [&](int64_t w0, int64_t w1) {
    thread_local std::vector<float> scores, acc;  // grow, never shrink: decode reuses them
    for (int64_t w = w0; w < w1; ++w) fn(a, w / a.nkv, w % a.nkv, group, scores, acc);
  });
}

}  // namespace

#ifndef QS_STANDALONE
// Python entry points (listed in gptq_cpu.cpp's module table); the wrapper checks shapes and dtypes.

PyObject* qs_py_rotary(PyObject*, PyObject* args) {
  unsigned long long q, k, cos, sin;
  long long t, nq, nk, d, q_row, k_row, cs_row;
  if (!PyArg_ParseTuple(args, "KKKKLLLLLLL", &q, &k, &cos, &sin, &t, &nq, &nk, &d, &q_row, &k_row, &cs_row))
    return nullptr;
  rotary_inplace(reinterpret_cast<float*>(q), reinterpret_cast<float*>(k), reinterpret_cast<const float*>(cos),
                 reinterpret_cast<const float*>(sin), t, nq, nk, d, q_row, k_row, cs_row);
  Py_RETURN_NONE;
}

PyObject* qs_py_rms_norm(PyObject*, PyObject* args) {
  unsigned long long x, res, w, out, res_out;
  long long t, h, x_row, res_row;
  double eps;
  if (!PyArg_ParseTuple(args, "KKKKKLLLLd", &x, &res, &w, &out, &res_out, &t, &h, &x_row, &res_row, &eps))
    return nullptr;
  rms_norm_rows(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(res),
                reinterpret_cast<const float*>(w), reinterpret_cast<float*>(out), reinterpret_cast<float*>(res_out),
                t, h, x_row, res_row, static_cast<float>(eps));
  Py_RETURN_NONE;
}

PyObject* qs_py_decode_attention(PyObject*, PyObject* args) {
  unsigned long long q, k, v, kc, vc, tables, lens, slots, out;
  long long b, nh, nkv, hd, block_size, max_blocks, q_row, k_row, v_row, threads;
  double scale;
  if (!PyArg_ParseTuple(args, "KKKKKKKKKLLLLLLLLLLd", &q, &k, &v, &kc, &vc, &tables, &lens, &slots, &out, &b, &nh,
                        &nkv, &hd, &block_size, &max_blocks, &q_row, &k_row, &v_row, &threads, &scale))
    return nullptr;
  DecodeAttnArgs a{reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k),
                   reinterpret_cast<const float*>(v), reinterpret_cast<float*>(kc), reinterpret_cast<float*>(vc),
                   reinterpret_cast<const int32_t*>(tables), reinterpret_cast<const int32_t*>(lens),
                   reinterpret_cast<const int64_t*>(slots), reinterpret_cast<float*>(out), b, nh, nkv, hd,
                   block_size, max_blocks, q_row, k_row, v_row, threads, static_cast<float>(scale)};
  Py_BEGIN_ALLOW_THREADS decode_attention(a);
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}
#endif  // QS_STANDALONE
