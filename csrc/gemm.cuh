// Tensor-core GEMM for M > 32 (batched decode, prefill): cp.async multi-stage pipeline, weights
// dequantised once per block into a shared-memory fp16/bf16 tile, fp32 accumulation, stream-K grid.
// Why: from M ~ 64 on H100 the work turns compute-bound. Dequantising into registers per warp
// (as the GEMV does) repeats the dequantisation for every warp row and ties up the registers that
// the accumulators need; here each code is widened once per block, then a plain 16-bit mainloop
// (ldmatrix for both operands from swizzled, conflict-free tiles, 64x64 or 64x32 warp tiles) runs
// on it. The dequantised tile is double-buffered so warps dequantise stage u+1 while others run the
// MMAs of stage u, with one barrier per stage.
#pragma once

#include "gemm_wgmma_launch.cuh"
#include "qs_dequant.cuh"
#include "qs_launch.cuh"
#include "qs_stage.cuh"
#include "qs_streamk.cuh"
#include "quantserve_cuda.h"

namespace qs {

// MT x NT: m16 tiles x n16 tiles per warp; WM x WN warps; a stage is KB = 4 k16 steps (BK = 64).
template <typename T, int BITS, int MT, int NT, int WM, int WN>
struct GemmCfg {
  static constexpr int kThreads = 32 * WM * WN;
  static constexpr int kWarps = WM * WN;
  static constexpr int BM = 16 * MT * WM;
  static constexpr int BN = 16 * NT * WN;
  static constexpr int KB = 4;
  static constexpr int BK = 16 * KB;
  static constexpr int STRIPS = BN / 64;
  static constexpr int WPL = Dequant<T, BITS>::kWordsPerLane;
  static constexpr int V = WPL / 4;
  static constexpr int A_BYTES = BM * BK * 2;
  static constexpr int B_BYTES = STRIPS * KB * 32 * WPL * 4;
  static constexpr int S_BYTES = STRIPS * KB * 8 * 16;  // up to KB groups per stage and strip
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES + 2 * S_BYTES;
  static constexpr int BDQ_BYTES = BN * BK * 2;  // one dequantised B tile [BN][BK]
  static constexpr int NACC = MT * NT * 2 * 4;   // fp32 accumulators per lane
  static constexpr long long REGION = (long long)BM * BN;
  static_assert(BN % 64 == 0, "a block covers whole 64-column strips");
  static int smem_bytes(int stages) { return stages * STAGE_BYTES + 2 * BDQ_BYTES; }
};

// Offset (in elements) of 16-byte chunk `ch` of row `row` in a [rows][64] 16-bit tile whose chunks
// are XOR-swizzled by row, so 8 consecutive rows at one logical chunk hit 8 different bank groups.
__device__ __forceinline__ int swz(int row, int ch) { return row * 64 + ((ch ^ (row & 7)) << 3); }

template <typename T, int BITS, int MT, int NT, int WM, int WN>
__global__ void __launch_bounds__(GemmCfg<T, BITS, MT, NT, WM, WN>::kThreads)
    gemm_kernel(const QsMatmulArgs a, int stages) {
  using Cfg = GemmCfg<T, BITS, MT, NT, WM, WN>;
  constexpr int BM = Cfg::BM, BK = Cfg::BK, KB = Cfg::KB, V = Cfg::V, WPL = Cfg::WPL, NACC = Cfg::NACC;
  constexpr int NTH = Cfg::kThreads, STRIPS = Cfg::STRIPS;
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int s_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp / WN, wn = warp % WN;
  const int n_strips = (a.n + 63) >> 6;
  const int k_steps = (a.k + 15) >> 4;
  const int nst = (k_steps + KB - 1) / KB;  // stages per tile
  const int mblocks = (a.m + BM - 1) / BM;
  const int nblocks = (n_strips + STRIPS - 1) / STRIPS;
  const long long total = (long long)mblocks * nblocks * nst;
  const int blocks = gridDim.x, b = blockIdx.x;
  const long long u0 = unit_begin(total, b, blocks), u1 = unit_begin(total, b + 1, blocks);

  const T* x = reinterpret_cast<const T*>(a.x);
  const T* bias = reinterpret_cast<const T*>(a.bias);
  T* y = reinterpret_cast<T*>(a.y);
  const uint4* qw = reinterpret_cast<const uint4*>(a.qweight);
  const bool has_zeros = a.zeros != nullptr;

  uint8_t* bdq_base = smem + stages * Cfg::STAGE_BYTES;
  auto stage_a = [&](int buf) { return reinterpret_cast<T*>(smem + buf * Cfg::STAGE_BYTES); };
  auto stage_b = [&](int buf) { return reinterpret_cast<uint4*>(smem + buf * Cfg::STAGE_BYTES + Cfg::A_BYTES); };
  auto stage_s = [&](int buf) {
    return reinterpret_cast<uint4*>(smem + buf * Cfg::STAGE_BYTES + Cfg::A_BYTES + Cfg::B_BYTES);
  };
  auto stage_z = [&](int buf) {
    return reinterpret_cast<uint4*>(smem + buf * Cfg::STAGE_BYTES + Cfg::A_BYTES + Cfg::B_BYTES + Cfg::S_BYTES);
  };
  auto bdq = [&](int dbuf) { return reinterpret_cast<T*>(bdq_base + dbuf * Cfg::BDQ_BYTES); };

  using Cursor = StageCursor;
  auto advance = [&](Cursor& c) { c.advance(nst); };
  auto load_unit = [&](const Cursor& cu, int buf) {
    const int tile = cu.tile, st = cu.st;
    const int nblk = tile / mblocks, mblk = tile - nblk * mblocks;
    const int m0 = mblk * BM, strip0 = nblk * STRIPS, step0 = st * KB;
    T* sa = stage_a(buf);
    for (int idx = tid; idx < BM * (BK / 8); idx += NTH) {
      const int row = idx / (BK / 8), ch = idx % (BK / 8);
      const int gm = m0 + row, gk = step0 * 16 + ch * 8;
      const bool ok = gm < a.m && gk < a.k;
      cp_async16(sa + swz(row, ch), ok ? x + (long long)gm * a.k + gk : x, ok);
    }
    uint4* sb = stage_b(buf);
    for (int idx = tid; idx < STRIPS * KB * 32 * V; idx += NTH) {
      const int v = idx % V, ln = (idx / V) % 32, s = (idx / (V * 32)) % KB, w = idx / (V * 32 * KB);
      const int strip = strip0 + w, step = step0 + s;
      const bool ok = strip < n_strips && step < k_steps;
      cp_async16(sb + idx, ok ? qw + (((long long)strip * k_steps + step) * 32 + ln) * V + v : qw, ok);
    }
    stage_group_consts<STRIPS, KB, NTH>(a, stage_s(buf), stage_z(buf), strip0, step0, n_strips, k_steps, tid);
  };

  // Widen the stage's codes into the [BN][BK] tile: warp-sized (strip, step) pieces, 16 x 32-bit
  // stores per lane each (conflict-free: the 8 lane groups land in 8 different swizzled chunks).
  auto dequant_unit = [&](const Cursor& cu, int buf, int dbuf) {
    const int step0 = cu.st * KB;
    const int gfirst = step0 >> a.group_shift;
    const uint4* sb = stage_b(buf);
    const uint4* ss = stage_s(buf);
    const uint4* sz = stage_z(buf);
    T* dst = bdq(dbuf);
#pragma unroll
    for (int piece = warp; piece < STRIPS * KB; piece += Cfg::kWarps) {
      const int w = piece / KB, s = piece % KB;
      const int step = step0 + s;
      if (step >= k_steps) continue;
      uint32_t words[WPL];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const uint4 q = lds128(sb + ((w * KB + s) * 32 + lane) * V + v);
        words[4 * v + 0] = q.x;
        words[4 * v + 1] = q.y;
        words[4 * v + 2] = q.z;
        words[4 * v + 3] = q.w;
      }
      const int slot = (step >> a.group_shift) - gfirst;
      const uint4 sraw = lds128(ss + (w * KB + slot) * 8 + g);
      const uint4 zraw = has_zeros ? lds128(sz + (w * KB + slot) * 8 + g) : make_uint4(0, 0, 0, 0);
      GroupConsts<T, BITS> gc;
      gc.load(sraw, zraw, has_zeros, a.zero_point);
      dequant_step_pairs(words, gc, lane, [&](int col, int hk, uint32_t v) {
        *reinterpret_cast<uint32_t*>(dst + swz(w * 64 + col, s * 2 + hk) + 2 * t) = v;
      });
    }
  };

