"""Attention backends: what a decoder layer calls with its q, k, v for one forward.

The model never holds attention state: the caller builds a backend for each forward and passes it
in (`LlamaModel.forward(..., attn=...)`). Tokens of all sequences in a batch are flattened along
one axis T; a backend knows where each sequence's tokens start.

    CausalAttention  no KV cache: each sequence attends causally to itself (tests, eval, calibration)
    PagedAttention   writes the new k/v into a paged KV cache, then attends over each sequence's
                     cached context (the serving engine)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from server.models.qkv_reader import KVSlots


class AttentionBackend(Protocol):
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        """q [T, n_heads, hd], k/v [T, n_kv_heads, hd] (rotary applied) -> o [T, n_heads, hd]."""


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
          causal: bool = False) -> torch.Tensor:
    """q [B, nh, L, hd], k/v [B, nkv, S, hd] -> [B, nh, L, hd]; grouped-query heads are shared."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def causal_mask(q_len: int, ctx_len: int, device: torch.device) -> torch.Tensor | None:
    """bool [q_len, ctx_len]: query i (the last q_len of ctx_len positions) sees keys 0..ctx-q+i.

    None when q_len == ctx_len (plain causal attention, `is_causal` does it)."""
    if q_len == ctx_len:
        return None
    i = torch.arange(q_len, device=device).unsqueeze(1)
    j = torch.arange(ctx_len, device=device).unsqueeze(0)
    return j <= (ctx_len - q_len + i)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One sequence: q [L, nh, hd] are the last L of the S positions in k/v [S, nkv, hd]."""
    mask = causal_mask(q.shape[0], k.shape[0], q.device)
    o = _sdpa(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
              v.transpose(0, 1).unsqueeze(0), mask=mask, causal=mask is None and q.shape[0] > 1)
    return o.squeeze(0).transpose(0, 1)


class CausalAttention:
    """No cache: the flattened tokens are whole sequences of the given lengths, back to back."""

    def __init__(self, seq_lens: list[int]) -> None:
        self.seq_lens = list(seq_lens)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for n in self.seq_lens:
            outs.append(_attend_one(q[start:start + n], k[start:start + n], v[start:start + n]))
            start += n
        return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]


@dataclass
class PagedMetadata:
    """Where one step's tokens go in the paged cache and what each sequence attends to.

    slot_mapping    int64 [T]             flat slot (block * block_size + offset) of each new token
    block_tables    int32 [B, max_blocks] each sequence's blocks, padded with 0
    context_lens    int32 [B]             tokens of the sequence in the cache after this step
    query_lens      list[int] (B)         new tokens of each sequence in this step (sum = T)
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_lens: list[int]
    context_lens_list: list[int]

    @property
    def decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens)


