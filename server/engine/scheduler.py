"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget. Running sequences go first, oldest first: a decoding sequence
takes one token, a sequence still prefilling takes the next chunk of its prompt (chunked prefill:
a long prompt never stalls the others for more than one budget). Waiting sequences are admitted
in arrival order while the budget, the sequence limit and free KV blocks allow; a request's
blocks for its whole prompt are reserved at admission (shared full blocks come from the prefix
cache). When a decoding sequence needs a new block and none is free, the newest running sequence
is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.engine.kv_cache import BlockAllocator
from server.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int = 2048
    admission_watermark: float = 0.01  # keep this fraction of blocks free when admitting


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens whose k/v this step computes, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this step ends at the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_decode_only(self) -> bool:
        return all(s.num_new_tokens == 1 for s in self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._watermark = int(allocator.num_blocks * config.admission_watermark)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        need = self.allocator.blocks_needed(seq.num_tokens + 1)
        if need > self.allocator.num_blocks:
            raise ValueError(f"request {seq.request_id} needs {need} KV blocks, the cache has "
                             f"{self.allocator.num_blocks}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq: Sequence, reason: FinishReason = FinishReason.ABORT) -> None:
        """Finish `seq` now and free its blocks (waiting or running)."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
            self.allocator.free_seq(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.finish(reason)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining == 1:
                while not self.allocator.can_append(seq):
                    victim = self.running[-1]
                    self._preempt(victim)
                    batch.preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status != SequenceStatus.RUNNING:
                    continue
                self.allocator.append_slot(seq)
            n = min(remaining, budget)
            batch.seqs.append(ScheduledSeq(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            need = self.allocator.blocks_needed(seq.num_tokens)
            if need > self.allocator.num_free - (self._watermark if self.running else 0):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = self.allocator.allocate(seq)
            seq.num_cached_prompt_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            batch.seqs.append(ScheduledSeq(seq, n))
            budget -= n
        return batch

    def update(self, batch: ScheduledBatch, sampled: dict[int, int],
               eos_ids: frozenset[int]) -> list[Sequence]:
        """Record a finished step. `sampled` maps id(seq) -> new token for sequences that sampled.

        Returns the sequences that finished in this step (their blocks are already freed)."""
        finished = []
        for item in batch.seqs:
            seq = item.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens += item.num_new_tokens
            token = sampled.get(id(seq))
            if token is not None:
                seq.output_ids.append(token)
                reason = self._stop_reason(seq, token, eos_ids)
                if reason is not None:
                    self.running.remove(seq)
                    self.allocator.free_seq(seq)
                    seq.finish(reason)
                    finished.append(seq)
                    continue
            self.allocator.register_full_blocks(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int, eos_ids: frozenset[int]) -> FinishReason | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in eos_ids):
            return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None
