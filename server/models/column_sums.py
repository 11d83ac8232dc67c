"""Readers of the Hopper GEMM's fp32 sums, left [column][token slot] (quant.sums, 9-128 tokens).

    sums_rows(sums)        -> rows y [M, N] (the RMSNorm's way in, and any reader's fallback)
    silu_mul_cols(sums)    [M, 2I] -> [M, I] = silu(gate) * up

The GEMM adds its products into [column][slot] sums (element (t, c) at c * slots + t, slots >= M
a column; quant.backends.cuda, v30 in bench/NOTES.md), the layout its 16-byte reds are cheap in. A
row reader would touch one 32-byte sector per value there, so each kernel here loads blocks of
tokens along the slots (a column's BT tokens are one contiguous run), rounds them as the matmul's y
would have been, zeroes them behind, and writes rows; Triton moves a block between the two layouts
through shared memory. Bit-equal to the row paths. The q/k/v reader of this layout is
server.models.qkv_reader's (it shares the rotary helpers).

Where the reader is elementwise (SwiGLU, q/k/v rotary), reading the sums itself rather than
sums_rows' rows saves a launch and a round trip of y per linear: the 7B engine +3% at 32-128
sequences on an H200 (bench/NOTES.md, v31). The RMSNorm still takes sums_rows' rows: it needs a
token's whole row first, and a program of all the columns of a block of tokens (two passes, built
and measured in v31) walks its columns serially, which made the engine 24-34% slower.

Launched with PDL on sm_90+ (server.models.pdl); nothing is loaded before the wait.
"""

from __future__ import annotations

import torch

from quant.sums import Sums
from server.models.pdl import launch_kwargs, pdl_enter, triton_pdl
from server.models.triton_env import use_triton

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


def is_columns(sums: Sums) -> bool:
    """Whether sums are [column][slot] (the Hopper GEMM's), not rows."""
    return sums.data.stride(-1) != 1


if HAVE_TRITON:

    @triton.jit
    def load_columns(s_ptr, toks, cols, mask, slots):
        """The [BT tokens, BC columns] block of [column][slot] fp32 sums, zeroed behind (sums are
        read once); loaded along the tokens, so each column's run of BT slots is one access."""
        p = s_ptr + cols[None, :] * slots + toks[:, None]
        x = tl.load(p, mask=mask, other=0.0)
        # every thread's loads before any zero store: Triton may give the load and the store
        # different thread layouts (sums_zeroing_barrier in server.models.fused)
        tl.debug_barrier()
        tl.store(p, tl.zeros(x.shape, dtype=tl.float32), mask=mask)
        return x

    @triton.jit
    def _sums_rows_kernel(s_ptr, out_ptr, M, N, slots, stride_o, BT: tl.constexpr, BC: tl.constexpr,
                          PDL: tl.constexpr):
        # a [BT tokens, BC columns] block of the sums -> rows of out [M, N] in out's dtype
        pdl_enter(PDL)
        toks = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mask = (toks[:, None] < M) & (cols[None, :] < N)
        x = load_columns(s_ptr, toks, cols, mask, slots)
        tl.store(out_ptr + toks[:, None] * stride_o + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_cols_kernel(s_ptr, out_ptr, M, inter, slots, stride_o, BT: tl.constexpr,
                              BC: tl.constexpr, PDL: tl.constexpr):
        # columns c (gate) and inter + c (up) of a [BT, BC] block -> silu(gate) * up, rounded as
        # fused._silu_mul_kernel rounds (each rounded as y first, the product in the model dtype)
        pdl_enter(PDL)
        toks = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mask = (toks[:, None] < M) & (cols[None, :] < inter)
        g = load_columns(s_ptr, toks, cols, mask, slots).to(out_ptr.dtype.element_ty)
        u = load_columns(s_ptr, toks, cols + inter, mask, slots).to(out_ptr.dtype.element_ty)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(out_ptr + toks[:, None] * stride_o + cols[None, :], s * u, mask=mask)


def _launch(kernel, grid, pdl: bool, *args, **meta) -> None:
    kernel[grid](*args, PDL=pdl, **meta, **launch_kwargs(pdl))


def sums_rows(sums: Sums) -> torch.Tensor:
    """A matmul's unconverted Sums -> the [M, N] rows y would have been (sums.dtype), zeroing the
    sums: sums.materialize(), but for [column][slot] sums on the GPU one Triton kernel."""
    data = sums.data
    if not is_columns(sums) or not use_triton(data, sums.dtype):
        return sums.materialize()
    m, n = data.shape
    out = torch.empty(m, n, dtype=sums.dtype, device=data.device)
    bt = min(64, triton.next_power_of_2(m))
    _launch(_sums_rows_kernel, (triton.cdiv(m, bt), triton.cdiv(n, 128)), triton_pdl(out), data, out, m, n,
            data.stride(1), out.stride(0), BT=bt, BC=128, num_warps=4)
    sums.release()
    return out


def silu_mul_cols(sums: Sums) -> torch.Tensor | None:
    """fused.silu_mul of [column][slot] sums ([M, 2I], gate then up) in one kernel -> [M, I], or None
    where it does not apply (not columns, no Triton here)."""
    data = sums.data
    if not is_columns(sums) or not use_triton(data, sums.dtype):
        return None
    m, two_i = data.shape
    inter = two_i // 2
    out = torch.empty(m, inter, dtype=sums.dtype, device=data.device)
    bt = min(32, triton.next_power_of_2(m))
    _launch(_silu_mul_cols_kernel, (triton.cdiv(m, bt), triton.cdiv(inter, 128)), triton_pdl(out), data, out,
            m, inter, data.stride(1), out.stride(0), BT=bt, BC=128, num_warps=4)
    sums.release()
    return out
