"""Paged decode attention in Triton (flash-decoding: split the context, then combine).

One query token per sequence attends over its cached context, read straight from the paged KV
cache through the block table (no gather copy). Stage 1 runs one program per (sequence, kv head,
split) and handles all query heads of the kv head's group (padded to 16 rows so q.k and p.v run as
tensor-core dots), so each k/v row is read once; stage 2 merges the splits' partial softmaxes.

How many splits: enough programs to fill the GPU (~4 per SM), at most one per PARTITION tokens of
the longest context the engine allows. A sequence's context is cut into that many equal runs of
whole BLOCK_N-token iterations, so a split's work follows the real context, not the maximum one;
splits past a short context return at once. At one split (a large batch, or a short max length)
stage 1 normalises and writes the output itself and stage 2 is not launched. Before (v10) the grid
had one program per PARTITION tokens of the maximum length: a server sized for 4096-token contexts
launched 16 programs per sequence and kv head whatever the context, and at 256 sequences those
~131 K mostly empty programs cost more than the attention itself.

The split count depends only on (batch, kv heads, the partition cap, the SM count), never on the
data, so both launches are CUDA-graph safe.

Shapes: q [B, n_heads, D]; k_cache / v_cache [num_blocks, block_size, n_kv_heads, D];
block_tables int32 [B, W]; context_lens int32 [B] (>= 1) -> out [B, n_heads, D] in q's dtype.
"""

from __future__ import annotations

import math

import torch

from server.models.pdl import launch_kwargs, pdl_enter, pdl_launch, pdl_wait, triton_pdl

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

PARTITION = 256  # the fewest context tokens per split at the longest context (caps the splits)
BLOCK_N = 64  # tokens per inner iteration
PROGRAMS_PER_SM = 4  # stage-1 programs wanted per SM before the context is split
INTERPRETER_SMS = 4  # what decode_splits assumes for CPU tensors (TRITON_INTERPRET=1, tests)

