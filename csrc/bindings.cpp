// torch glue for the quantserve_cuda kernels: one checked host wrapper per op. The kernels
// themselves (csrc/*.cu) see only raw pointers, sizes and a stream (quantserve_cuda.h).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>

#include "quantserve_cuda.h"

namespace {

// Error messages are built with std::to_string and thrown as std::runtime_error (Python RuntimeError):
// on the device's torch 2.11 stack, formatting an integer through an ostream inside this module
// (as TORCH_CHECK's message builder does) crashed in libstdc++'s locale code.
std::string piece(const char* s) { return s; }
std::string piece(const std::string& s) { return s; }
std::string piece(c10::ScalarType t) { return c10::toString(t); }
std::string piece(const c10::Device& d) {
  if (d.is_cuda()) return "cuda:" + std::to_string(int(d.index()));
  return d.is_cpu() ? "cpu" : "a non-CUDA device";
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
std::string piece(T v) {
  return std::to_string(v);
}

template <typename... Args>
void require(bool cond, const Args&... args) {
  if (!cond) {
    std::string msg;
    ((msg += piece(args)), ...);
    throw std::runtime_error(msg);
  }
}

std::string shape_str(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

void check_cuda(const torch::Tensor& t, const char* name, const torch::Tensor& x) {
  require(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  require(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  require(t.is_contiguous(), name, " must be contiguous (shape ", shape_str(t), ")");
}

void check_shape(const torch::Tensor& t, const char* name, std::initializer_list<int64_t> want) {
  bool ok = t.dim() == int64_t(want.size());
  int64_t i = 0;
  std::string w = "[";
  for (int64_t v : want) {
    if (ok && t.size(i) != v) ok = false;
    w += (i ? ", " : "") + std::to_string(v);
    ++i;
  }
  require(ok, name, " has shape ", shape_str(t), ", expected ", w, "]");
}

// The repacked weight (codes, scales, zeros) against n_strips x k_steps and the tensor `ref` it is
// used with (same device; scales and zeros in its dtype; `ref_name` in the messages). Returns the
// number of scale groups.
int64_t check_packed(const torch::Tensor& qweight, const torch::Tensor& scales,
                     const c10::optional<torch::Tensor>& zeros, int64_t n_strips, int64_t k_steps, int64_t bits,
                     const torch::Tensor& ref, const char* ref_name) {
  check_cuda(qweight, "qweight", ref);
  require(qweight.scalar_type() == torch::kInt32, "qweight must be int32, got ", qweight.scalar_type());
  check_shape(qweight, "qweight", {n_strips, k_steps, 32, bits == 4 ? 4 : 8});
  check_cuda(scales, "scales", ref);
  require(scales.scalar_type() == ref.scalar_type(), "scales dtype ", scales.scalar_type(), " differs from ",
          ref_name, " dtype ", ref.scalar_type());
  require(scales.dim() == 4 && scales.size(0) >= 1, "scales must be [groups, ", n_strips, ", 8, 8], got ",
          shape_str(scales));
  const int64_t groups = scales.size(0);
  check_shape(scales, "scales", {groups, n_strips, 8, 8});
  if (zeros) {
    check_cuda(*zeros, "zeros", ref);
    require(zeros->scalar_type() == ref.scalar_type(), "zeros dtype ", zeros->scalar_type(), " differs from ",
            ref_name, " dtype ", ref.scalar_type());
    check_shape(*zeros, "zeros", {groups, n_strips, 8, 8});
  }
  return groups;
}

// Shared by gemv and gemm: validates every tensor against x [m, k] and n, then launches.
torch::Tensor run(bool gemv, const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                  const c10::optional<torch::Tensor>& zeros, const c10::optional<torch::Tensor>& bias,
                  const torch::Tensor& workspace, const torch::Tensor& counters, const torch::Tensor& accum,
                  const torch::Tensor& accum_counters, int64_t n, int64_t bits, int64_t group_shift,
                  int64_t zero_point, const c10::optional<torch::Tensor>& out,
                  const c10::optional<torch::Tensor>& sums = c10::nullopt) {
  require(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  require(x.dim() == 2, "x must be 2-D [m, k], got shape ", shape_str(x));
  require(x.is_contiguous(), "x must be contiguous, shape ", shape_str(x));
  require(x.scalar_type() == torch::kHalf || x.scalar_type() == torch::kBFloat16,
              "x must be float16 or bfloat16, got ", x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  require(k % 8 == 0, "k must be a multiple of 8 (16-byte activation rows), got k=", k);
  require(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
  require(bits == 4 || bits == 8, "bits must be 4 or 8 (repacked code width), got ", bits);
  require(n > 0 && n % 2 == 0, "n must be positive and even, got n=", n);
  require(group_shift >= 0 && group_shift <= 31, "group_shift must be in [0, 31], got ", group_shift);
  if (gemv) require(m <= qs_gemv_max_m(), "gemv takes m <= ", qs_gemv_max_m(), " rows, got m=", m);
  const int64_t n_strips = (n + 63) / 64, k_steps = (k + 15) / 16;
  const int64_t groups = check_packed(qweight, scales, zeros, n_strips, k_steps, bits, x, "x");
  if (bias) {
    check_cuda(*bias, "bias", x);
    require(bias->scalar_type() == x.scalar_type(), "bias dtype ", bias->scalar_type(),
                " differs from x dtype ", x.scalar_type());
    check_shape(*bias, "bias", {n});
  }
  check_cuda(workspace, "workspace", x);
  require(workspace.scalar_type() == torch::kFloat32, "workspace must be float32");
  check_cuda(counters, "counters", x);
  require(counters.scalar_type() == torch::kInt32, "counters must be int32");
  check_cuda(accum, "accum", x);
  require(accum.scalar_type() == torch::kFloat32, "accum must be float32");
  check_cuda(accum_counters, "accum_counters", x);
  require(accum_counters.scalar_type() == torch::kInt32, "accum_counters must be int32");
  // The strip accumulators, for the GEMV and for the Hopper GEMM alike: a GEMM call with too few
  // would quietly take the mma.sync kernel instead of the wgmma one (QuantLinear's prepare sizes
  // them for its layer; a caller that skips it gets this error, not a slower kernel).
  require(accum.numel() >= qs_gemv_accum_floats(int(n)) && accum_counters.numel() >= n_strips,
              "accum holds ", accum.numel(), " floats and ", accum_counters.numel(), " counters; n=", n,
              " needs ", qs_gemv_accum_floats(int(n)), " and ", n_strips);
  if (!gemv) {
    require(workspace.numel() > 0 && counters.numel() > 0,
                "no GEMM tile shape fits this GPU's shared memory (empty workspace)");
  }

  const c10::cuda::CUDAGuard guard(x.device());
  torch::Tensor y;
  if (sums) {  // the sums are left in sums (zero on entry) and returned as an [m, n] view of it
    if (gemv) {  // [m, n] row-major in sums[:m * n]
      require(m <= QS_SUMS_MAX_M, "sums: gemv of m <= ", QS_SUMS_MAX_M, " rows only, got m=", m);
    } else {  // [n][t] in sums[:n * t], t token slots a column: the view has strides (1, t)
      require(m <= QS_GEMM_SUMS_MAX_M, "sums: gemm of m <= ", QS_GEMM_SUMS_MAX_M, " rows only, got m=", m);
      require(n % 8 == 0, "sums: gemm of n a multiple of 8 only (a warp's columns leave sums together), got n=", n);
    }
    require(!bias, "sums: no bias (the reader of the sums adds it)");
    require(!out, "sums and out are exclusive");
    check_cuda(*sums, "sums", x);
    require(sums->scalar_type() == torch::kFloat32 && sums->is_contiguous(), "sums must be contiguous float32");
    const int64_t slots = gemv ? m : qs_gemm_sums_tokens(int(m));
    require(sums->numel() >= slots * n, "sums holds ", sums->numel(), " floats, ", gemv ? "m" : "token slots",
            " * n = ", slots * n);
    y = gemv ? sums->view({-1}).narrow(0, 0, m * n).view({m, n}) : sums->as_strided({m, n}, {1, slots});
  } else if (out) {
    check_cuda(*out, "out", x);
    require(out->scalar_type() == x.scalar_type(), "out dtype ", out->scalar_type(), " differs from x dtype ",
                x.scalar_type());
    check_shape(*out, "out", {m, n});
    require(reinterpret_cast<uintptr_t>(out->data_ptr()) % 4 == 0, "out must be 4-byte aligned");
    y = *out;
  } else {
    y = torch::empty({m, n}, x.options());
  }
  if (m == 0) return y;
  QsMatmulArgs a = {};
  a.x = x.data_ptr();
  a.qweight = qweight.data_ptr();
  a.scales = scales.data_ptr();
  a.zeros = zeros ? zeros->data_ptr() : nullptr;
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.y = sums ? nullptr : y.data_ptr();
  a.sums = sums ? y.data_ptr<float>() : nullptr;
  a.workspace = workspace.data_ptr<float>();
  a.counters = counters.data_ptr<int>();
  a.workspace_floats = workspace.numel();
  a.num_counters = int(counters.numel());
  a.accum = accum.data_ptr<float>();
  a.accum_counters = accum_counters.data_ptr<int>();
  a.accum_floats = accum.numel();
  a.num_accum_counters = int(accum_counters.numel());
  a.m = int(m);
  a.n = int(n);
  a.k = int(k);
  a.bits = int(bits);
  a.groups = int(groups);
  a.group_shift = int(group_shift);
  a.zero_point = int(zero_point);
  a.dtype = x.scalar_type() == torch::kHalf ? QS_F16 : QS_BF16;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = gemv ? qs_gemv(&a, stream) : qs_gemm(&a, stream);
  require(err == cudaSuccess, gemv ? "qs_gemv" : "qs_gemm", " failed for m=", m, " n=", n, " k=", k,
              " bits=", bits, ": ", cudaGetErrorString(err));
  return y;
}

torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                   const c10::optional<torch::Tensor>& zeros, const c10::optional<torch::Tensor>& bias,
                   const torch::Tensor& workspace, const torch::Tensor& counters, const torch::Tensor& accum,
                   const torch::Tensor& accum_counters, int64_t n, int64_t bits, int64_t group_shift,
                   int64_t zero_point, const c10::optional<torch::Tensor>& out,
                   const c10::optional<torch::Tensor>& sums) {
  return run(true, x, qweight, scales, zeros, bias, workspace, counters, accum, accum_counters, n, bits,
             group_shift, zero_point, out, sums);
}

torch::Tensor gemm(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                   const c10::optional<torch::Tensor>& zeros, const c10::optional<torch::Tensor>& bias,
                   const torch::Tensor& workspace, const torch::Tensor& counters, const torch::Tensor& accum,
                   const torch::Tensor& accum_counters, int64_t n, int64_t bits, int64_t group_shift,
                   int64_t zero_point, const c10::optional<torch::Tensor>& out,
                   const c10::optional<torch::Tensor>& sums) {
  return run(false, x, qweight, scales, zeros, bias, workspace, counters, accum, accum_counters, n, bits,
             group_shift, zero_point, out, sums);
}

// Strips [strip_begin, strip_begin + out.size(0) / 64) of a repacked weight widened into out
// [64 * strips, 16 * k_steps] (out's dtype, which the scales share): row r is column 64 * strip_begin + r.
torch::Tensor dequant(const torch::Tensor& qweight, const torch::Tensor& scales,
                      const c10::optional<torch::Tensor>& zeros, const torch::Tensor& out, int64_t strip_begin,
                      int64_t bits, int64_t group_shift, int64_t zero_point) {
  require(out.is_cuda(), "out must be a CUDA tensor, got ", out.device());
  require(out.scalar_type() == torch::kHalf || out.scalar_type() == torch::kBFloat16,
          "out must be float16 or bfloat16, got ", out.scalar_type());
  require(out.dim() == 2 && out.is_contiguous(), "out must be a contiguous 2-D tensor, shape ", shape_str(out));
  require(reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0, "out must be 16-byte aligned");
  require(bits == 4 || bits == 8, "bits must be 4 or 8 (repacked code width), got ", bits);
  require(group_shift >= 0 && group_shift <= 31, "group_shift must be in [0, 31], got ", group_shift);
  require(qweight.dim() == 4, "qweight must be [n_strips, k_steps, 32, words], got ", shape_str(qweight));
  const int64_t n_strips = qweight.size(0), k_steps = qweight.size(1);
  const int64_t groups = check_packed(qweight, scales, zeros, n_strips, k_steps, bits, out, "out");
  require(out.size(0) % 64 == 0 && out.size(0) > 0, "out rows must be a positive multiple of 64, got ",
          out.size(0));
  const int64_t strips = out.size(0) / 64;
  require(out.size(1) == k_steps * 16, "out must have ", k_steps * 16, " columns (16 * k_steps), got ",
          out.size(1));
  require(strip_begin >= 0 && strip_begin + strips <= n_strips, "strips [", strip_begin, ", ",
          strip_begin + strips, ") are outside the layer's ", n_strips);
  const c10::cuda::CUDAGuard guard(out.device());
  QsDequantArgs a = {};
  a.qweight = qweight.data_ptr();
  a.scales = scales.data_ptr();
  a.zeros = zeros ? zeros->data_ptr() : nullptr;
  a.w = out.data_ptr();
  a.ldw = out.size(1);
  a.n_strips = int(n_strips);
  a.k_steps = int(k_steps);
  a.strip_begin = int(strip_begin);
  a.strip_count = int(strips);
  a.bits = int(bits);
  a.groups = int(groups);
  a.group_shift = int(group_shift);
  a.zero_point = int(zero_point);
  a.dtype = out.scalar_type() == torch::kHalf ? QS_F16 : QS_BF16;
  cudaError_t err = qs_dequant(&a, c10::cuda::getCurrentCUDAStream());
  require(err == cudaSuccess, "qs_dequant failed for strips [", strip_begin, ", ", strip_begin + strips,
          ") k_steps=", k_steps, " bits=", bits, ": ", cudaGetErrorString(err));
  return out;
}

// y[:, j] = x[:, perm[j]] for act-order layers (the permutation built at load: a bijection of [0, k)).
torch::Tensor gather_cols(const torch::Tensor& x, const torch::Tensor& perm, bool pdl) {
  require(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  require(x.scalar_type() == torch::kHalf || x.scalar_type() == torch::kBFloat16,
          "x must be float16 or bfloat16, got ", x.scalar_type());
  require(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D tensor, shape ", shape_str(x));
  check_cuda(perm, "perm", x);
  require(perm.scalar_type() == torch::kInt32, "perm must be int32, got ", perm.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  require(perm.dim() == 1 && perm.size(0) == k, "perm must be [", k, "], got ", shape_str(perm));
  require(k % 8 == 0 && k > 0, "gather takes k a positive multiple of 8, got ", k);
  require(reinterpret_cast<uintptr_t>(perm.data_ptr()) % 16 == 0, "perm must be 16-byte aligned");
  require(m <= INT32_MAX && k <= INT32_MAX, "x is too large: ", shape_str(x));
  torch::Tensor y = torch::empty_like(x);
  if (m == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaError_t err = qs_gather_cols(x.data_ptr(), perm.data_ptr<int>(), y.data_ptr(), int(m), int(k), pdl ? 1 : 0,
                                   c10::cuda::getCurrentCUDAStream());
  require(err == cudaSuccess, "qs_gather_cols failed for m=", m, " k=", k, ": ", cudaGetErrorString(err));
  return y;
}

// A diagnosis build's per-warp / per-block trace records since the last take (`take`: qs_gemv_trace_take
// or qs_gemm_trace_take, `cols` uint64 a record), as int64 [n, cols]; an error in a build without them.
torch::Tensor take_trace(int (*take)(unsigned long long*, int), int64_t cols, const char* what) {
  auto out = torch::empty({QS_GEMV_TRACE_RECORDS, cols}, torch::dtype(torch::kInt64));
  const int n = take(reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()), QS_GEMV_TRACE_RECORDS);
  require(n >= 0, "this build of quantserve_cuda has no ", what, " trace (build it with QUANTSERVE_CUDA_TRACE=1)");
  return out.narrow(0, 0, n).clone();
}

std::tuple<int64_t, int64_t> workspace_need(int64_t device) {
  long long floats = 0;
  int counters = 0;
  qs_workspace_need(int(device), &floats, &counters);
  return {floats, counters};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "quantserve fused int4/int8 dequant GEMV (m <= 32) and tensor-core GEMM kernels";
  m.def("gemv", &gemv,
        "y[m, n] = x[m, k] @ W + bias for m <= 32 (repacked GPTQ codes); with sums (m <= sums_max_m(), no bias): the "
        "fp32 products are added into sums[:m * n] (zero on entry) and returned as [m, n], y not written",
        py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("workspace"),
        py::arg("counters"), py::arg("accum"), py::arg("accum_counters"), py::arg("n"), py::arg("bits"), py::arg("group_shift"), py::arg("zero_point"),
        py::arg("out") = py::none(), py::arg("sums") = py::none());
  m.def("sums_max_m", []() { return QS_SUMS_MAX_M; }, "most rows a gemv call that leaves its sums may have");
  m.def("gemm", &gemm,
        "y[m, n] = x[m, k] @ W + bias for any m (repacked GPTQ codes); with sums (the Hopper wgmma kernel, "
        "m <= 128, no bias): the fp32 products are added into sums (zero on entry) as [n][t], t = "
        "gemm_sums_tokens(m) slots a column, and returned as an [m, n] view of strides (1, t), y not written",
        py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("workspace"),
        py::arg("counters"), py::arg("accum"), py::arg("accum_counters"), py::arg("n"), py::arg("bits"), py::arg("group_shift"), py::arg("zero_point"),
        py::arg("out") = py::none(), py::arg("sums") = py::none());
  m.def("gemm_sums_tokens", [](int64_t m) { return int64_t(qs_gemm_sums_tokens(int(m))); },
        "token slots a column of the sums a gemm call of m tokens leaves", py::arg("m"));
  m.def("dequant", &dequant, "widen strips of a repacked weight into out [64 * strips, 16 * k_steps] (W^T rows)",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("strip_begin"),
        py::arg("bits"), py::arg("group_shift"), py::arg("zero_point"));
  m.def("gather", &gather_cols,
        "y[:, j] = x[:, perm[j]] (act-order; int32 perm of [0, k), k a multiple of 8); pdl: programmatic "
        "dependent launch on sm_90+", py::arg("x"), py::arg("perm"), py::arg("pdl") = true);
  m.def("gemv_set_options",
        [](bool pdl, int64_t wave_div, bool pipeline) {
          qs_gemv_set_options(pdl ? 1 : 0, int(wave_div), pipeline ? 1 : 0);
        },
        "GEMV launch options (process-wide): programmatic dependent launch on sm_90+, grid = resident "
        "blocks / wave_div, pipeline = the up-to-16-token kernel with the next chunk in flight on sm_90+",
        py::arg("pdl"), py::arg("wave_div"), py::arg("pipeline"));
  m.def("gemv_get_options", []() {
        int pdl = 0, wave_div = 0, pipeline = 0;
        qs_gemv_get_options(&pdl, &wave_div, &pipeline);
        return std::make_tuple(bool(pdl), int64_t(wave_div), bool(pipeline));
      }, "(pdl, wave_div, pipeline) of the GEMV launches");
  m.def("gemm_set_options",
        [](bool wgmma, bool pdl, bool y_sums) { qs_gemm_set_options(wgmma ? 1 : 0, pdl ? 1 : 0, y_sums ? 1 : 0); },
        "GEMM options (process-wide): wgmma = False sends every call to the mma.sync kernel; pdl = False "
        "launches the wgmma kernel without programmatic dependent launch; y_sums = False keeps wgmma calls "
        "of 17-128 tokens that write y, on layers whose tiles are split over 4 blocks or more, on the kernel's "
        "own split-K fix-up instead of leaving sums for a second kernel that writes y", py::arg("wgmma"), py::arg("pdl"), py::arg("y_sums"));
  m.def("gemm_get_options", []() {
        int wgmma = 0, pdl = 0, y_sums = 0;
        qs_gemm_get_options(&wgmma, &pdl, &y_sums);
        return std::make_tuple(bool(wgmma), bool(pdl), bool(y_sums));
      }, "(wgmma, pdl, y_sums) of the Hopper GEMM");
  m.def("wgmma_available", [](int64_t device) { return bool(qs_wgmma_probe(int(device))); },
        "whether the device runs the sm_90a wgmma GEMM (probed once)", py::arg("device"));
  m.def("gemv_max_m", &qs_gemv_max_m, "largest m the gemv op takes");
  m.def("gemv_pipe_takes",
        [](int64_t device, int64_t m, int64_t bits, int64_t group_shift, bool has_zeros) {
          return bool(qs_gemv_pipe_takes(int(device), int(m), int(bits), int(group_shift), has_zeros ? 1 : 0));
        },
        "whether a gemv call of m rows of this width, group shift and zeros runs the pipelined kernel",
        py::arg("device"), py::arg("m"), py::arg("bits"), py::arg("group_shift"), py::arg("has_zeros"));
  m.def("gemv_accum_floats", [](int64_t n) { return qs_gemv_accum_floats(int(n)); },
        "accumulator floats the gemv op needs for n columns (counters: ceil(n/64))", py::arg("n"));
  m.def("gemv_trace_take", []() { return take_trace(qs_gemv_trace_take, 6, "GEMV"); },
        "diagnosis builds: the fp16 pipelined GEMV's per-warp records since the last take, int64 [n, 6] "
        "(tag, entry ns, wait ns, exit ns, first unit done ns, its operands in ns; csrc/qs_trace.cuh), and starts "
        "over");
  m.def("gemm_trace_take", []() { return take_trace(qs_gemm_trace_take, 8, "GEMM"); },
        "diagnosis builds: the fp16 wgmma GEMM's and sums_to_y's per-block records since the last take, int64 "
        "[n, 8] (tag, entry, wait, loop done, sums out, drain begun, exit ns, info; csrc/qs_gemm_trace.cuh), and "
        "starts over");
  m.def("workspace_need", &workspace_need,
        "(floats, counters) of GEMM workspace every launch on a device fits in; (0, 0): no GEMM on it",
        py::arg("device"));
}
