"""LLMEngine: add / abort requests and step() the model; synchronous, single-threaded.

Each `step()` schedules a batch, runs the model once, samples, updates the sequences, and returns
what every affected request produced plus the step's statistics (read by the metrics). Thread
safety is the async bridge's job (`server.engine.async_engine`), which calls this from one thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from server.config import EngineConfig
from server.engine.cuda_graphs import capture_sizes
from server.engine.kv_cache import BlockAllocator, KVCache, KVCacheSpec
from server.engine.runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import FinishReason, SamplingParams, Sequence, TokenLogprob
from server.models.llama import LlamaForCausalLM

log = logging.getLogger("quantserve.engine")

CPU_DEFAULT_KV_GB = 1.0


@dataclass
class RequestOutput:
    """What one request gained in one step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob | None]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent with the first output only


@dataclass
class FinishedRequest:
    request_id: str
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_output_tokens: int
    queue_seconds: float
    e2e_seconds: float


@dataclass
class EngineStats:
    """One step's measurements, plus the engine's gauges after the step."""

    step_seconds: float = 0.0
    num_prompt_tokens: int = 0  # prompt tokens computed in this step
    num_generation_tokens: int = 0  # tokens sampled in this step
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    time_to_first_token: list[float] = field(default_factory=list)
    inter_token_latency: list[float] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class EngineLimits:
    """Runtime figures measured at start-up (not configuration)."""

    num_kv_blocks: int
    block_size: int
    max_model_len: int
    kv_cache_bytes: int
    cuda_graph_batch_sizes: tuple[int, ...] = ()


