"""Paged KV cache: a block allocator with reference counts and prefix caching, and the KV tensors.

A sequence's k/v live in fixed-size blocks listed in its block table. Full blocks are content-
addressed by a hash chained over their tokens and all earlier tokens, so two requests that share
a prefix (a chat system prompt) share its blocks. A freed block keeps its contents and hash until
it is handed out again (least recently freed first), so a later request can still hit it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from server.engine.sequence import Sequence


class OutOfBlocks(RuntimeError):
    pass


def block_hash(parent: int | None, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None


class BlockAllocator:
    """Integer bookkeeping only (no tensors), so the scheduler is testable without a model."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [_Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_queries = 0  # full prompt blocks looked up
        self.prefix_hits = 0  # of those, found in the cache

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        if not self.free:
            raise OutOfBlocks("no free KV blocks")
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its old contents from the prefix cache
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq.num_tokens) <= self.num_free

    def allocate(self, seq: Sequence) -> int:
        """Give `seq` blocks for all its current tokens; returns how many tokens were already cached.

        Only whole blocks are shared, and never the block holding the last token (its logits are
        needed, so at least one token is always computed).
        """
        assert not seq.block_table, f"{seq.request_id} already has blocks"
        tokens = seq.all_ids
        needed = self.blocks_needed(len(tokens))
        if needed > self.num_free:
            raise OutOfBlocks(f"{needed} blocks needed, {self.num_free} free")
        parent = None
        cached_tokens = 0
        # prompt logprobs need every prompt position computed, so such requests skip the cache
        hashing = self.enable_prefix_caching and seq.params.prompt_logprobs is None
        for b in range(needed):
            chunk = tokens[b * self.block_size:(b + 1) * self.block_size]
            full = len(chunk) == self.block_size and (b + 1) * self.block_size < len(tokens)
            h = block_hash(parent, chunk) if hashing and full else None
            if h is not None:
                self.prefix_queries += 1
                hit = self.cached.get(h)
                if hit is not None and cached_tokens == b * self.block_size:
                    self._ref(hit)
                    seq.block_table.append(hit)
                    cached_tokens += self.block_size
                    self.prefix_hits += 1
                    parent = h
                    continue
            seq.block_table.append(self._take())  # hashed once its k/v are computed
            parent = h
        return cached_tokens

    def _register(self, block_id: int, h: int) -> None:
        self.blocks[block_id].hash = h
        self.cached.setdefault(h, block_id)

    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq.num_tokens) <= len(seq.block_table) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make room for the sequence's newest token (called before a decode step)."""
        if self.blocks_needed(seq.num_tokens) > len(seq.block_table):
            seq.block_table.append(self._take())

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: content-address blocks that became full (decode output can be shared too)."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        parent = None
        tokens = None
        for b in range(full):
            block = self.blocks[seq.block_table[b]]
            if block.hash is None:
                tokens = tokens or seq.all_ids
                h = block_hash(parent, tokens[b * self.block_size:(b + 1) * self.block_size])
                self._register(block.block_id, h)
            parent = block.hash

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks; blocks nobody else holds go back to the free list."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []


@dataclass
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


class KVCache:
    """k[i], v[i]: [num_blocks + 1, block_size, num_kv_heads, head_dim] for layer i.

    The extra last block (`pad_block`) is never handed out: padded rows of a CUDA-graph batch
    write their k/v there and read it back, so they cannot touch a real sequence's blocks."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.pad_block = num_blocks
        shape = (num_blocks + 1, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]

    @property
    def nbytes(self) -> int:
        return (self.num_blocks + 1) * self.spec.bytes_per_block()