  float acc[NACC];
#pragma unroll
  for (int r = 0; r < NACC; ++r) acc[r] = 0.f;

  auto mma_unit = [&](const Cursor& cu, int buf, int dbuf) {
    const int step0 = cu.st * KB;
    const T* sa = stage_a(buf);
    const T* sbq = bdq(dbuf);
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) {
      if (step0 + kk < k_steps) {
        uint32_t af[MT][4];
        uint32_t bf[NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int row = wm * MT * 16 + mt * 16 + (lane & 15);
          ldmatrix_x4(af[mt], sa + swz(row, kk * 2 + (lane >> 4)));
        }
#pragma unroll
        for (int nb = 0; nb < NT; ++nb) {
          const int n = wn * NT * 16 + nb * 16 + (lane & 7) + 8 * (lane >> 4);
          ldmatrix_x4(bf[nb], sbq + swz(n, kk * 2 + ((lane >> 3) & 1)));
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nb = 0; nb < NT; ++nb) {
            const uint32_t b0[2] = {bf[nb][0], bf[nb][1]};
            const uint32_t b1[2] = {bf[nb][2], bf[nb][3]};
            mma_16816<T>(*reinterpret_cast<float(*)[4]>(acc + ((mt * NT + nb) * 2 + 0) * 4), af[mt], b0);
            mma_16816<T>(*reinterpret_cast<float(*)[4]>(acc + ((mt * NT + nb) * 2 + 1) * 4), af[mt], b1);
          }
      }
    }
  };

  // y = acc + bias for this warp's fragment: acc[(mt, nb, h)][c] is row mt*16 + g + 8*(c >> 1),
  // column nb*16 + 8h + 2t + (c & 1) of the warp tile.
  auto write_y = [&](int tile) {
    const int nblk = tile / mblocks, mblk = tile - nblk * mblocks;
    const int row0 = mblk * BM + wm * MT * 16, col0 = nblk * Cfg::BN + wn * NT * 16;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nb = 0; nb < NT; ++nb)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int m = row0 + mt * 16 + g + 8 * half;
            const int n = col0 + nb * 16 + 8 * h + 2 * t;
            if (m < a.m && n < a.n) {
              const float* c = acc + ((mt * NT + nb) * 2 + h) * 4 + 2 * half;
              float o0 = c[0], o1 = c[1];
              if (bias != nullptr) {
                o0 += Act<T>::to_float(bias[n]);
                o1 += Act<T>::to_float(bias[n + 1]);
              }
              *reinterpret_cast<uint32_t*>(y + (long long)m * a.n + n) = Act<T>::pack2(o0, o1);
            }
          }
  };

  auto flush = [&](int tile, long long seg_first, long long seg_end) {
    const long long tile_first = (long long)tile * nst;
    if (seg_first == tile_first && seg_end == tile_first + nst) {
      write_y(tile);
    } else {
      float* ws = a.workspace;
      const long long mine_off = region_of(b, tile_first, total, blocks) * Cfg::REGION;
      float* dst = ws + mine_off + (long long)warp * NACC * 32 + lane;
#pragma unroll
      for (int r = 0; r < NACC; ++r) __stcg(dst + r * 32, acc[r]);
      __threadfence();
      __syncthreads();
      const int cslot = block_of_unit(tile_first, total, blocks);
      if (tid == 0) {
        const int mine = int(seg_end - seg_first);
        s_last = atomicAdd(a.counters + cslot, mine) + mine == nst;
      }
      __syncthreads();
      if (s_last) {
        __threadfence();
        const int b_hi = block_of_unit(tile_first + nst - 1, total, blocks);
        for (int bb = cslot; bb <= b_hi; ++bb) {
          if (bb == b) continue;
          const float* src = ws + region_of(bb, tile_first, total, blocks) * Cfg::REGION +
                             (long long)warp * NACC * 32 + lane;
#pragma unroll
          for (int r = 0; r < NACC; ++r) acc[r] += __ldcg(src + r * 32);
        }
        write_y(tile);
        if (tid == 0) a.counters[cslot] = 0;
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < NACC; ++r) acc[r] = 0.f;
  };

  const Cursor first = {int(u0 / nst), int(u0 % nst)};
  Cursor loader = first, widen = first, comp = first;
  for (int i = 0; i < stages - 1; ++i) {
    if (u0 + i < u1) {
      load_unit(loader, i);
      advance(loader);
    }
    cp_async_commit();
  }
  cp_async_wait(stages - 2);
  __syncthreads();
  if (u0 < u1) {
    dequant_unit(widen, 0, 0);
    advance(widen);
  }
  long long seg_first = u0;
  int buf = 0, load_buf = (stages - 1) % stages;
  for (long long u = u0; u < u1; ++u) {
    const int it = int(u - u0);
    cp_async_wait(stages - 3);  // unit u+1 has landed
    __syncthreads();            // dequant(u) visible; mma(u-1) done with its buffers
    if (u + stages - 1 < u1) {
      load_unit(loader, load_buf);
      advance(loader);
    }
    cp_async_commit();
    const int next_buf = buf + 1 == stages ? 0 : buf + 1;
    if (u + 1 < u1) {
      dequant_unit(widen, next_buf, (it + 1) & 1);
      advance(widen);
    }
    mma_unit(comp, buf, it & 1);
    if (comp.st == nst - 1 || u + 1 == u1) {
      flush(comp.tile, seg_first, u + 1);
      seg_first = u + 1;
    }
    advance(comp);
    buf = next_buf;
    load_buf = load_buf + 1 == stages ? 0 : load_buf + 1;
  }
  cp_async_wait(0);
}