class LLMEngine:
    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, eos_token_ids: list[int]) -> None:
        self.model = model
        self.config = config
        mc = model.config
        device = model.device
        kv_dtype = model.dtype
        spec = KVCacheSpec(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim,
                           config.block_size, kv_dtype)
        num_blocks = self._num_kv_blocks(spec, device)
        max_len = config.max_model_len or mc.max_position_embeddings
        max_len = min(max_len, num_blocks * config.block_size - 1)
        self.kv = KVCache(spec, num_blocks, device)
        self.allocator = BlockAllocator(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_len), self.allocator)
        self.runner = ModelRunner(model, self.kv, max_len)
        graph_sizes: list[int] = []
        if device.type == "cuda" and not config.enforce_eager:
            cap = config.max_num_seqs if config.cuda_graph_max_batch is None else config.cuda_graph_max_batch
            if cap < 1:
                raise ValueError(f"cuda_graph_max_batch must be at least 1, got {cap} "
                                 "(enforce_eager turns CUDA graphs off)")
            graph_sizes = self.runner.enable_cuda_graphs(capture_sizes(min(cap, config.max_num_seqs)))
        self.sampler = Sampler(mc.vocab_size)
        self.eos_ids = frozenset(eos_token_ids)
        self.limits = EngineLimits(num_blocks, config.block_size, max_len, self.kv.nbytes,
                                   tuple(graph_sizes))
        self.requests: dict[str, Sequence] = {}
        log.info("engine: %d KV blocks of %d tokens (%.1f MiB), max_model_len %d, cuda graphs %s",
                 num_blocks, config.block_size, self.kv.nbytes / 2**20, max_len, graph_sizes or "off")

    def _num_kv_blocks(self, spec: KVCacheSpec, device: torch.device) -> int:
        per_block = spec.bytes_per_block()
        if self.config.kv_cache_gb is not None:
            budget = self.config.kv_cache_gb * 1024**3
        elif device.type == "cuda":
            torch.cuda.synchronize(device)
            # blocks freed while loading (temporaries, GPTQ buffers moved to the host once the
            # kernels' own layout was built) sit in torch's cache and would count as used
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(device)
            used_by_others = total - free
            budget = total * self.config.gpu_memory_utilization - used_by_others - 512 * 2**20
        else:
            budget = CPU_DEFAULT_KV_GB * 1024**3
        blocks = int(budget // per_block) - 1  # one block is the CUDA-graph padding sink
        if blocks < 2:
            raise RuntimeError(f"no room for the KV cache: {budget / 2**20:.0f} MiB available, "
                               f"{per_block / 2**20:.2f} MiB per block")
        return blocks

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id}")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        limit = self.limits.max_model_len
        if len(prompt_ids) + params.max_tokens > limit:
            raise ValueError(f"this model's maximum context length is {limit} tokens; the request "
                             f"has {len(prompt_ids)} prompt tokens and asks for {params.max_tokens} "
                             f"more ({len(prompt_ids) + params.max_tokens} in all)")
        seq = Sequence(request_id=request_id, prompt_ids=list(prompt_ids), params=params)
        self.scheduler.add(seq)
        self.requests[request_id] = seq
        return seq

    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.abort(seq, reason)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ------------------------------------------------------------------ stepping

    def step(self) -> tuple[list[RequestOutput], EngineStats]:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        stats = EngineStats()
        outputs: list[RequestOutput] = []
        if not batch.is_empty:
            now = time.monotonic()
            decode_tokens = 0
            for it in batch.seqs:
                if it.seq.first_scheduled_time is None:
                    it.seq.first_scheduled_time = now
                if it.num_new_tokens == 1 and it.seq.num_output_tokens > 0 and not it.seq.in_prefill:
                    decode_tokens += 1
            stats.num_prompt_tokens = batch.num_tokens - decode_tokens
            logits, sampling = self.runner.execute(batch)
            sampled: dict[int, int] = {}
            logprobs: dict[int, TokenLogprob | None] = {}
            if sampling:
                tokens, records = self.sampler.sample(logits, sampling)
                for seq, tok, rec in zip(sampling, tokens, records):
                    sampled[id(seq)] = tok
                    logprobs[id(seq)] = rec
            finished = self.scheduler.update(batch, sampled, self.eos_ids)
            now = time.monotonic()
            stats.num_generation_tokens = len(sampled)
            for it in batch.seqs:
                seq = it.seq
                if id(seq) not in sampled:
                    continue
                rec = logprobs[id(seq)]
                if rec is not None:
                    seq.output_logprobs.append(rec)
                first = seq.first_token_time is None
                if first:
                    seq.first_token_time = now
                    stats.time_to_first_token.append(now - seq.arrival_time)
                else:
                    stats.inter_token_latency.append(now - (seq.last_token_time or now))
                seq.last_token_time = now
                outputs.append(RequestOutput(
                    request_id=seq.request_id, new_token_ids=[sampled[id(seq)]], new_logprobs=[rec],
                    finished=seq.is_finished, finish_reason=seq.finish_reason,
                    num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
                    num_cached_tokens=seq.num_cached_prompt_tokens,
                    prompt_logprobs=seq.prompt_logprobs if first and seq.params.prompt_logprobs is not None
                    else None))
            for seq in finished:
                self.requests.pop(seq.request_id, None)
                stats.finished.append(FinishedRequest(
                    seq.request_id, seq.finish_reason, seq.num_prompt_tokens, seq.num_output_tokens,
                    queue_seconds=(seq.first_scheduled_time or now) - seq.arrival_time,
                    e2e_seconds=now - seq.arrival_time))
        stats.step_seconds = time.perf_counter() - t0
        self._fill_gauges(stats)
        return outputs, stats

    def _fill_gauges(self, stats: EngineStats) -> None:
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.kv_blocks_used = self.allocator.num_used
        stats.kv_blocks_total = self.allocator.num_blocks
        stats.num_preemptions_total = self.scheduler.num_preemptions
        stats.prefix_cache_queries_total = self.allocator.prefix_queries
        stats.prefix_cache_hits_total = self.allocator.prefix_hits

    def stats(self) -> EngineStats:
        stats = EngineStats()
        self._fill_gauges(stats)
        return stats

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion, batched (tests and offline use): output ids per prompt."""
        ids = [f"gen-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        seqs = [self.add_request(rid, p, params) for rid, p in zip(ids, prompts)]
        while self.has_unfinished():
            self.step()
        return [s.output_ids for s in seqs]
