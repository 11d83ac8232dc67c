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
// The per-ISA tile loops are in gemm_tiles.h; this file quantises x, dispatches, and binds.
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
#include "gemm_tiles.h"  // the per-ISA inner loops and the layout constants

namespace {

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