template <typename T, int BITS, int MT, int NT, int WM, int WN>
cudaError_t launch_gemm(const QsMatmulArgs& a, cudaStream_t stream, long long* need_floats, int* need_counters) {
  using Cfg = GemmCfg<T, BITS, MT, NT, WM, WN>;
  static int occ_slot[kMaxDevices];
  static int stage_slot[kMaxDevices];
  auto kernel = gemm_kernel<T, BITS, MT, NT, WM, WN>;
  PipelineShape ps;
  cudaError_t err = pipeline_shape(kernel, Cfg::kThreads, 4, Cfg::smem_bytes, stage_slot, occ_slot, &ps);
  if (err != cudaSuccess) return err;
  const int stages = ps.stages, smem = ps.smem;
  long long blocks = (long long)ps.dev.sms * ps.occ;
  if (need_floats != nullptr) {
    *need_floats = 2 * blocks * Cfg::REGION;
    *need_counters = int(blocks);
    return cudaSuccess;
  }
  const long long n_strips = (a.n + 63) / 64, k_steps = (a.k + 15) / 16;
  const long long total = ((a.m + Cfg::BM - 1) / Cfg::BM) * ((n_strips + Cfg::STRIPS - 1) / Cfg::STRIPS) *
                          ((k_steps + Cfg::KB - 1) / Cfg::KB);
  blocks = blocks < total ? blocks : total;
  blocks = blocks < a.num_counters ? blocks : a.num_counters;
  const long long fit = a.workspace_floats / (2 * Cfg::REGION);
  blocks = blocks < fit ? blocks : fit;
  if (blocks < 1) return cudaErrorInvalidValue;
  kernel<<<int(blocks), Cfg::kThreads, smem, stream>>>(a, stages);
  return cudaGetLastError();
}

