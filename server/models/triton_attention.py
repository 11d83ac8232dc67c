"""Paged decode attention in Triton (flash-decoding: split the context, then combine).

One query token per sequence attends over its cached context, read straight from the paged KV
cache through the block table (no gather copy). Stage 1 runs one program per (sequence, kv head,
context partition of PARTITION tokens) and handles all query heads of the kv head's group, so
each k/v row is read once; stage 2 merges the partitions' partial softmaxes. Both grids depend
only on (batch, heads, max partitions), never on the data, so the pair is CUDA-graph safe.

Shapes: q [B, n_heads, D]; k_cache / v_cache [num_blocks, block_size, n_kv_heads, D];
block_tables int32 [B, W]; context_lens int32 [B] (>= 1) -> out [B, n_heads, D] in q's dtype.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

PARTITION = 256  # context tokens per stage-1 program
BLOCK_N = 32  # tokens per inner iteration

if HAVE_TRITON:

    @triton.jit
    def _decode_partial(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, acc_ptr, ml_ptr,
                        scale, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh,
                        stride_btb, num_partitions,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                        KV_BLOCK: tl.constexpr, PART: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        ctx = tl.load(ctx_ptr + b)
        start = part * PART
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + g
        gmask = g < GROUP
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None], other=0.0).to(tl.float32)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        end = tl.minimum(start + PART, ctx)
        for t0 in range(start, end, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            tmask = t < end
            blk = tl.load(bt_ptr + b * stride_btb + t // KV_BLOCK, mask=tmask, other=0)
            row = blk.to(tl.int64) * stride_kb + (t % KV_BLOCK) * stride_ks + kvh * stride_kh
            k = tl.load(k_ptr + row[:, None] + d[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK]
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            v = tl.load(v_ptr + row[:, None] + d[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        base = (b * (tl.num_programs(1) * GROUP) + heads) * num_partitions + part
        tl.store(acc_ptr + base[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
        tl.store(ml_ptr + base * 2, m, mask=gmask)
        tl.store(ml_ptr + base * 2 + 1, l, mask=gmask)

    @triton.jit
    def _decode_combine(acc_ptr, ml_ptr, out_ptr, stride_ob, stride_oh, num_heads, num_partitions,
                        HEAD_DIM: tl.constexpr, NP_PAD: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        p = tl.arange(0, NP_PAD)
        d = tl.arange(0, HEAD_DIM)
        pmask = p < num_partitions
        base = (b * num_heads + h) * num_partitions + p
        m = tl.load(ml_ptr + base * 2, mask=pmask, other=float("-inf"))
        l = tl.load(ml_ptr + base * 2 + 1, mask=pmask, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(l > 0, tl.exp(m - m_max), 0.0)
        acc = tl.load(acc_ptr + base[:, None] * HEAD_DIM + d[None, :], mask=pmask[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def max_partitions(max_context: int) -> int:
    return max(1, math.ceil(max_context / PARTITION))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           num_partitions: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over a paged cache (see module docstring for shapes).

    `num_partitions` must cover the longest context (>= ceil(ctx / PARTITION)); pass a fixed
    value (from the max model length) to keep the launch CUDA-graph safe."""
    batch, num_heads, head_dim = q.shape
    _, kv_block, num_kv, _ = k_cache.shape
    group = num_heads // num_kv
    if out is None:
        out = torch.empty_like(q)
    acc = torch.empty(batch, num_heads, num_partitions, head_dim, device=q.device, dtype=torch.float32)
    ml = torch.empty(batch, num_heads, num_partitions, 2, device=q.device, dtype=torch.float32)
    _decode_partial[(batch, num_kv, num_partitions)](
        q, k_cache, v_cache, block_tables, context_lens, acc, ml,
        1.0 / math.sqrt(head_dim), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), num_partitions,
        GROUP=group, GROUP_PAD=max(2, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        KV_BLOCK=kv_block, PART=PARTITION, BLOCK=BLOCK_N, num_warps=4)
    _decode_combine[(batch, num_heads)](
        acc, ml, out, out.stride(0), out.stride(1), num_heads, num_partitions,
        HEAD_DIM=head_dim, NP_PAD=max(2, triton.next_power_of_2(num_partitions)), num_warps=4)
    return out