class PagedAttention:
    """Attention over a paged KV cache.

    k_caches[i] / v_caches[i]: [num_blocks, block_size, n_kv_heads, hd] for layer i.
    Decode-only steps run as one masked batched SDPA over gathered blocks; steps with prefill chunks
    run each prefilling sequence on its own and the decoding ones batched.
    """

    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 meta: PagedMetadata, decode_partitions: int | None = None) -> None:
        """decode_partitions: use the Triton paged decode kernel (CUDA) with this fixed number of
        context partitions (see server.models.triton_attention); None: the torch path."""
        self.k_caches = k_caches
        self.v_caches = v_caches
        self.meta = meta
        self.decode_partitions = decode_partitions
        lens = meta.query_lens
        self.decode_rows = [i for i, n in enumerate(lens) if n == 1]
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        self.starts = starts
        device = meta.slot_mapping.device
        self.decode_token_idx = torch.tensor([starts[i] for i in self.decode_rows], device=device,
                                             dtype=torch.long)
        self.decode_row_idx = torch.tensor(self.decode_rows, device=device, dtype=torch.long)
        # CPU float32 decode-only step: one C++ call per layer stores k/v and attends through the
        # block table (server.models.cpu_ops), with the metadata checked once here, not per layer
        self.cpu_plan = None
        if decode_partitions is None and device.type == "cpu" and k_caches and meta.decode_only:
            from server.models.cpu_ops import DecodePlan

            self.cpu_plan = DecodePlan.build(meta.block_tables, meta.context_lens, meta.slot_mapping,
                                             k_caches[0])
        self._kv_slots: dict[int, KVSlots] = {}

    def kv_slots(self, layer_idx: int) -> KVSlots | None:
        """Where layer layer_idx's new k/v rows go, for a kernel before the attention that can store
        them itself (qkv_reader.qkv_rotary); if it does (KVSlots.stored), this layer's call skips its own
        cache write. Only on the Triton path (CUDA), whose cache write it replaces."""
        if self.decode_partitions is None:
            return None
        slots = self._kv_slots[layer_idx] = KVSlots(self.k_caches[layer_idx], self.v_caches[layer_idx],
                                                   self.meta.slot_mapping)
        return slots

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.k_caches[layer_idx], self.v_caches[layer_idx]
        if self.cpu_plan is not None:
            out = self.cpu_plan(q, k, v, kc, vc)
            if out is not None:
                return out
        _, block_size, n_kv, hd = kc.shape
        slots = self._kv_slots.pop(layer_idx, None)
        if slots is not None and slots.stored:
            pass  # the kernel that produced k and v stored them (kv_slots)
        elif self.decode_partitions is not None:  # CUDA + Triton: one fused launch
            from server.models.triton_attention import write_kv

            write_kv(k, v, kc, vc, self.meta.slot_mapping)
        else:
            kc.view(-1, n_kv, hd).index_copy_(0, self.meta.slot_mapping, k.to(kc.dtype))
            vc.view(-1, n_kv, hd).index_copy_(0, self.meta.slot_mapping, v.to(vc.dtype))
        meta = self.meta
        if meta.decode_only:
            return self._decode(q, kc, vc, meta.block_tables, meta.context_lens)
        out = torch.empty_like(q)
        if self.decode_rows:
            out[self.decode_token_idx] = self._decode(
                q[self.decode_token_idx], kc, vc, meta.block_tables[self.decode_row_idx],
                meta.context_lens[self.decode_row_idx])
        for i, n in enumerate(meta.query_lens):
            if n == 1:
                continue
            ctx = meta.context_lens_list[i]
            blocks = meta.block_tables[i, :(ctx + block_size - 1) // block_size].long()
            ks = kc[blocks].reshape(-1, n_kv, hd)[:ctx]
            vs = vc[blocks].reshape(-1, n_kv, hd)[:ctx]
            s = self.starts[i]
            out[s:s + n] = _attend_one(q[s:s + n], ks.to(q.dtype), vs.to(q.dtype))
        return out

    def _decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, block_tables: torch.Tensor,
                context_lens: torch.Tensor) -> torch.Tensor:
        if self.decode_partitions is not None:
            from server.models.triton_attention import paged_decode_attention

            return paged_decode_attention(q, kc, vc, block_tables, context_lens, self.decode_partitions)
        return decode_reference(q, kc, vc, block_tables, context_lens)


def decode_reference(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor) -> torch.Tensor:
    """q [B, nh, hd], one new token per sequence -> [B, nh, hd] (gathers whole block tables)."""
    b = q.shape[0]
    _, block_size, n_kv, hd = kc.shape
    if b == 1:  # one sequence: its blocks, cut to its length, no mask
        ctx = int(context_lens[0])
        blocks = block_tables[0, :(ctx + block_size - 1) // block_size].long()
        ks = kc[blocks].reshape(-1, n_kv, hd)[:ctx].transpose(0, 1).unsqueeze(0).to(q.dtype)
        vs = vc[blocks].reshape(-1, n_kv, hd)[:ctx].transpose(0, 1).unsqueeze(0).to(q.dtype)
        return _sdpa(q.unsqueeze(2), ks, vs).squeeze(2)
    ks = kc[block_tables.long()].reshape(b, -1, n_kv, hd).transpose(1, 2).to(q.dtype)
    vs = vc[block_tables.long()].reshape(b, -1, n_kv, hd).transpose(1, 2).to(q.dtype)
    span = ks.shape[2]
    mask = torch.arange(span, device=q.device).unsqueeze(0) < context_lens.unsqueeze(1)
    o = _sdpa(q.unsqueeze(2), ks, vs, mask=mask[:, None, None, :])
    return o.squeeze(2)
