"""The q/k/v projection's reader: its output (or its unconverted fp32 sums) -> rotated q, k and v.

    qkv_rotary(qkv, nh, nkv, D, cos, sin, kv_slots=None)   [T, (nh + 2 nkv) D] -> q [T, nh, D],
                                                           k [T, nkv, D], v [T, nkv, D]

Given the projection's Sums (quant.sums: rows from the GEMV, up to 16 tokens; [column][token slot]
from the Hopper GEMM, 9-128 tokens, read by a kernel of its own along the slots, as
server.models.column_sums reads them) one Triton kernel rounds them as the matmul's y would have
been, zeroes them behind, rotates q and k (as fused.rotary_, bit for bit) and copies v; given
`KVSlots` it also stores k and v in the paged KV cache, so the attention skips its own cache
write. Otherwise q and k are rotated in place in the projection's output (fused.rotary_).
Launched with PDL on sm_90+ (server.models.pdl): the tokens' cos/sin and cache slots are loaded
before the wait.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from quant.sums import Sums
from server.models.column_sums import is_columns
from server.models.fused import rotary_
from server.models.pdl import launch_kwargs, pdl_launch, pdl_wait, triton_pdl
from server.models.triton_env import NO_FMA, use_triton

try:
    import triton
    import triton.language as tl

    from server.models.column_sums import load_columns
    from server.models.fused import load_cos_sin, rotate_halves

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


# Heads (of head_dim columns) per program of the q/k/v sums reader: a token's row is spread over
# (nh + 2 nkv) / this programs, so at batch 1 its 48 KB (7B) of fp32 sums are read by several SMs at
# once, not one. A power of two; QUANTSERVE_QKV_HEADS overrides it (benchmarks).
QKV_HEADS_PER_PROGRAM = int(os.environ.get("QUANTSERVE_QKV_HEADS", "4"))
if QKV_HEADS_PER_PROGRAM < 1 or QKV_HEADS_PER_PROGRAM & (QKV_HEADS_PER_PROGRAM - 1):
    raise ValueError(f"QUANTSERVE_QKV_HEADS must be a power of two, got {QKV_HEADS_PER_PROGRAM}")


if HAVE_TRITON:

    @triton.jit
    def _qkv_sums_rotary_kernel(s_ptr, out_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, stride_s,
                                stride_o, stride_ct, stride_slot, n_q, n_rot, n_all, HALF: tl.constexpr,
                                HB: tl.constexpr, TO_CACHE: tl.constexpr, PDL: tl.constexpr):
        # Token t, heads HB*j .. HB*j+HB-1 of its row of fp32 q|k|v sums (n_all = nh + 2 nkv heads
        # of 2 HALF columns; the first n_q are q, then k up to n_rot, then v): rounded as the
        # matmul's y, q and k heads rotated as _rotary_kernel does, v heads copied; the sums are
        # zeroed behind. TO_CACHE: k and v also go to the token's slot of the paged cache (what
        # _cache_write would store: rows of nkv * 2 HALF elements, stride_slot apart).
        pdl_launch(PDL)
        t = tl.program_id(0)
        h = tl.program_id(1) * HB + tl.arange(0, HB)
        d = tl.arange(0, HALF)
        # before the wait: the token's cos/sin and cache slot (inputs no kernel of the chain writes)
        c1, s1, c2, s2 = load_cos_sin(cos_ptr, sin_ptr, t * stride_ct, HALF)
        if TO_CACHE:
            row = tl.load(slot_ptr + t).to(tl.int64) * stride_slot
        pdl_wait(PDL)
        hm = (h < n_all)[:, None]
        col = h[:, None] * (2 * HALF) + d[None, :]
        p1 = s_ptr + t * stride_s + col
        x1 = tl.load(p1, mask=hm, other=0.0)
        x2 = tl.load(p1 + HALF, mask=hm, other=0.0)
        tl.debug_barrier()  # every thread's loads before any zero store (sums_zeroing_barrier)
        zero = tl.zeros([HB, HALF], dtype=tl.float32)
        tl.store(p1, zero, mask=hm)
        tl.store(p1 + HALF, zero, mask=hm)
        x1 = x1.to(out_ptr.dtype.element_ty)
        x2 = x2.to(out_ptr.dtype.element_ty)
        y1, y2 = rotate_halves(x1, x2, c1, s1, c2, s2)
        rot = (h < n_rot)[:, None]
        z1 = tl.where(rot, y1, x1)
        z2 = tl.where(rot, y2, x2)
        o1 = out_ptr + t * stride_o + col
        tl.store(o1, z1, mask=hm)
        tl.store(o1 + HALF, z2, mask=hm)
        if TO_CACHE:
            is_v = (h >= n_rot)[:, None]
            # the head's place in its cache row: h - n_q for k heads, h - n_rot for v heads
            at = row + (h[:, None] - tl.where(is_v, n_rot, n_q)) * (2 * HALF) + d[None, :]
            to_k = hm & (h >= n_q)[:, None] & (h < n_rot)[:, None]
            to_v = hm & is_v
            tl.store(kc_ptr + at, z1.to(kc_ptr.dtype.element_ty), mask=to_k)
            tl.store(kc_ptr + at + HALF, z2.to(kc_ptr.dtype.element_ty), mask=to_k)
            tl.store(vc_ptr + at, z1.to(vc_ptr.dtype.element_ty), mask=to_v)
            tl.store(vc_ptr + at + HALF, z2.to(vc_ptr.dtype.element_ty), mask=to_v)

    @triton.jit
    def _qkv_cols_rotary_kernel(s_ptr, out_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, M, slots,
                                stride_o, stride_ct, stride_slot, n_q, n_rot, HALF: tl.constexpr,
                                BT: tl.constexpr, TO_CACHE: tl.constexpr, PDL: tl.constexpr):
        # Tokens BT*i .. BT*i+BT-1 of head h of the [column][slot] q|k|v sums (element (t, c) at
        # c * slots + t; heads as in _qkv_sums_rotary_kernel): loaded along the slots, rounded as the
        # matmul's y, zeroed behind, q and k heads rotated by each token's cos/sin, v copied; rows
        # of out, and with TO_CACHE k and v also in the tokens' cache slots.
        pdl_launch(PDL)
        toks = tl.program_id(0) * BT + tl.arange(0, BT)
        h = tl.program_id(1)
        d = tl.arange(0, HALF)
        tm = toks < M
        m2 = tm[:, None] & (d[None, :] < HALF)
        # before the wait: the tokens' cos/sin and cache slots (inputs no kernel of the chain writes)
        cs = toks[:, None] * stride_ct + d[None, :]
        c1 = tl.load(cos_ptr + cs, mask=m2, other=0.0)
        s1 = tl.load(sin_ptr + cs, mask=m2, other=0.0)
        c2 = tl.load(cos_ptr + cs + HALF, mask=m2, other=0.0)
        s2 = tl.load(sin_ptr + cs + HALF, mask=m2, other=0.0)
        if TO_CACHE:
            row = tl.load(slot_ptr + toks, mask=tm, other=0).to(tl.int64) * stride_slot
        pdl_wait(PDL)
        col = h * (2 * HALF) + d
        x1 = load_columns(s_ptr, toks, col, m2, slots).to(out_ptr.dtype.element_ty)
        x2 = load_columns(s_ptr, toks, col + HALF, m2, slots).to(out_ptr.dtype.element_ty)
        y1, y2 = rotate_halves(x1, x2, c1, s1, c2, s2)
        z1 = tl.where(h < n_rot, y1, x1)
        z2 = tl.where(h < n_rot, y2, x2)
        o1 = out_ptr + toks[:, None] * stride_o + col[None, :]
        tl.store(o1, z1, mask=m2)
        tl.store(o1 + HALF, z2, mask=m2)
        if TO_CACHE:
            # the head's place in its cache row: h - n_q for k heads, h - n_rot for v heads
            is_v = h >= n_rot
            at = row[:, None] + (h - tl.where(is_v, n_rot, n_q)) * (2 * HALF) + d[None, :]
            to_k = m2 & (h >= n_q) & (h < n_rot)
            to_v = m2 & is_v
            tl.store(kc_ptr + at, z1.to(kc_ptr.dtype.element_ty), mask=to_k)
            tl.store(kc_ptr + at + HALF, z2.to(kc_ptr.dtype.element_ty), mask=to_k)
            tl.store(vc_ptr + at, z1.to(vc_ptr.dtype.element_ty), mask=to_v)
            tl.store(vc_ptr + at + HALF, z2.to(vc_ptr.dtype.element_ty), mask=to_v)


@dataclass(eq=False)
class KVSlots:
    """Where one layer's new k and v rows go: k_cache / v_cache [blocks, block_size, nkv, D] (each
    slot's nkv * D elements contiguous), slot_mapping int64 [T] (flat slot of each token). Whoever
    writes them sets `stored`; the attention then does not write them again."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    stored: bool = False

    def fits(self, tokens: int, nkv: int, d: int, device: torch.device) -> bool:
        """Whether a kernel writing `tokens` rows of nkv heads x d can store them here."""
        kc, vc, slots = self.k_cache, self.v_cache, self.slot_mapping
        return (kc.shape[2:] == (nkv, d) and vc.shape == kc.shape and kc.stride()[2:] == (d, 1)
                and vc.stride() == kc.stride() and slots.dtype == torch.int64 and slots.shape == (tokens,)
                and kc.device == vc.device == slots.device == device)


