"""Which kernel a CUDA call takes (the "cuda" backend's routing policy, quant/backends/cuda.py): the
token counts at which the GEMV, the pipelined GEMV, the wgmma GEMM and the dequantise + cuBLAS path
take over, which calls may leave their fp32 sums, and `pick_op`, the rule over them. Pure: the
device's and the layer's answers come in as callables, so the rule is tested without a GPU."""

from __future__ import annotations

import os
from collections.abc import Callable

from quant.backends.cuda_dequant import DEQUANT_MIN_M

# Most tokens a GEMV call takes (the extension's gemv_max_m); above this the GEMM.
GEMV_MAX_M = 32
# From this many tokens a GEMV-sized call (<= GEMV_MAX_M) goes to the GEMM when it runs the Hopper
# wgmma kernel. H100, decode-step linears (v7, 16-token wgmma tiles): M=4 GEMV 1.940 ms vs wgmma
# 2.343, M=8 2.304 vs 2.359, M=12 2.758 vs 2.350 (one process); M=9 / 10 / 11 2.636 / 2.654 / 2.694
# vs 2.385 / 2.390 / 2.385 (another run, same machine).
WGMMA_MIN_M = 9
# Up to this many tokens a layer that the pipelined GEMV takes (csrc/gemv_pipe.cuh: sm_90+, 4-bit
# g >= 128 or 8-bit g >= 64; above 8 tokens only layers without zeros) stays on it instead of the
# wgmma GEMM: two 8-token blocks per pass over the weights (bench/NOTES.md, v27). That holds where
# the call leaves its sums (no fix-up); a call that writes y stays on it up to PIPE_Y_MAX_M tokens
# (H200, 7B decode-step linears writing y: 9 tokens -5%, 12 -3%, 16 +1-3% against the wgmma GEMM).
PIPE_MAX_M = 16
PIPE_Y_MAX_M = 12
# ... except a call whose sums go to a reader of the wgmma GEMM's [column][token slot] layout (the
# q/k/v and SwiGLU readers; the RMSNorm after o and down needs them transposed by one more kernel):
# from WGMMA_MIN_M tokens the GEMM leaves those. H200 (bench/NOTES.md v32): the 7B decode-step
# linears leaving sums at 16 tokens 1.664 ms vs 1.855, the engine at batch 12 / 16 +4.6 / +9.3%, at
# 10 equal; all four linears on the GEMM were faster still back to back (1.53 ms) but the RMSNorm's
# transposing kernel made the engine 6% slower at batch 10. QUANTSERVE_COLUMN_SUMS=0: the GEMV.
COLUMN_SUMS = os.environ.get("QUANTSERVE_COLUMN_SUMS", "1") != "0"
# GEMV calls of up to this many tokens may leave their fp32 sums to the kernel that reads them
# (CudaBackend.apply_sums, quant/sums.py): no split-K fix-up at the end of the call. The GEMV keeps
# [token][column] sums, which the [M, N] sums buffer matches, for any call it takes (up to 16 tokens
# here: above that the wgmma GEMM or the 32-token GEMV, which keep [column][token] strips).
# QUANTSERVE_GEMV_SUMS=0 makes every call write y. This and GEMM_SUMS_MAX_M repeat csrc/quantserve_cuda.h's
# QS_SUMS_MAX_M and QS_GEMM_SUMS_MAX_M (tests/kernels/test_cuda_build.py checks that they agree).
SUMS_MAX_M = 16
GEMV_SUMS = os.environ.get("QUANTSERVE_GEMV_SUMS", "1") != "0"
# Hopper: wgmma GEMM calls of up to this many tokens (QS_GEMM_SUMS_MAX_M) may leave their sums
# too, as [column][token slot] (t = the tile's token count, 16-128, slots a column; the readers of
# server.models.column_sums and qkv_reader read that layout): no fence, counter or drain at the end
# of a split tile. QUANTSERVE_GEMM_SUMS=0 makes them write y.
GEMM_SUMS_MAX_M = 128
GEMM_SUMS = os.environ.get("QUANTSERVE_GEMM_SUMS", "1") != "0"


def pick_op(m: int, wgmma: Callable[[], bool], pipe: Callable[[], bool] = lambda: False,
            sums: bool = False, columns: bool = False) -> str:
    """"gemv", "gemm" or "dequant" for a call of m tokens: the GEMV up to GEMV_MAX_M
    tokens, except from WGMMA_MIN_M tokens where `wgmma()` says the device runs the Hopper wgmma
    GEMM, unless `pipe()` says the pipelined GEMV takes the call and it has at most PIPE_MAX_M
    tokens (a call that leaves its sums) or PIPE_Y_MAX_M (one that writes y), and the call is not
    one whose sums go to a reader of the GEMM's [column][token slot] layout (`columns`: those take
    the wgmma GEMM, COLUMN_SUMS); from DEQUANT_MIN_M tokens the dequantise + cuBLAS path. The
    callables are asked only when the answer depends on them."""
    if m >= DEQUANT_MIN_M:
        return "dequant"
    if m > GEMV_MAX_M:
        return "gemm"
    if m >= WGMMA_MIN_M and wgmma():
        if sums and columns and COLUMN_SUMS:
            return "gemm"
        return "gemv" if m <= (PIPE_MAX_M if sums else PIPE_Y_MAX_M) and pipe() else "gemm"
    return "gemv"
