// Up-to-16-token GEMV with a warp's next chunk in flight while it computes this one (v16; v27: two
// token blocks).
// Why: the register GEMV (gemv.cuh) has a warp load a 4 KB chunk, wait for it, compute it, and only
// then load the next, so a chunk costs the warp load latency plus compute (L + C) with nothing of its
// own in flight during C. Here each warp holds two units' codes, x and group rows in registers: the
// loads of unit u + 1 are issued before unit u is computed. 160-166 registers instead of 122: 3 blocks
// of 4 warps a SM instead of 4. H200, Llama-2-7B shape: batch 8 decode +16%, batch 4 +6%, batch 1
// within the spread; the 1-token linears alone ~equal (bench/NOTES.md, v16).
// Same layout, stream-K split, fix-up and sums flush as gemv.cuh. Taken on sm_90+ up to 8 tokens
// where a chunk meets one group and the two units fit the registers without spilling: 4-bit with
// groups of >= 128 (or one group), 8-bit with groups of >= 64 (gemv_pipe_takes). 9-16 tokens (two
// token blocks, MB = 2: 206-247 registers, 2 blocks a SM) only for layers without zeros: leaving sums
// at 12 tokens it took 1.73 ms for the 7B decode-step linears against the wgmma GEMM's 1.91 (H200,
// v27); with zeros it was 8-10% slower than that GEMM at 16 tokens. Which calls of 9-16 tokens come
// here is the Python side's choice (quant/backends/cuda.py, PIPE_MAX_M);
// the GEMV option `pipeline` (default on) turns it off. Layers whose K is a multiple of a chunk's k
// (every Llama-shaped layer) take the KFULL instantiation, whose x loads carry no predicate: with
// predicated loads ptxas reloads the memory descriptor before each one (v24), and the KFULL loop
// ran the 1-token step 7.8% faster (H200, v25).
#pragma once

#include "gemv.cuh"
#include "qs_trace.cuh"

namespace qs {

// Tokens the pipelined GEMV takes (two blocks of 8; above 8 tokens only layers without zeros).
constexpr int kGemvPipeMaxM = 16;

// One unit's operands: the lane's codes of U k16 steps, its x fragments and its group rows (not used
// where the rows are loaded at compute time, kLateRows). (Where HASZ is false the zero rows are
// constant zeros: no registers held for them.)
template <int U, int V, int SPC, int MB>
struct PipeChunk {
  uint4 wq[U][V];
  uint32_t xb[U][MB][2];
  uint4 sraw[SPC], zraw[SPC];
};

// `a` where the condition holds, else `b` (two arrays of one type), chosen at compile time.
template <bool kFirst, typename A>
__device__ __forceinline__ A& pick(A& a, A& b) {
  if constexpr (kFirst)
    return a;
  else
    return b;
}

// A warp's units [begin, end) of the strip-major (strip, chunk) space, and the step from one strip to
// the next (always 1). Why the step is a value rather than a ++: with ++ nvcc emits a loop that ptxas
// schedules worse: 100 more moves of the memory descriptor into uniform registers (R2UR) and the next
// unit's code loads issued later; ncu (gate_up, 1 token) counts 6% more instructions issued at the same
// rate, and the decode-step linears at 1-8 tokens ran 3-5% slower on an H200 (bench/NOTES.md, v17). The
// source form is not what matters, the SASS is: time any change to this loop.
struct PipeUnits {
  int begin, end;
  int strip_step;
};
__device__ __forceinline__ PipeUnits pipe_units(int n_strips, int cps) {
  const int wi = threadIdx.x >> 5;
  PipeUnits r;
  const long long total = (long long)n_strips * cps;
  const int warps = gridDim.x * kGemvWarps, w = blockIdx.x * kGemvWarps + wi;
  r.begin = int(unit_begin(total, w, warps));
  r.end = int(unit_begin(total, w + 1, warps));
  r.strip_step = 1;
  return r;
}

#ifdef QS_GEMV_TRACE
// One word that depends on every load of a unit (trace builds: QS_TRACE_DATA).
template <int U, int V, int SPC, int MB>
__device__ __forceinline__ unsigned int trace_operands_word(const uint4 (&wq)[U][V], const uint32_t (&xb)[U][MB][2],
                                                            const uint4 (&rows)[SPC]) {
  unsigned int v = 0;
#pragma unroll
  for (int i = 0; i < U; ++i) {
#pragma unroll
    for (int j = 0; j < V; ++j) v ^= wq[i][j].x;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) v ^= xb[i][mb][0] ^ xb[i][mb][1];
  }
#pragma unroll
  for (int r = 0; r < SPC; ++r) v ^= rows[r].x;
  return v;
}
#endif

