"""Timing the CPU bench's models: batch-1 greedy decode over a paged KV cache, prefill, perplexity,
and where one decode step's time goes (bench/cpu.py prints and records them)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from quant.linear import QuantLinear
from server.models.attention import CausalAttention, PagedAttention, PagedMetadata
from server.models.llama import LlamaForCausalLM


# ---------------------------------------------------------------------------- running it

class PagedRun:
    """One sequence over a paged KV cache (block table = blocks 0, 1, 2, ... in order)."""

    def __init__(self, model: LlamaForCausalLM, max_len: int, block_size: int = 16) -> None:
        cfg = model.config
        self.model, self.block_size = model, block_size
        blocks = -(-max_len // block_size)
        shape = (blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kc = [torch.zeros(shape, dtype=model.dtype) for _ in range(cfg.num_hidden_layers)]
        self.vc = [torch.zeros(shape, dtype=model.dtype) for _ in range(cfg.num_hidden_layers)]
        self.len = 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 [n] appended to the sequence -> float32 logits of the last one [1, V]."""
        n, start = ids.shape[0], self.len
        self.len += n
        pos = torch.arange(start, self.len)
        used = -(-self.len // self.block_size)
        meta = PagedMetadata(slot_mapping=pos, block_tables=torch.arange(used, dtype=torch.int32)[None],
                             context_lens=torch.tensor([self.len], dtype=torch.int32), query_lens=[n],
                             context_lens_list=[self.len])
        hidden = self.model(ids, pos, PagedAttention(self.kc, self.vc, meta))
        return self.model.compute_logits(hidden[-1:])


CPU_TIME: dict[str, float] = {}  # process CPU seconds of the last greedy_decode, per token


@torch.inference_mode()
def greedy_decode(model, prompt_ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Prefill the prompt, then `new_tokens` greedy steps; returns (decode tok/s, tokens).

    Also leaves the process CPU time per decoded token in CPU_TIME["decode"]: with one thread it
    is what the wall time would be on an idle core, so it survives a busy machine."""
    run = PagedRun(model, prompt_ids.shape[0] + new_tokens + 1)
    logits = run.step(prompt_ids)
    out = []
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(new_tokens):
        nxt = int(logits.argmax(-1))
        out.append(nxt)
        logits = run.step(torch.tensor([nxt]))
    wall = time.perf_counter() - t0
    CPU_TIME["decode"] = (time.process_time() - c0) / new_tokens
    return new_tokens / wall, out


@torch.inference_mode()
def prefill_rate(model, ids: torch.Tensor) -> float:
    run = PagedRun(model, ids.shape[0] + 1)
    t0 = time.perf_counter()
    run.step(ids)
    return ids.shape[0] / (time.perf_counter() - t0)


@torch.inference_mode()
def hf_greedy_decode(model, prompt_ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """The same measurement for a transformers model (dense, or GPTQModel's): prefill the prompt
    into a DynamicCache, then `new_tokens` greedy steps of one token; returns (tok/s, tokens)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(prompt_ids[None], cache=cache, use_cache=True, logits_to_keep=1)
    tokens = []
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model(torch.tensor([[nxt]]), cache=cache, use_cache=True)
    wall = time.perf_counter() - t0
    CPU_TIME["decode"] = (time.process_time() - c0) / new_tokens
    return new_tokens / wall, tokens


@torch.inference_mode()
def hf_prefill_rate(model, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(ids[None], use_cache=False, logits_to_keep=1)
    return ids.shape[0] / (time.perf_counter() - t0)


def best_of(fn, repeats: int) -> tuple[float, list[float]]:
    vals = [fn() for _ in range(repeats)]
    return max(vals), vals


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int = 512) -> float:
    """Non-overlapping windows of `window` tokens, each scored from scratch (no cache)."""
    nll, count = 0.0, 0
    for s in range(0, ids.shape[0] - 1, window):
        chunk = ids[s:s + window + 1]
        if chunk.shape[0] < 2:
            break
        inp, tgt = chunk[:-1], chunk[1:]
        hidden = model(inp, torch.arange(inp.shape[0]), CausalAttention([inp.shape[0]]))
        logits = model.compute_logits(hidden)
        nll += F.cross_entropy(logits, tgt, reduction="sum").item()
        count += tgt.shape[0]
    return math.exp(nll / count)


# ---------------------------------------------------------------------------- where time goes

@torch.inference_mode()
def decode_profile(model, steps: int = 64, ctx: int = 80) -> dict[str, float]:
    """Microseconds per decode step spent in each part, each part replayed alone at batch 1.

    linears: every projection of every layer through its module (fused q/k/v and gate/up where
    the model has them; dispatch included);
    kernel_only: the same matmuls called straight into the extension; lm_head, attention (paged,
    at `ctx` tokens of context), rmsnorm with residual add (2 per layer + final), rope, silu*mul,
    embedding; step: one whole decode step; other = step minus the parts (views, Python glue)."""
    cfg = model.config
    run = PagedRun(model, ctx + steps + 2)
    run.step(torch.randint(0, cfg.vocab_size, (ctx,)))
    dtype = model.dtype

    def timeit(fn, reps=steps):
        fn()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - t0) / reps)
        return best * 1e6

    parts: dict[str, float] = {}
    tok = torch.tensor([1])
    state = {"n": 0}

    def whole_step():
        if run.len >= ctx + steps:
            run.len = ctx  # rewind: same context length every step
        run.step(tok)

    parts["step"] = timeit(whole_step)
    h = torch.randn(1, cfg.hidden_size, dtype=dtype)
    inter = torch.randn(1, cfg.intermediate_size, dtype=dtype)
    layers = model.model.layers

    def projections(layer):
        """(module, input) of every linear a layer calls: fused q/k/v and gate/up where fused."""
        a, m = layer.self_attn, layer.mlp
        attn = [a.qkv_proj] if a.qkv_proj is not None else [a.q_proj, a.k_proj, a.v_proj]
        mlp = [m.gate_up_proj] if m.gate_up_proj is not None else [m.gate_proj, m.up_proj]
        return [(mod, h) for mod in attn + [a.o_proj] + mlp] + [(m.down_proj, inter)]

    calls = [c for layer in layers for c in projections(layer)]
    parts["linears"] = timeit(lambda: [mod(x) for mod, x in calls])
    if all(isinstance(mod, QuantLinear) and mod.backend == "cpu_int4" for mod, _ in calls):
        from quant import cpu_int4

        raw = [(mod.kernel_state, x, mod.out_features, torch.empty(1, mod.out_features, dtype=dtype))
               for mod, x in calls]
        parts["kernel_only"] = timeit(lambda: [cpu_int4.gemm(s, x, n, out=o) for s, x, n, o in raw])
    parts["lm_head"] = timeit(lambda: model.compute_logits(h))
    q = torch.randn(1, cfg.num_attention_heads, cfg.head_dim, dtype=dtype)
    kv = torch.randn(1, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype)
    pos = torch.tensor([ctx])
    meta = PagedMetadata(slot_mapping=pos, block_tables=torch.arange(-(-(ctx + 1) // 16), dtype=torch.int32)[None],
                         context_lens=torch.tensor([ctx + 1], dtype=torch.int32), query_lens=[1],
                         context_lens_list=[ctx + 1])

    def attention():
        attn = PagedAttention(run.kc, run.vc, meta)
        for i in range(cfg.num_hidden_layers):
            attn(i, q, kv, kv)

    parts["attention"] = timeit(attention)
    norm = layers[0].input_layernorm
    res = torch.randn(1, cfg.hidden_size, dtype=dtype)
    parts["rmsnorm"] = timeit(lambda: [norm(h, res) for _ in range(2 * cfg.num_hidden_layers + 1)])
    from server.models.fused import rotary_, silu_mul

    cos, sin = model.rotary(pos, dtype)
    qkv = torch.randn(1, cfg.q_size + 2 * cfg.kv_size, dtype=dtype)
    qr = qkv[:, :cfg.q_size].view(1, cfg.num_attention_heads, cfg.head_dim)
    kr = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].view(1, cfg.num_key_value_heads, cfg.head_dim)
    parts["rope"] = timeit(lambda: (model.rotary(pos, dtype),
                                    [rotary_(qr, kr, cos, sin) for _ in range(cfg.num_hidden_layers)]))
    gate_up = torch.randn(1, 2 * cfg.intermediate_size, dtype=dtype)
    parts["silu_mul"] = timeit(lambda: [silu_mul(gate_up) for _ in range(cfg.num_hidden_layers)])
    parts["embedding"] = timeit(lambda: model.embed(tok))
    known = sum(v for k, v in parts.items() if k not in ("step", "kernel_only"))
    parts["other"] = parts["step"] - known
    del state
    return {k: round(v, 1) for k, v in parts.items()}