// Tile shape by batch size (warp tiles 64x32 or 64x64, 8 warps); on Hopper every call goes to the
// wgmma kernel (gemm_wgmma_launch.cuh; above 256 tokens in slices) unless qs_gemm_set_options
// turned it off.
template <typename T, int BITS>
cudaError_t gemm_by_m(const QsMatmulArgs& a, cudaStream_t s, long long* nf, int* nc) {
  if (nf == nullptr && wgmma_usable(a)) return gemm_wgmma_by_m<T, BITS>(a, s);  // Hopper
  if (a.sums != nullptr) return cudaErrorNotSupported;  // only the wgmma kernel leaves sums
  if (a.m <= 64) return launch_gemm<T, BITS, 4, 2, 1, 8>(a, s, nf, nc);   // 64 x 256
  if (a.m <= 128) return launch_gemm<T, BITS, 4, 4, 2, 4>(a, s, nf, nc);  // 128 x 256
  return launch_gemm<T, BITS, 4, 4, 4, 2>(a, s, nf, nc);                  // 256 x 128
}

template <typename T>
cudaError_t gemm_dtype(const QsMatmulArgs& a, cudaStream_t s, long long* nf, int* nc) {
  if (a.bits == 4) return gemm_by_m<T, 4>(a, s, nf, nc);
  if (a.bits == 8) return gemm_by_m<T, 8>(a, s, nf, nc);
  return cudaErrorInvalidValue;
}

// Largest workspace over the tile shapes of one dtype; an error when a shape does not fit.
template <typename T>
cudaError_t gemm_need(long long* floats, int* counters) {
  *floats = 0;
  *counters = 0;
  const int ms[3] = {64, 128, 256};
  for (int bits = 4; bits <= 8; bits += 4)
    for (int i = 0; i < 3; ++i) {
      QsMatmulArgs a = {};
      a.m = ms[i];
      a.bits = bits;
      long long f = 0;
      int c = 0;
      cudaError_t err = gemm_dtype<T>(a, nullptr, &f, &c);
      if (err != cudaSuccess) return err;
      if (f > *floats) *floats = f;
      if (c > *counters) *counters = c;
    }
  // The wgmma GEMM's split-K slots share the workspace (a device that runs it).
  if (wgmma_ready_here()) {
    const cudaError_t err = wgmma_slots_need<T>(floats);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace qs