template <typename T, int BITS, int MB, int SPC, bool HASZ, bool KFULL>
__global__ void __launch_bounds__(kGemvThreads, MB == 1 ? 3 : 2) gemv_pipe_kernel(const QsMatmulArgs a) {
  pdl_launch_dependents();
  QS_TRACE_ENTER(trace, a.qweight);
  constexpr int U = gemv_steps<BITS, MB>();
  constexpr int V = Dequant<T, BITS>::kWordsPerLane / 4;
  // 4-bit with zeros loads a unit's scale and zero rows when it computes the unit rather than one unit
  // ahead with its codes: held a unit ahead they spill (32 bytes, ptxas), loaded late they fit in 168
  // registers. Only there: the 4-bit symmetric kernel ran 2-3% slower with late rows (H200, v18).
  constexpr bool kLateRows = HASZ && BITS == 4;

  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int n_strips = (a.n + 63) >> 6;
  const int k_steps = (a.k + 15) >> 4;
  const int cps = (k_steps + U - 1) / U;
  const PipeUnits wu = pipe_units(n_strips, cps);
  const int u_begin = wu.begin;
  const int u_end = wu.end;
  const uint4* qw = reinterpret_cast<const uint4*>(a.qweight);
  if (u_begin >= u_end) {
    pdl_wait();
    QS_TRACE_WAIT(trace);
    QS_TRACE_EXIT(trace);
    return;
  }
  int strip = u_begin / cps, ch = u_begin % cps;
  prefetch_chunk_l2<U, V>(qw, strip, ch, k_steps, lane);
  pdl_wait();
  QS_TRACE_WAIT(trace);

  auto load = [&](int s, int c, PipeChunk<U, V, SPC, MB>& p) {
    load_chunk_codes<U, V>(qw, s, k_steps, c * U, lane, p.wq);
    load_x_chunk<T, U, MB, KFULL>(a, c * U, lane, p.xb);
    if constexpr (!kLateRows) load_group_rows<U, SPC>(a, n_strips, s, c * U, g, HASZ, p.sraw, p.zraw);
  };

  float acc[MB][4][4];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mb][j][c] = 0.f;
  int c_begin = ch;
  int u = u_begin;
  // One unit: issue the next unit's loads into `nxt`, compute `cur`, flush at a strip's end.
  // Returns whether a next unit exists (then it sits in `nxt`).
  auto step = [&](PipeChunk<U, V, SPC, MB>& cur, PipeChunk<U, V, SPC, MB>& nxt) {
    int s1 = strip, c1 = ch + 1;
    if (c1 == cps) {
      s1 += wu.strip_step;
      c1 = 0;
    }
    const bool more = u + 1 < u_end;
    // kLateRows: this unit's group rows are loaded now, used at its fold, after its MMAs.
    uint4 late_s[SPC], late_z[SPC];
    if constexpr (kLateRows) load_group_rows<U, SPC>(a, n_strips, strip, ch * U, g, HASZ, late_s, late_z);
    if (more) load(s1, c1, nxt);
    auto& rows_s = pick<kLateRows>(late_s, cur.sraw);
    auto& rows_z = pick<kLateRows>(late_z, cur.zraw);
    QS_TRACE_DATA(trace, trace_operands_word(cur.wq, cur.xb, rows_s));
    gemv_chunk<T, BITS, U, MB, SPC>(cur.wq, cur.xb, rows_s, rows_z, HASZ, a.zero_point, acc);
    QS_TRACE_UNIT(trace);
    if (!more || s1 != strip) {
      flush_strip<T, MB>(a, acc, strip, c_begin, ch + 1, cps, lane);
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[mb][j][c] = 0.f;
      c_begin = 0;
    }
    ++u;
    strip = s1;
    ch = c1;
    return more;
  };
  PipeChunk<U, V, SPC, MB> pa, pb;
  load(strip, ch, pa);
  while (step(pa, pb) && step(pb, pa)) {
  }
  QS_TRACE_EXIT(trace);
}

