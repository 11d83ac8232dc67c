"""Batched sampling from our Llama model with a small contiguous KV cache, for data-free calibration.

Not the serving engine: no scheduler, no paging. Each prompt is prefilled on its own, then all
sequences decode in lockstep, one token each per step, each at its own position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant.gptq import cpu_threads_for
from server.models.attention import _attend_one


class _ContiguousCache:
    """Attention backend over per-layer k/v [B, n_kv, max_len, hd]; `lens[b]` tokens cached per row."""

    def __init__(self, num_layers: int, batch: int, max_len: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, batch, n_kv, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)
        self.prefill_row: int | None = None  # set while one row is being prefilled

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.prefill_row is not None:  # q/k/v [P, heads, hd]: one whole prompt
            b = self.prefill_row
            self.k[layer_idx, b, :, :k.shape[0]] = k.transpose(0, 1)
            self.v[layer_idx, b, :, :v.shape[0]] = v.transpose(0, 1)
            return _attend_one(q, k, v)
        batch, n_heads, hd = q.shape  # decode: one new token per row
        rows = torch.arange(batch, device=q.device)
        self.k[layer_idx, rows, :, self.lens] = k
        self.v[layer_idx, rows, :, self.lens] = v
        span = int(self.lens.max()) + 1
        ks = self.k[layer_idx, :, :, :span]  # [B, n_kv, S, hd], a view
        vs = self.v[layer_idx, :, :, :span]
        n_kv = ks.shape[1]
        # the query heads sharing a kv head become that head's query rows: no k/v copies
        qg = q.view(batch, n_kv, n_heads // n_kv, hd)
        mask = torch.arange(span, device=q.device).unsqueeze(0) <= self.lens.unsqueeze(1)
        o = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=mask[:, None, None, :])
        return o.reshape(batch, n_heads, hd)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, g: torch.Generator) -> torch.Tensor:
    """logits float32 [B, V] -> int64 [B]. Sampling runs on the CPU so a seed gives the same ids
    on every device."""
    logits = logits.float().cpu()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=g).squeeze(1)


@torch.no_grad()
def generate(model: nn.Module, prompts: list[torch.Tensor], seq_len: int, seed: int = 0,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 32,
             device: torch.device | str | None = None) -> torch.Tensor:
    """Continue every prompt (int64 [P_i], 1 <= P_i < seq_len) to seq_len tokens.

    model  server.models.llama.LlamaForCausalLM on `device` (default: its device)
    Returns int64 [len(prompts), seq_len] on the CPU (prompt tokens included).
    """
    device = torch.device(device) if device is not None else model.device
    with cpu_threads_for(device, 0):  # decode steps are many small ops (see cpu_threads_for)
        return _generate(model, prompts, seq_len, seed, temperature, top_p, batch_size, device)


def _generate(model: nn.Module, prompts: list[torch.Tensor], seq_len: int, seed: int,
              temperature: float, top_p: float, batch_size: int, device: torch.device) -> torch.Tensor:
    cfg = model.config
    out = torch.empty(len(prompts), seq_len, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    for b0 in range(0, len(prompts), batch_size):
        chunk = prompts[b0:b0 + batch_size]
        for p in chunk:
            if not 1 <= p.numel() < seq_len:
                raise ValueError(f"prompt of {p.numel()} tokens; need 1..{seq_len - 1}")
        lens = [p.numel() for p in chunk]
        max_len = seq_len + max(lens) - min(lens)  # rows with longer prompts run past seq_len
        cache = _ContiguousCache(cfg.num_hidden_layers, len(chunk), max_len, cfg.num_key_value_heads,
                                 cfg.head_dim, model.dtype, device)
        seqs = [p.tolist() for p in chunk]
        last = []
        for b, p in enumerate(chunk):
            cache.prefill_row = b
            hidden = model(p.to(device), torch.arange(p.numel(), device=device), cache)
            last.append(hidden[-1])
            cache.lens[b] = p.numel()
        cache.prefill_row = None
        logits = model.compute_logits(torch.stack(last))
        while min(len(s) for s in seqs) < seq_len:
            nxt = _sample(logits, temperature, top_p, g)
            for b, t in enumerate(nxt.tolist()):
                seqs[b].append(t)
            positions = cache.lens.clone()
            hidden = model(nxt.to(device), positions, cache)
            cache.lens += 1
            logits = model.compute_logits(hidden)
        for b, s in enumerate(seqs):
            out[b0 + b] = torch.tensor(s[:seq_len])
    return out
