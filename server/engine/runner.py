"""ModelRunner: owns the model and the KV cache; turns a ScheduledBatch into logits.

For each step it flattens the scheduled tokens of all sequences into one batch (input_ids,
positions, KV slots, block tables, context lengths), runs the model over the paged cache, and
returns float32 logits only for the sequences that sample in this step. On CUDA, decode-only
steps replay CUDA graphs captured at fixed batch sizes (see `server.engine.cuda_graphs`).
"""

from __future__ import annotations

import torch

from server.engine.kv_cache import KVCache
from server.engine.scheduler import ScheduledBatch, ScheduledSeq
from server.engine.sequence import Sequence, TokenLogprob
from server.engine.sampler import token_logprob
from server.models.attention import PagedAttention, PagedMetadata
from server.models.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, max_model_len: int) -> None:
        self.model = model
        self.kv = kv_cache
        self.block_size = kv_cache.spec.block_size
        self.device = model.device
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.decode_partitions = self._triton_partitions(max_model_len)
        self.graphs = None  # set by enable_cuda_graphs()

    def _triton_partitions(self, max_model_len: int) -> int | None:
        """Fixed partition count for the Triton decode kernel, or None to use the torch path."""
        from server.models.triton_attention import HAVE_TRITON, max_partitions

        hd = self.model.config.head_dim
        if self.device.type != "cuda" or not HAVE_TRITON or hd & (hd - 1):
            return None
        return max_partitions(max_model_len)

    def attention(self, meta: PagedMetadata) -> PagedAttention:
        return PagedAttention(self.kv.k, self.kv.v, meta, self.decode_partitions)

    def enable_cuda_graphs(self, batch_sizes: list[int]) -> list[int]:
        """Capture decode graphs (CUDA only); returns the batch sizes captured."""
        from server.engine.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self, batch_sizes)
        return self.graphs.batch_sizes

    def build_metadata(self, items: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, PagedMetadata]:
        """Flattened input_ids [T], positions [T] and the paged-attention metadata for a step."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        bs = self.block_size
        width = max(len(it.seq.block_table) for it in items)
        tables = []
        for it in items:
            seq, start, n = it.seq, it.seq.num_computed_tokens, it.num_new_tokens
            table = seq.block_table
            all_ids = seq.all_ids if n > 1 else None
            for p in range(start, start + n):
                ids.append(all_ids[p] if all_ids is not None else seq.token_at(p))
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(table + [0] * (width - len(table)))
        dev = self.device
        meta = PagedMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            query_lens=query_lens,
            context_lens_list=context_lens,
        )
        return (torch.tensor(ids, dtype=torch.long, device=dev),
                torch.tensor(pos, dtype=torch.long, device=dev), meta)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Run one step. Returns (logits [S, V] float32, the S sequences that sample, in order).

        Sequences that asked for prompt logprobs get them recorded as a side effect."""
        items = batch.seqs
        if self.graphs is not None and batch.is_decode_only and self.graphs.can_run(len(items)):
            logits = self.graphs.run(items)
            return logits, [it.seq for it in items]
        input_ids, positions, meta = self.build_metadata(items)
        hidden = self.model(input_ids, positions, self.attention(meta))
        ends, sampling = [], []
        start = 0
        for it in items:
            end = start + it.num_new_tokens
            if it.seq.params.prompt_logprobs is not None and it.num_new_tokens > 1:
                self._record_prompt_logprobs(it, hidden[start:end])
            if it.samples:
                ends.append(end - 1)
                sampling.append(it.seq)
            start = end
        if not sampling:
            return None, []
        index = torch.tensor(ends, dtype=torch.long, device=hidden.device)
        return self.model.compute_logits(hidden.index_select(0, index)), sampling

    def _record_prompt_logprobs(self, it: ScheduledSeq, hidden: torch.Tensor) -> None:
        """Logits at position p score token p + 1; token 0 of the prompt has no logprob."""
        seq = it.seq
        start = seq.num_computed_tokens
        if not seq.prompt_logprobs:
            seq.prompt_logprobs = [None] * seq.num_prompt_tokens
        logprobs = torch.log_softmax(self.model.compute_logits(hidden), dim=-1)
        top = seq.params.prompt_logprobs or 0
        for j in range(hidden.shape[0]):
            target = start + j + 1
            if target >= seq.num_prompt_tokens:
                break
            seq.prompt_logprobs[target] = token_logprob(logprobs[j], seq.prompt_ids[target], top)


__all__ = ["ModelRunner", "TokenLogprob"]
