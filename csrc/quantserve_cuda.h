// C-style launcher API of the quantserve CUDA kernels (no torch types; bindings.cpp is the glue).
//
// y[m, n] = x[m, k] @ W[k, n] + bias[n] with W stored as 4- or 8-bit codes in the repacked layout
// built by quant/backends/cuda_layout.py:
//   qweight  int32 [n_strips, k_steps, 32, words_per_lane]   n_strips = ceil(n/64), k_steps = ceil(k/16)
//            words_per_lane = 4 (4-bit) or 8 (8-bit); zero codes in the padding
//   scales   act  [groups, n_strips, 8, 8]                    lane group g, column c = 2j + h
//   zeros    act  [groups, n_strips, 8, 8] (true integer zero points) or NULL -> zero_point
// Activations fp16 or bf16, fp32 accumulation. Split-K state: the GEMV and the Hopper (wgmma) GEMM
// add partial sums into `accum` (fp32, zero, qs_gemv_accum_floats(n) floats) and count arrivals in
// `accum_counters` (zero, one per 64-column strip); the mma.sync GEMM stores partial tiles in
// `workspace` (no init needed) and counts in `counters` (zero); the wgmma GEMM's split-K slots
// (tiles split over 2-4 blocks) are in `workspace` too, counted in `accum_counters`. Every kernel leaves accumulators and counters at zero, so one
// set serves every layer of a stream; concurrent streams need one set each.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { QS_F16 = 0, QS_BF16 = 1 } QsDtype;

typedef struct QsMatmulArgs {
  const void* x;        // [m, k] row-major, 16-byte aligned
  const void* qweight;  // repacked codes (see above)
  const void* scales;
  const void* zeros;    // or NULL
  const void* bias;     // [n] or NULL
  void* y;              // [m, n] row-major
  float* workspace;     // GEMM split-K partial tiles, workspace_floats floats
  int* counters;        // GEMM arrival counters, num_counters ints, zero
  long long workspace_floats;
  int num_counters;
  float* accum;         // GEMV / wgmma GEMM strip accumulators, accum_floats floats, zero
  int* accum_counters;  // their strip counters, num_accum_counters ints, zero
  long long accum_floats;
  int num_accum_counters;
  int m, n, k;
  int bits;         // 4 or 8 (width of the repacked codes)
  int groups;       // number of scale groups along k
  int group_shift;  // log2(group_size / 16); >= 30 means a single group
  int zero_point;   // zero point used for every column when zeros == NULL
  int dtype;        // QsDtype
  // No bias; when set, y is not written and the product's fp32 sums are left in sums (zero on entry;
  // whoever reads them must zero them again): qs_gemv (m <= QS_SUMS_MAX_M) as [m, n] row-major;
  // qs_gemm (Hopper wgmma kernel, m <= QS_GEMM_SUMS_MAX_M, n a multiple of 8) as [n][t] with t = qs_gemm_sums_tokens(m)
  // token slots a column (element (i, j) at sums[j * t + i]; slots i >= m stay zero).
  float* sums;
} QsMatmulArgs;

// Most tokens a qs_gemv call that leaves its sums (QsMatmulArgs.sums) may have.
#define QS_SUMS_MAX_M 16
// Most tokens a qs_gemm call that leaves its sums may have (one wgmma launch).
#define QS_GEMM_SUMS_MAX_M 128
// Token slots a column of a qs_gemm call's sums (the wgmma tile's token count for m tokens).
int qs_gemm_sums_tokens(int m);

// Dequantisation of whole 64-column strips into a plain 16-bit W^T, for calls that hand the product to
// cuBLAS (prefill-sized m): w[r][k] = W[k][64 * strip_begin + r] for r < 64 * strip_count and
// k < 16 * k_steps (rows past n and k past the layer's k hold padding values; the caller slices them off).
typedef struct QsDequantArgs {
  const void* qweight;  // repacked codes [n_strips, k_steps, 32, words]
  const void* scales;   // act [groups, n_strips, 8, 8]
  const void* zeros;    // act [groups, n_strips, 8, 8] or NULL -> zero_point
  void* w;              // act [64 * strip_count, ldw] row-major, 16-byte aligned
  long long ldw;        // row pitch in elements: >= 16 * k_steps, a multiple of 8
  int n_strips, k_steps;
  int strip_begin, strip_count;
  int bits, groups, group_shift, zero_point, dtype;
} QsDequantArgs;

