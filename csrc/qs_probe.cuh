// Timing probes of the wgmma GEMM. A build with QS_PROBE set leaves parts of the kernel out, so a
// same-session A/B (bench/ab.sh prepare name=<ref>@probe=<bits>) measures what each part costs.
// Such a build computes wrong results and is for timing only. The default, 0, compiles the
// kernels unchanged (every probe test is an `if constexpr` on a constant).
#pragma once

#ifndef QS_PROBE
#define QS_PROBE 0
#endif

namespace qs::probe {

constexpr int kNoCopies = 1;     // no stage copies after the prologue (stages stay stale)
constexpr int kNoWiden = 2;      // the code words themselves as the A registers
constexpr int kNoEpilogue = 4;   // no reds, counter, drain or y (the accumulators kept live)
constexpr int kNoBarrier = 8;    // no stage barrier (meaningful with kNoCopies only)
constexpr int kNoReds = 16;      // split tiles: fence, counter and drain, but no reds
constexpr int kNoDrain = 32;     // split tiles: the last arrival only resets the counter
constexpr int kRedsOnly = 64;    // split tiles: reds, then no fence, counter or drain
constexpr int kSharedA = 128;    // 64-token tiles: A from shared memory (a stale tile), not registers
constexpr int kStageWait = 256;  // one wgmma wait a stage instead of one a step (with kSharedA: no hazard)
constexpr int kDrainNoZero = 512;  // split tiles: the drain does not zero the accumulator it read
constexpr int kDrainNoY = 1024;    // split tiles: the drain writes no y (its loads kept live)
constexpr int kStoresNotReds = 2048;  // split tiles: plain stores where the reds were (the drain reads lines
                                      // written by stores, not added into)

__host__ __device__ constexpr bool on(int bit) { return (QS_PROBE & bit) != 0; }

}  // namespace qs::probe
