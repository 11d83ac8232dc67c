"""CUDA graphs for decode steps: one graph per captured batch size, replayed with padded inputs.

A decode step runs the whole model for B tokens: hundreds of small kernel launches whose CPU cost
dominates at small B. Each captured size owns static input buffers (token ids, positions, KV
slots, block tables, context lengths) and a static logits output; a step copies its inputs into
the buffers of the smallest captured size >= B and replays. Padding rows write to the KV cache's
reserved pad block and attend over it alone, so they never touch a real sequence.
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
        self.logits: dict[int, torch.Tensor] = {}
        pool = None
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for size in reversed(self.batch_sizes):
                attn = runner.attention(self._meta(size))
                for _ in range(2):  # warm-up outside capture (lazy inits, autotuning)
                    self._forward(size, attn)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[size] = self._forward(size, attn)
                pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.current_stream(dev).wait_stream(stream)
        torch.cuda.synchronize(dev)
        log.info("captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    def _meta(self, size: int) -> PagedMetadata:
        return PagedMetadata(slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
                             context_lens=self.context_lens[:size], query_lens=[1] * size,
                             context_lens_list=[1] * size)

    def _forward(self, size: int, attn) -> torch.Tensor:
        model = self.runner.model
        hidden = model(self.input_ids[:size], self.positions[:size], attn)
        return model.compute_logits(hidden)

    def can_run(self, batch: int) -> bool:
        return batch <= self.batch_sizes[-1]

    def run(self, items: list["ScheduledSeq"]) -> torch.Tensor:
        """Decode one token for each item (all have num_new_tokens == 1): logits [B, V] float32."""
        n = len(items)
        size = next(s for s in self.batch_sizes if s >= n)
        bs = self.runner.block_size
        width = self.block_tables.shape[1]
        ids, pos, slots, ctx = [], [], [], []
        tables = torch.full((size, width), self.runner.kv.pad_block, dtype=torch.int32)
        for row, it in enumerate(items):
            seq = it.seq
            p = seq.num_computed_tokens
            table = seq.block_table
            ids.append(seq.token_at(p))
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            ctx.append(p + 1)
            tables[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
        pad = size - n
        host = torch.tensor([ids + [0] * pad, pos + [0] * pad, slots + [self.pad_slot] * pad],
                            dtype=torch.long)
        self.input_ids[:size].copy_(host[0], non_blocking=True)
        self.positions[:size].copy_(host[1], non_blocking=True)
        self.slot_mapping[:size].copy_(host[2], non_blocking=True)
        self.context_lens[:size].copy_(torch.tensor(ctx + [1] * pad, dtype=torch.int32),
                                       non_blocking=True)
        self.block_tables[:size].copy_(tables, non_blocking=True)
        self.graphs[size].replay()
        return self.logits[size][:n]
