"""Perplexity of a model over a text: the protocol GPTQ papers report on WikiText-2.

The text is tokenised as one stream (WikiText-2's test split joined with "\\n\\n" is exactly the
raw file) and cut into windows of `seq_len` tokens. Non-overlapping windows (the GPTQ protocol,
stride = seq_len): every window is scored on its own, each token predicted from the tokens before it
in its window; a trailing partial window is dropped. Strided windows (stride < seq_len): windows
start every `stride` tokens and only the tokens not scored before count, so every token after the
first window sees at least seq_len - stride tokens of context.

perplexity = exp(sum of NLL over scored tokens / number of scored tokens).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.models.attention import CausalAttention

LOGIT_CHUNK = 2048  # tokens per lm_head + cross-entropy chunk ([chunk, V] float32 at a time)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored
    windows: int
    seq_len: int
    seconds: float


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """int64 [T]: the text as one token stream, no special tokens added."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def _window_starts(num_tokens: int, seq_len: int, stride: int) -> list[int]:
    if num_tokens < seq_len:
        raise ValueError(f"text has {num_tokens} tokens, fewer than one window of seq_len={seq_len}")
    if stride == seq_len:
        return list(range(0, num_tokens - seq_len + 1, seq_len))
    return list(range(0, num_tokens - seq_len + 1, stride))


@torch.no_grad()
def perplexity_of_ids(model: nn.Module, ids: torch.Tensor, seq_len: int = 2048,
                      stride: int | None = None, max_tokens: int | None = None,
                      batch_size: int = 1, device: torch.device | str | None = None,
                      progress: bool = False) -> PerplexityResult:
    """ids int64 [T] -> PerplexityResult over windows of `seq_len` (see the module docstring).

    model        server.models.llama.LlamaForCausalLM, already on `device` (default: its device)
    stride       None or seq_len: non-overlapping windows; smaller: strided windows
    max_tokens   use only the first max_tokens ids (quick runs)
    batch_size   windows per forward
    """
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len={seq_len}, got {stride}")
    ids = ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    device = torch.device(device) if device is not None else model.device
    starts = _window_starts(ids.numel(), seq_len, stride)
    start_time = time.perf_counter()
    total_nll, total_tokens = 0.0, 0
    scored_until = 0  # ids before this position have been scored already (strided windows)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc="perplexity", unit="window")
    for b0 in range(0, len(starts), batch_size):
        batch = starts[b0:b0 + batch_size]
        x = torch.stack([ids[s:s + seq_len] for s in batch]).to(device)  # [nb, L]
        positions = torch.arange(seq_len, device=device).repeat(len(batch))
        hidden = model(x.reshape(-1), positions, CausalAttention([seq_len] * len(batch)))
        hidden = hidden.view(len(batch), seq_len, -1)
        for j, s in enumerate(batch):
            first = max(scored_until, s + 1) - s  # first position of the window to score (>= 1)
            targets = x[j, first:]
            h = hidden[j, first - 1:seq_len - 1]
            for c in range(0, targets.numel(), LOGIT_CHUNK):
                logits = model.compute_logits(h[c:c + LOGIT_CHUNK])
                total_nll += F.cross_entropy(logits, targets[c:c + LOGIT_CHUNK], reduction="sum").item()
            total_tokens += targets.numel()
            if stride < seq_len:
                scored_until = s + seq_len
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    nll = total_nll / total_tokens
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=total_tokens, windows=len(starts),
                            seq_len=seq_len, seconds=time.perf_counter() - start_time)


def perplexity(model: nn.Module, tokenizer, text: str, seq_len: int = 2048, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 1,
               device: torch.device | str | None = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of `model` over `text` tokenised by `tokenizer` (a Hugging Face tokenizer)."""
    return perplexity_of_ids(model, tokenize(tokenizer, text), seq_len, stride, max_tokens,
                             batch_size, device, progress)