// M <= 32: swap-AB tensor-core GEMV (weights are the MMA's A operand, tokens its n8 side).
cudaError_t qs_gemv(const QsMatmulArgs* args, cudaStream_t stream);
// Any M: cp.async-pipelined tensor-core GEMM; stream-K over (tile, k-stage) units. On a Hopper GPU
// running the sm_90a code, the wgmma kernel takes it (above 256 tokens in 256-token slices) when
// accum is large enough for n.
cudaError_t qs_gemm(const QsMatmulArgs* args, cudaStream_t stream);
// Widen strips [strip_begin, strip_begin + strip_count) of a repacked weight into args->w.
cudaError_t qs_dequant(const QsDequantArgs* args, cudaStream_t stream);
// Act-order gather y[r][j] = x[r][perm[j]] of 16-bit x [m, k] (row-major) into y [m, k] (16-byte
// aligned); perm int32 [k], 16-byte aligned, entries in [0, k); k a multiple of 8. pdl = 1 launches
// it with programmatic dependent launch on sm_90+ (perm read before the wait, x and y after it).
cudaError_t qs_gather_cols(const void* x, const int* perm, void* y, int m, int k, int pdl, cudaStream_t stream);
// GEMM options, process-wide (set before capturing a graph): wgmma = 0 sends every call to the
// mma.sync kernel; pdl = 0 launches the wgmma kernel without programmatic dependent launch;
// y_sums = 0 keeps wgmma calls that write y at 17-QS_GEMM_SUMS_MAX_M tokens on layers whose tiles
// the grid splits over 4 blocks or more on the GEMM's own split-K fix-up (1: the GEMM leaves its
// sums in the strip accumulators and a second kernel writes y from them). Default 1, 1, 1.
void qs_gemm_set_options(int wgmma, int pdl, int y_sums);
void qs_gemm_get_options(int* wgmma, int* pdl, int* y_sums);
// Whether `device` runs the wgmma kernel (sm_90a code loaded); probed once, by qs_workspace_need
// or here (runs a one-thread kernel: call it outside graph capture).
int qs_wgmma_probe(int device);
// GEMV launch options, process-wide (set them before capturing a CUDA graph): pdl = 1 launches
// calls of up to 16 tokens with programmatic dependent launch on sm_90+ (each warp's first chunk of
// codes is pulled into L2 during the previous kernel's tail); the grid is the resident blocks per
// SM divided by wave_div (2 leaves room for the next launch's blocks; measured slower); pipeline = 1
// runs calls of up to 16 tokens on sm_90+ whose chunk meets one group on the kernel that keeps a
// warp's next chunk in flight while it computes (gemv_pipe.cuh).
// Defaults: pdl 1, wave_div 1, pipeline 1.
void qs_gemv_set_options(int pdl, int wave_div, int pipeline);
void qs_gemv_get_options(int* pdl, int* wave_div, int* pipeline);
// 1 where a qs_gemv call of m tokens of this width and group shift, with zeros or not, runs the
// pipelined kernel on `device` under the current options, else 0 (the register GEMV would take it).
int qs_gemv_pipe_takes(int device, int m, int bits, int group_shift, int has_zeros);
// Diagnosis builds only (QS_GEMV_TRACE, csrc/qs_trace.cuh): copies up to max_records per-warp
// records of the fp16 pipelined GEMV's launches since the last call into dst (6 x uint64 each: tag,
// entry, wait, exit, first unit done, first unit's operands in ns) and starts over; returns the
// count, or -1 in a build without the trace.
#define QS_GEMV_TRACE_RECORDS (1 << 18)
int qs_gemv_trace_take(unsigned long long* dst, int max_records);
// The same for the fp16 wgmma GEMM's and sums_to_y's per-block records (csrc/qs_gemm_trace.cuh:
// 8 x uint64 each: tag, entry, wait, loop done, sums out, drain begun, exit ns, info).
int qs_gemm_trace_take(unsigned long long* dst, int max_records);
// Largest m handled by qs_gemv.
int qs_gemv_max_m(void);
// Accumulator floats the GEMV and the wgmma GEMM need for n output columns (counters: ceil(n / 64)).
long long qs_gemv_accum_floats(int n);
// GEMM workspace and counter sizes that every launch configuration on `device` fits in
// (0 floats when no GEMM tile shape fits the device's shared memory).
void qs_workspace_need(int device, long long* floats, int* counters);

#ifdef __cplusplus
}
#endif