if HAVE_TRITON:

    @triton.jit
    def _split_run(ctx, split, splits, BLOCK: tl.constexpr):
        """[start, end) of `split`'s run of a ctx-token context (whole BLOCK iterations each)."""
        run = tl.cdiv(tl.cdiv(ctx, splits), BLOCK) * BLOCK
        start = split * run
        return start, tl.minimum(start + run, ctx)

    @triton.jit
    def _kv_rows(bt_ptr, b, kvh, t, tmask, stride_btb, stride_kb, stride_ks, stride_kh,
                 KV_BLOCK: tl.constexpr):
        """Element offsets of tokens t's k/v rows (head kvh of sequence b) through the block table."""
        blk = tl.load(bt_ptr + b * stride_btb + t // KV_BLOCK, mask=tmask, other=0)
        return blk.to(tl.int64) * stride_kb + (t % KV_BLOCK) * stride_ks + kvh * stride_kh

    @triton.jit
    def _attend_block(q, k, v, tmask, m, l, acc, scale):
        """One BLOCK of keys folded into the running softmax (m, l) and output sums acc."""
        s = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, BLOCK] on the tensor cores
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l = l * alpha + tl.sum(p, axis=1)
        return m_new, l, acc

    @triton.jit
    def _decode_partial(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, acc_ptr, ml_ptr, out_ptr,
                        scale, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh,
                        stride_btb, stride_ob, stride_oh, splits,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                        KV_BLOCK: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
        pdl_launch(PDL)  # at one split o_proj's matmul comes next (server.models.pdl)
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        d = tl.arange(0, HEAD_DIM)
        # Before the wait: the context length, the first block's rows of the block table, and its
        # k/v rows of earlier steps. Only the newest token's row (ctx - 1) is this step's: the kernel
        # before this one may still be storing it, so it is loaded after the wait (server.models.pdl).
        ctx = tl.load(ctx_ptr + b)
        start, end = _split_run(ctx, split, splits, BLOCK)
        t = start + tl.arange(0, BLOCK)
        tmask = t < end
        row = _kv_rows(bt_ptr, b, kvh, t, tmask, stride_btb, stride_kb, stride_ks, stride_kh, KV_BLOCK)
        old = (tmask & (t < ctx - 1))[:, None]
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=old, other=0.0)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=old, other=0.0)
        pdl_wait(PDL)
        if start < ctx:  # splits past a short context do nothing; stage 2 skips them too
            g = tl.arange(0, GROUP_PAD)
            heads = kvh * GROUP + g
            gmask = g < GROUP
            q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                        mask=gmask[:, None], other=0.0)
            new = (tmask & (t == ctx - 1))[:, None]  # in the last split's last block, if anywhere
            k = tl.where(new, tl.load(k_ptr + row[:, None] + d[None, :], mask=new, other=0.0), k)
            v = tl.where(new, tl.load(v_ptr + row[:, None] + d[None, :], mask=new, other=0.0), v)
            m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
            l = tl.zeros([GROUP_PAD], tl.float32)
            acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
            m, l, acc = _attend_block(q, k, v, tmask, m, l, acc, scale)
            for t0 in range(start + BLOCK, end, BLOCK):  # longer runs: the rest after the wait
                t = t0 + tl.arange(0, BLOCK)
                tmask = t < end
                row = _kv_rows(bt_ptr, b, kvh, t, tmask, stride_btb, stride_kb, stride_ks, stride_kh,
                               KV_BLOCK)
                k = tl.load(k_ptr + row[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
                v = tl.load(v_ptr + row[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
                m, l, acc = _attend_block(q, k, v, tmask, m, l, acc, scale)
            if SINGLE:  # one split, the whole context: this is the output
                o = acc / l[:, None]
                tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                         o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
            else:
                base = (b * (tl.num_programs(1) * GROUP) + heads) * splits + split
                tl.store(acc_ptr + base[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
                tl.store(ml_ptr + base * 2, m, mask=gmask)
                tl.store(ml_ptr + base * 2 + 1, l, mask=gmask)

    @triton.jit
    def _decode_combine(acc_ptr, ml_ptr, ctx_ptr, out_ptr, stride_ob, stride_oh, num_heads, splits,
                        HEAD_DIM: tl.constexpr, NP_PAD: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
        pdl_launch(PDL)  # o_proj's matmul may start loading its weights (server.models.pdl)
        b = tl.program_id(0)
        h = tl.program_id(1)
        p = tl.arange(0, NP_PAD)
        d = tl.arange(0, HEAD_DIM)
        ctx = tl.load(ctx_ptr + b)  # step metadata: before the wait
        start, _ = _split_run(ctx, p, splits, BLOCK)
        pmask = (p < splits) & (start < ctx)  # the splits stage 1 wrote
        pdl_wait(PDL)
        base = (b * num_heads + h) * splits + p
        m = tl.load(ml_ptr + base * 2, mask=pmask, other=float("-inf"))
        l = tl.load(ml_ptr + base * 2 + 1, mask=pmask, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(l > 0, tl.exp(m - m_max), 0.0)
        acc = tl.load(acc_ptr + base[:, None] * HEAD_DIM + d[None, :], mask=pmask[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def max_partitions(max_context: int) -> int:
    """The split cap for contexts of up to max_context tokens: one per PARTITION tokens."""
    return max(1, math.ceil(max_context / PARTITION))


_SMS: dict[int, int] = {}


def decode_splits(batch: int, num_kv: int, num_partitions: int, device: torch.device) -> int:
    """Splits per (sequence, kv head): the fewest that give PROGRAMS_PER_SM stage-1 programs per SM,
    within [1, num_partitions]. A function of the shapes only (CUDA-graph safe)."""
    if device.type != "cuda":  # Triton's interpreter on the CPU (tests): a small GPU's worth
        sms = INTERPRETER_SMS
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        sms = _SMS.get(index)
        if sms is None:
            sms = _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    want = -(-PROGRAMS_PER_SM * sms // max(1, batch * num_kv))
    return max(1, min(num_partitions, want))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           num_partitions: int, out: torch.Tensor | None = None,
                           splits: int | None = None) -> torch.Tensor:
    """Decode attention over a paged cache (see module docstring for shapes).

    `num_partitions` caps the splits per sequence (max_partitions of the engine's max length: a
    fixed value keeps the launches CUDA-graph safe). `splits` overrides the choice (tests)."""
    batch, num_heads, head_dim = q.shape
    _, kv_block, num_kv, _ = k_cache.shape
    group = num_heads // num_kv
    if splits is None:
        splits = decode_splits(batch, num_kv, num_partitions, q.device)
    if out is None:
        out = torch.empty_like(q)
    if splits > 1:
        acc = torch.empty(batch, num_heads, splits, head_dim, device=q.device, dtype=torch.float32)
        ml = torch.empty(batch, num_heads, splits, 2, device=q.device, dtype=torch.float32)
    else:  # stage 1 writes out itself
        acc = ml = out
    pdl = triton_pdl(q)
    _decode_partial[(batch, num_kv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, acc, ml, out,
        1.0 / math.sqrt(head_dim), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1), splits,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        KV_BLOCK=kv_block, SINGLE=splits == 1, BLOCK=BLOCK_N, PDL=pdl, num_warps=4,
        **launch_kwargs(pdl))
    if splits > 1:
        _decode_combine[(batch, num_heads)](
            acc, ml, context_lens, out, out.stride(0), out.stride(1), num_heads, splits,
            HEAD_DIM=head_dim, NP_PAD=triton.next_power_of_2(splits), BLOCK=BLOCK_N, PDL=pdl,
            num_warps=4, **launch_kwargs(pdl))
    return out


if HAVE_TRITON:

    @triton.jit
    def _cache_write(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_vt, stride_slot,
                     WIDTH: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_enter(PDL)
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < WIDTH
        k = tl.load(k_ptr + t * stride_kt + cols, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + cols, mask=mask)
        tl.store(kc_ptr + slot * stride_slot + cols, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + slot * stride_slot + cols, v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, n_kv, D] (rows may be strided) -> cache slots slot_mapping [T], one launch."""
    t, n_kv, d = k.shape
    if k.stride(2) != 1 or k.stride(1) != d or v.stride(2) != 1 or v.stride(1) != d:
        k_cache.view(-1, n_kv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, n_kv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        return
    width = n_kv * d
    pdl = triton_pdl(k)
    _cache_write[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                       k_cache.stride(1), WIDTH=width, BLOCK=triton.next_power_of_2(width), PDL=pdl,
                       num_warps=4, **launch_kwargs(pdl))
