// Stream-K bookkeeping of the GEMV (per warp) and GEMM (per block) kernels.
// Why: a 4096x4096 int4 layer is 8 MB, a few microseconds of HBM time, and its tile count rarely
// divides the SM count. The grid is exactly one resident wave; block (or warp) b takes the
// contiguous unit range [T*b/B, T*(b+1)/B) of the linearised (tile, k-chunk) space, so every SM
// streams the same number of bytes. The GEMV sums a split strip with fp32 reds into a zeroed
// accumulator (gemv.cuh). In the GEMM a tile split between blocks is summed through fp32 partials
// in the workspace (plain coalesced stores, no float atomics): each contributor stores, then bumps
// the tile's arrival counter; the last to arrive adds the others' partials to its registers,
// writes y and resets the counter. Partials live in per-block "head"/"tail" regions, so the
// workspace size is bounded by the grid, not by m*n.
#pragma once

#include <stdint.h>

namespace qs {

__device__ __forceinline__ long long unit_begin(long long total, int b, int blocks) {
  return total * b / blocks;
}

// The block whose range holds `unit`.
__device__ __forceinline__ int block_of_unit(long long unit, long long total, int blocks) {
  long long b = unit * blocks / total;
  while (b + 1 < blocks && unit_begin(total, int(b + 1), blocks) <= unit) ++b;
  while (b > 0 && unit_begin(total, int(b), blocks) > unit) --b;
  return int(b);
}

// Workspace region of block b's partial for the tile that starts at `tile_first`: a block holds at
// most two partial tiles, the one its range starts in (head, 0) and the one it ends in (tail, 1).
__device__ __forceinline__ long long region_of(int b, long long tile_first, long long total, int blocks) {
  long long b_first = unit_begin(total, b, blocks);
  int tail = b_first < tile_first ? 1 : 0;
  return 2LL * b + tail;
}

}  // namespace qs