def qkv_rotary(qkv: torch.Tensor | Sums, num_heads: int, num_kv_heads: int, head_dim: int,
               cos: torch.Tensor, sin: torch.Tensor,
               kv_slots: KVSlots | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused q|k|v projection's output [T, (nh + 2 * nkv) * D] -> (q [T, nh, D], k [T, nkv, D],
    v [T, nkv, D]) with q and k rotated by cos/sin [T, 1, D] (as rotary_); views of one [T, N]
    tensor. qkv may be the projection's unconverted Sums: one kernel converts (and zeroes) it,
    rotates q and k and copies v, and, given kv_slots, also stores k and v in the paged cache
    (kv_slots.stored tells whether it did; otherwise the attention writes them)."""
    d = head_dim
    if isinstance(qkv, Sums):
        if not use_triton(qkv.data, qkv.dtype) or d & (d - 1):
            qkv = qkv.materialize()
        else:
            return _qkv_sums(qkv, num_heads, num_kv_heads, d, cos, sin, kv_slots)
    q, k, v = _split_heads(qkv, num_heads, num_kv_heads, d)
    q, k = rotary_(q, k, cos, sin)
    return q, k, v


def _qkv_sums(sums: Sums, nh: int, nkv: int, d: int, cos: torch.Tensor, sin: torch.Tensor,
              kv_slots: KVSlots | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv_rotary of Sums on the Triton path: rows (a token's heads a program) or [column][slot]
    (a head's block of tokens a program)."""
    t, n = sums.shape
    data = sums.data
    out = torch.empty(t, n, dtype=sums.dtype, device=sums.device)
    cos2, sin2 = cos.reshape(t, d), sin.reshape(t, d)
    pdl = triton_pdl(out)
    n_all = nh + 2 * nkv
    to_cache = kv_slots is not None and kv_slots.fits(t, nkv, d, out.device)
    kc, vc, slots = (kv_slots.k_cache, kv_slots.v_cache, kv_slots.slot_mapping) if to_cache else (out,) * 3
    stride_slot = kc.stride(1) if to_cache else 0
    if is_columns(sums):
        bt = min(16, triton.next_power_of_2(t))
        _qkv_cols_rotary_kernel[(triton.cdiv(t, bt), n_all)](
            data, out, cos2, sin2, kc, vc, slots, t, data.stride(1), out.stride(0), cos2.stride(0),
            stride_slot, nh, nh + nkv, HALF=d // 2, BT=bt, TO_CACHE=to_cache, PDL=pdl, num_warps=4,
            **NO_FMA, **launch_kwargs(pdl))
    else:
        hb = QKV_HEADS_PER_PROGRAM
        _qkv_sums_rotary_kernel[(t, triton.cdiv(n_all, hb))](
            data, out, cos2, sin2, kc, vc, slots, data.stride(0), out.stride(0), cos2.stride(0),
            stride_slot, nh, nh + nkv, n_all, HALF=d // 2, HB=hb, TO_CACHE=to_cache, PDL=pdl,
            num_warps=max(1, min(4, hb * d // 256)), **NO_FMA, **launch_kwargs(pdl))
    if to_cache:
        kv_slots.stored = True
    sums.release()
    return _split_heads(out, nh, nkv, d)


def _split_heads(qkv: torch.Tensor, nh: int, nkv: int, d: int):
    t = qkv.shape[0]
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
    return q.view(t, nh, d), k.view(t, nkv, d), v.view(t, nkv, d)