// KFULL where every chunk lies inside K (K a multiple of the chunk's k): x loads with no predicate.
template <typename T, int BITS, int MB, int SPC, bool HASZ>
cudaError_t launch_gemv_pipe(const QsMatmulArgs& a, cudaStream_t stream) {
  static int occ_slot[2][kMaxDevices];
  constexpr int U = gemv_steps<BITS, MB>();
  if (a.k % (16 * U) == 0)
    return launch_gemv_wave(gemv_pipe_kernel<T, BITS, MB, SPC, HASZ, true>, occ_slot[0], U, true, a, stream);
  return launch_gemv_wave(gemv_pipe_kernel<T, BITS, MB, SPC, HASZ, false>, occ_slot[1], U, true, a, stream);
}

// Whether the call takes the pipelined kernel (see the top of this file).
// (On the current device, for a call of m tokens into a layer of this width, group shift and zeros.)
inline bool gemv_pipe_takes(int m, int bits, int group_shift, bool has_zeros) {
  if (!gemv_options().pipeline || m > kGemvPipeMaxM || (bits != 4 && bits != 8)) return false;
  // Two token blocks with zeros: 8-10% slower than the wgmma GEMM at 16 tokens (H200, v27).
  if (m > 8 && has_zeros) return false;
  // One group per chunk (4-bit g >= 128, 8-bit g >= 64): smaller groups spill (ptxas).
  const int spc = bits == 4 ? groups_per_chunk<gemv_steps<4, 1>()>(group_shift)
                            : groups_per_chunk<gemv_steps<8, 1>()>(group_shift);
  if (spc != 1) return false;
  DeviceInfo dev;
  int device = 0;
  return device_info(&dev, &device) == cudaSuccess && dev.cc_major >= 9;
}
inline bool gemv_pipe_takes(const QsMatmulArgs& a) {
  return gemv_pipe_takes(a.m, a.bits, a.group_shift, a.zeros != nullptr);
}

template <typename T, int MB>
cudaError_t gemv_pipe_bits(const QsMatmulArgs& a, cudaStream_t s) {
  if (a.bits == 4)
    return a.zeros != nullptr ? launch_gemv_pipe<T, 4, MB, 1, true>(a, s) : launch_gemv_pipe<T, 4, MB, 1, false>(a, s);
  return a.zeros != nullptr ? launch_gemv_pipe<T, 8, MB, 1, true>(a, s) : launch_gemv_pipe<T, 8, MB, 1, false>(a, s);
}

// fp16 / bf16: the pipelined kernel where it is taken (one token block up to 8 tokens, two up to 16),
// else the register GEMV.
template <typename T>
cudaError_t gemv_dispatch(const QsMatmulArgs& a, cudaStream_t s) {
  if (!gemv_pipe_takes(a)) return gemv_dtype<T>(a, s);
  return a.m <= 8 ? gemv_pipe_bits<T, 1>(a, s) : gemv_pipe_bits<T, 2>(a, s);
}

}  // namespace qs
