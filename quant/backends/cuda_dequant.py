"""The "cuda" backend's prefill path: from DEQUANT_MIN_M tokens a call widens the layer's codes into a
16-bit W^T scratch, a chunk of whole 64-column strips at a time (csrc/dequant.cuh), and cuBLAS
multiplies each chunk into its columns of y. Compute-bound calls that large run faster on cuBLAS's
fp16 GEMM than on our fused GEMMs, and what the widening costs (a 16-bit write of every weight) is
less than the difference. quant.backends.cuda decides when (pick_op) and owns the scratch
(Workspace); this module is the rule's numbers and the chunk loop.
"""

from __future__ import annotations

import os

import torch

from quant.backends.cuda_layout import CudaLayout

# From this many tokens a call dequantises the layer into a 16-bit scratch, a column chunk at a
# time, and multiplies with cuBLAS (prefill: compute-bound, where cuBLAS's fp16 GEMM outruns ours).
# H100, decode-step linears of the 7B shape in a CUDA graph, one process (v7: the fused GEMM with
# 256-token tiles): M=192 fused 9.99 ms vs dequant 12.34, M=256 11.41 vs 12.75, M=320 15.46 vs
# 14.30, M=384 18.78 vs 14.27, M=448 21.37 vs 16.56, M=512 22.88 vs 16.33, M=1024 45.92 vs 27.11
# (cuBLAS fp16 21.22). But calls this large run eagerly in the engine (its decode graphs stop at
# 128), where the Python chunk loop's host time counts: with the earlier fused GEMM (14.7 ms at
# 256), batch-256 decode of the 7B shape took 34.9 / 36.5 ms per step on the dequant path vs 27.3 on
# the fused GEMM. Hence 512, where the GPU saving (6.5 ms per step) is larger than that host cost;
# prefill chunks (1024) keep the gain.
# QUANTSERVE_DEQUANT_MIN_M overrides it (a huge value keeps every call on the fused kernels).
DEQUANT_MIN_M = int(os.environ.get("QUANTSERVE_DEQUANT_MIN_M", "512"))
# The scratch of that path, per device: a layer runs as chunks of whole 64-column strips that fit it
# (a smaller layer gets a scratch of its own size). H100, 7B decode-step linears at M=1024 by chunk
# size: 8 MB 36.2 ms, 16 MB 29.3, 32 MB 26.6, 64 MB 26.1, 128 MB 26.0, whole layers 26.1 (at M=512:
# 26.1 / 19.9 / 17.0 / 16.4 / 15.9 / 16.1): small chunks give cuBLAS too few tiles, and the
# widened weights reach HBM at any size (the dequantisation alone takes ~5.5 ms per step from 16 MB).
DEQUANT_SCRATCH_BYTES = 64 << 20


def strip_bytes(k_steps: int) -> int:
    """Bytes of one 64-column strip of k_steps k16 steps widened to 16 bits (the dequant unit)."""
    return 64 * 16 * k_steps * 2


def scratch_bytes(n_strips: int, k_steps: int, cap: int | None = None) -> int:
    """Scratch bytes a layer of n_strips x k_steps wants for dequant_matmul: the whole layer in 16
    bits, or `cap` (DEQUANT_SCRATCH_BYTES) when it is larger, but never less than one strip."""
    strip = strip_bytes(k_steps)
    return max(strip, min(n_strips * strip, DEQUANT_SCRATCH_BYTES if cap is None else cap))


def dequant_chunks(state: CudaLayout, dtype: torch.dtype, scratch: torch.Tensor, budget: int):
    """The column chunks of a layer in `scratch` (uint8) at up to `budget` bytes each (at least one
    strip): yields (s0, w, n0, n1), where strips [s0, s0 + w.shape[0] / 64) widen into w (a
    [64 * strips, 16 * k_steps] view of the scratch) and give columns [n0, n1) of y."""
    n_strips, k_steps = state.qweight.shape[:2]
    kp = 16 * k_steps
    strip = strip_bytes(k_steps)
    per = max(1, min(n_strips, budget // strip))
    chunk = scratch[:per * strip].view(dtype).view(per * 64, kp)
    for s0 in range(0, n_strips, per):
        count = min(per, n_strips - s0)
        yield s0, chunk[:count * 64], 64 * s0, min(state.n, 64 * (s0 + count))


def multiply_in_chunks(ext, state: CudaLayout, x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor,
                       budget: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W + bias, one chunk of whole strips at a time: the extension's `dequant`
    widens the chunk into `scratch` (uint8, at least one strip; `budget` bytes a chunk) and cuBLAS
    multiplies it straight into the chunk's columns of y (leading dimensions passed through).
    x: fp16/bf16, in the layout's row order (act-order: gathered). Returns y."""
    scales, zeros, bias = state.constants[x.dtype]
    for s0, w, n0, n1 in dequant_chunks(state, x.dtype, scratch, budget):
        ext.dequant(state.qweight, scales, zeros, w, s0, state.bits, state.group_shift, state.zero_point)
        wt = w[:n1 - n0, :state.k].t()  # [K, n1 - n0], leading dimension kp: cuBLAS takes it as is
        if bias is None:
            torch.mm(x, wt, out=y[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1], x, wt, out=y[:, n0:n1])
    return y
