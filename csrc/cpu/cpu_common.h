// Shared by the CPU sources of the quantserve_cpu extension: the OpenMP loop helper, and the
// Python entry points of the decode-step ops (decode_ops.cpp) that gptq_cpu.cpp's module lists.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace qs_cpu {

// Run body(begin, end) over [0, n) on `threads` OpenMP threads (static contiguous chunks).
template <typename F>
inline void parallel_for(int64_t n, int threads, const F& body) {
#ifdef _OPENMP
  if (threads > 1 && n > 1) {
    const int t = static_cast<int>(std::min<int64_t>(threads, n));
#pragma omp parallel num_threads(t)
    {
      const int64_t id = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t b0 = n * id / nt, b1 = n * (id + 1) / nt;
      if (b0 < b1) body(b0, b1);
    }
    return;
  }
#endif
  body(0, n);
}

}  // namespace qs_cpu

#ifndef QS_STANDALONE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
PyObject* qs_py_rotary(PyObject*, PyObject* args);
PyObject* qs_py_rms_norm(PyObject*, PyObject* args);
PyObject* qs_py_decode_attention(PyObject*, PyObject* args);
#endif
