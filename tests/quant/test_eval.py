"""Perplexity (quant/eval.py) against transformers' own loss on the same random weights."""

import math

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from quant.eval import perplexity, perplexity_of_ids
from server.models.config import LlamaConfig
from server.models.llama import LlamaForCausalLM
from tests.conftest import tiny_hf_config


@pytest.fixture(scope="module")
def pair():
    cfg = tiny_hf_config()
    torch.manual_seed(0)
    hf = HFLlama(HFLlamaConfig(**cfg)).eval()
    ours = LlamaForCausalLM(LlamaConfig.from_hf(cfg)).eval()
    ours.load_state_dict(hf.state_dict())
    ids = torch.randint(0, 2000, (203,), generator=torch.Generator().manual_seed(2))
    return hf, ours, ids


@torch.no_grad()
def _hf_nll_sum(hf, window, first):
    """Sum of NLL of window[first:] given the tokens before it (transformers' logits)."""
    logits = hf(window.unsqueeze(0)).logits[0].float()
    lp = torch.log_softmax(logits[first - 1:-1], dim=-1)
    return -lp.gather(1, window[first:].unsqueeze(1)).sum().item(), window.numel() - first


@pytest.mark.parametrize("batch_size", [1, 3])
def test_non_overlapping_windows_match_transformers(pair, batch_size):
    hf, ours, ids = pair
    got = perplexity_of_ids(ours, ids, seq_len=50, batch_size=batch_size)
    total, count = 0.0, 0
    for s in range(0, 201 - 50 + 1, 50):  # 4 windows; the last 3 tokens are dropped
        nll, n = _hf_nll_sum(hf, ids[s:s + 50], 1)
        total, count = total + nll, count + n
    assert got.windows == 4 and got.tokens == count == 4 * 49 and got.seq_len == 50
    assert got.nll == pytest.approx(total / count, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_strided_windows_score_every_token_once(pair):
    hf, ours, ids = pair
    got = perplexity_of_ids(ours, ids, seq_len=64, stride=16, batch_size=2)
    total, count, scored = 0.0, 0, 0
    for s in range(0, 203 - 64 + 1, 16):
        nll, n = _hf_nll_sum(hf, ids[s:s + 64], max(scored, s + 1) - s)
        total, count, scored = total + nll, count + n, s + 64
    assert got.tokens == count == scored - 1  # every token after the first, exactly once
    assert got.nll == pytest.approx(total / count, rel=1e-5)


def test_max_tokens_and_text_entry_point(pair):
    _, ours, ids = pair
    a = perplexity_of_ids(ours, ids, seq_len=40, max_tokens=120)
    assert a.windows == 3 and a.tokens == 3 * 39
    assert a.perplexity == pytest.approx(perplexity_of_ids(ours, ids[:120], seq_len=40).perplexity)

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode("utf-8"))}

    b = perplexity(ours, Tok(), "abc " * 30, seq_len=40)
    assert b.windows == 3 and b.perplexity > 1.0 and b.seconds >= 0
    with pytest.raises(ValueError, match="fewer than one window of seq_len=400"):
        perplexity_of_ids(ours, ids, seq_len=400)
    with pytest.raises(ValueError, match="stride"):
        perplexity_of_ids(ours, ids, seq_len=40, stride=41)
