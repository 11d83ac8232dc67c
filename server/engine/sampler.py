"""Token sampling for one step: logits [B, V] float32 + each row's SamplingParams -> token ids.

Order: logit bias -> repetition / presence / frequency penalties -> (logprobs are taken here, from
the penalised distribution before temperature and truncation) -> greedy rows take the argmax ->
temperature -> top-k -> top-p -> min-p -> a draw per row (the row's own seeded generator when the
request gave a seed, so the same seed gives the same text whatever else is in the batch).
"""

from __future__ import annotations

import torch

from server.engine.sequence import Sequence, TokenLogprob


class Sampler:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [B, V] float32 for `seqs` (same order) -> (token ids, logprob records)."""
        logits = logits[:, : self.vocab_size]
        params = [s.params for s in seqs]
        if any(p.logit_bias for p in params):
            logits = logits.clone()
            for row, p in enumerate(params):
                for token, bias in p.logit_bias:
                    if 0 <= token < logits.shape[1]:
                        logits[row, token] += bias
        if any(p.needs_penalties for p in params):
            logits = self._penalize(logits, seqs)
        want_logprobs = [p.logprobs is not None for p in params]
        logprobs_all = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._draw(logits, seqs)
        token_list = tokens.tolist()
        records: list[TokenLogprob | None] = [None] * len(seqs)
        if logprobs_all is not None:
            for row, p in enumerate(params):
                if p.logprobs is None:
                    continue
                records[row] = token_logprob(logprobs_all[row], token_list[row], p.logprobs)
        return token_list, records

    def _penalize(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        logits = logits.clone()
        device = logits.device
        vocab = logits.shape[1]
        for row, seq in enumerate(seqs):
            p = seq.params
            if not p.needs_penalties:
                continue
            if p.repetition_penalty != 1.0:  # HF/CTRL style over prompt and output tokens
                ids = torch.tensor(seq.all_ids, device=device).clamp_(0, vocab - 1).unique()
                vals = logits[row, ids]
                logits[row, ids] = torch.where(vals > 0, vals / p.repetition_penalty,
                                               vals * p.repetition_penalty)
            if seq.output_ids and (p.presence_penalty or p.frequency_penalty):  # OpenAI style
                out = torch.tensor(seq.output_ids, device=device).clamp_(0, vocab - 1)
                counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
                logits[row] -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * p.presence_penalty
        return logits

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        device = logits.device
        greedy_rows = torch.tensor([p.greedy for p in params], device=device)
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                             device=device, dtype=logits.dtype)
        scaled = logits / temps.unsqueeze(1)
        scaled = _truncate(scaled, params)
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.params.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device,
                                          dtype=probs.dtype).exponential_()
        for i, seq in enumerate(seqs):
            if seq.params.seed is None:
                continue
            if seq.generator is None or seq.generator.device != device:
                seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed)
            noise[i].exponential_(generator=seq.generator)
        drawn = (probs / noise).argmax(dim=-1)
        return torch.where(greedy_rows, logits.argmax(dim=-1), drawn)


def _truncate(scaled: torch.Tensor, params) -> torch.Tensor:
    """Mask logits outside each row's top-k / top-p / min-p set with -inf (at least one survives)."""
    need_k = any(p.top_k > 0 for p in params)
    need_p = any(p.top_p < 1.0 for p in params)
    need_min = any(p.min_p > 0.0 for p in params)
    if not (need_k or need_p or need_min):
        return scaled
    device = scaled.device
    vocab = scaled.shape[1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    if need_k:
        k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        mask |= ranks >= k.unsqueeze(1)
    sorted_probs = torch.softmax(sorted_logits.masked_fill(mask, float("-inf")), dim=-1)
    if need_p:
        top_p = torch.tensor([p.top_p for p in params], device=device, dtype=sorted_probs.dtype)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        mask |= before >= top_p.unsqueeze(1)
    if need_min:
        min_p = torch.tensor([p.min_p for p in params], device=device, dtype=sorted_probs.dtype)
        mask |= sorted_probs < (min_p * sorted_probs[:, :1]).expand_as(sorted_probs)
    mask[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)


def token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """logprobs [V] (log-softmax) -> the chosen token's logprob and the `top` most likely."""
    chosen = float(logprobs[token])
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        vals, idx = logprobs.topk(top)
        alternatives = list(zip(idx.tolist(), vals.tolist()))
    return TokenLogprob(token_id=token, logprob=chosen, top=alternatives)
