"""CUDA graphs for decode steps: one graph per captured batch size, replayed with padded inputs.

A decode step runs the whole model for B tokens: hundreds of kernel launches and their Python.
Eagerly that host work is as long as the GPU's at any batch (a 7B model on an H100 at 256
sequences: 19-27 ms a step eagerly, 16 ms replayed). The sizes captured (`capture_sizes`) are a
ladder up to the engine's largest decode batch, so no decode step runs eagerly. All sizes share
static input buffers (token ids, positions, KV slots, block tables, context lengths), one float32
logits buffer and one memory pool; a step copies its inputs into the first B rows and replays the
smallest captured size >= B. Padding rows write to the KV cache's reserved pad block and attend
over it alone, so they never touch a real sequence.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from server.models.attention import PagedMetadata

if TYPE_CHECKING:
    from server.engine.runner import ModelRunner
    from server.engine.scheduler import ScheduledSeq

log = logging.getLogger("quantserve.engine")


# Batch sizes captured up to the limit, then the limit itself: fine steps where padding a batch up
# to the next size costs most (small batches are weight-bound, so a padded row is nearly free only
# once the step is large), coarser above. 12: Hopper's quantized linears cost less at 9-12 tokens
# than at 16 (the pipelined GEMV's sums, bench/NOTES.md v27).
_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def capture_sizes(limit: int) -> list[int]:
    """Decode batch sizes to capture so that every batch of 1..limit sequences replays a graph."""
    if limit < 1:
        raise ValueError(f"the largest graph batch must be at least 1, got {limit}")
    sizes = [s for s in _LADDER if s < limit]
    step = _LADDER[-1] - _LADDER[-2]
    while sizes and sizes[-1] >= _LADDER[-1] and sizes[-1] + step < limit:
        sizes.append(sizes[-1] + step)
    return sizes + [limit]


class DecodeGraphs:
    def __init__(self, runner: "ModelRunner", batch_sizes: list[int]) -> None:
        self.runner = runner
        model, kv = runner.model, runner.kv
        dev = runner.device
        self.batch_sizes = sorted(set(batch_sizes))
        top = self.batch_sizes[-1]
        width = runner.max_blocks_per_seq
        bs = runner.block_size
        self.pad_slot = kv.pad_block * bs
        self.input_ids = torch.zeros(top, dtype=torch.long, device=dev)
        self.positions = torch.zeros(top, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((top,), self.pad_slot, dtype=torch.long, device=dev)
        self.block_tables = torch.full((top, width), kv.pad_block, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(top, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.inference_mode(), torch.cuda.stream(stream):
            # one output for every size (a logits tensor per graph would each stay allocated:
            # ~1.5 GB over the ladder to 512 at a 128K vocabulary), as wide as the head's output
            self.logits = torch.empty(top, model.lm_head.out_features, dtype=torch.float32, device=dev)
            for size in reversed(self.batch_sizes):
                attn = runner.attention(self._meta(size))
                for _ in range(2):  # warm-up outside capture (lazy inits, autotuning)
                    self._forward(size, attn)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._forward(size, attn)
                pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.current_stream(dev).wait_stream(stream)
        torch.cuda.synchronize(dev)
        log.info("captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    def _meta(self, size: int) -> PagedMetadata:
        return PagedMetadata(slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
                             context_lens=self.context_lens[:size], query_lens=[1] * size,
                             context_lens_list=[1] * size)

    def _forward(self, size: int, attn) -> None:
        model = self.runner.model
        hidden = model(self.input_ids[:size], self.positions[:size], attn)
        model.compute_logits(hidden, out=self.logits[:size])

    def can_run(self, batch: int) -> bool:
        return batch <= self.batch_sizes[-1]

    def run(self, items: list["ScheduledSeq"]) -> torch.Tensor:
        """Decode one token for each item (all have num_new_tokens == 1): logits [B, V] float32."""
        n = len(items)
        size = next(s for s in self.batch_sizes if s >= n)
        bs = self.runner.block_size
        pad_block = self.runner.kv.pad_block
        ids, pos, slots, ctx, tables = [], [], [], [], []
        for it in items:
            seq = it.seq
            p = seq.num_computed_tokens
            table = seq.block_table
            ids.append(seq.token_at(p))
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            ctx.append(p + 1)
            tables.append(table)
        pad = size - n
        # Only the columns some sequence uses are written (one tensor built from nested lists, not
        # a tensor per row: 0.2 instead of 2.9 ms of host time at 256 sequences). Columns past a
        # row's own table hold stale block ids that attention never reads: it stops at the row's
        # context length, and padding rows (context 1) read column 0, the pad block.
        width = max(len(t) for t in tables)
        tables = [t + [pad_block] * (width - len(t)) for t in tables] + [[pad_block] * width] * pad
        host = torch.tensor([ids + [0] * pad, pos + [0] * pad, slots + [self.pad_slot] * pad],
                            dtype=torch.long)
        self.input_ids[:size].copy_(host[0], non_blocking=True)
        self.positions[:size].copy_(host[1], non_blocking=True)
        self.slot_mapping[:size].copy_(host[2], non_blocking=True)
        self.context_lens[:size].copy_(torch.tensor(ctx + [1] * pad, dtype=torch.int32),
                                       non_blocking=True)
        self.block_tables[:size, :width].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)
        self.graphs[size].replay()
        return self.logits[:n]
