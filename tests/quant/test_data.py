"""Calibration sources (quant/data.py, quant/generate.py, quant/corpus.py)."""

import sys

import pytest
import torch

from quant import corpus, data
from quant.generate import generate
from server.models.attention import CausalAttention
from server.models.config import LlamaConfig
from server.models.llama import LlamaForCausalLM
from tests.conftest import tiny_hf_config


class ByteTokenizer:
    """A stand-in with the Hugging Face call signature: one id per UTF-8 byte."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_hf(tiny_hf_config())).eval()
    with torch.no_grad():  # flatter next-token distributions, so sampling has something to do
        model.model.embed_tokens.weight.mul_(0.05)
    return model


def test_windows_are_deterministic_and_disjoint_when_possible():
    ids = torch.arange(1000)
    a = data.windows(ids, 8, 100, seed=3)
    assert a.shape == (8, 100) and a.dtype == torch.int64
    assert torch.equal(a, data.windows(ids, 8, 100, seed=3))
    assert not torch.equal(a, data.windows(ids, 8, 100, seed=4))
    assert a.unique().numel() == 800  # no token used twice
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # each window is a contiguous slice
    b = data.windows(ids, 30, 100, seed=0)  # more windows than fit: overlapping is allowed
    assert b.shape == (30, 100) and ((b[:, 1:] - b[:, :-1]) == 1).all()
    with pytest.raises(data.CalibrationError, match="fewer than seq_len=2000"):
        data.windows(ids, 1, 2000, seed=0)


def test_text_file_and_builtin_sources(tmp_path):
    tok = ByteTokenizer()
    path = tmp_path / "calib.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 50, encoding="utf-8")
    a = data.load_calibration(str(path), tok, num_samples=4, seq_len=64, seed=1)
    assert a.shape == (4, 64)
    assert torch.equal(a, data.from_file(path, tok, 4, 64, 1))
    b = data.load_calibration("builtin", tok, num_samples=16, seq_len=128, seed=0)
    assert torch.equal(b, data.builtin(tok, 16, 128, 0))
    assert not torch.equal(b, data.builtin(tok, 16, 128, 1))
    # the built-in text is all there and is a real mix (chat turns, code, other languages)
    text = corpus.text(0)
    assert len(text) > 20000 and "<|im_start|>assistant" in text and "def " in text and "é" in text
    assert sorted(text.split("\n\n")) == sorted(corpus.text(5).split("\n\n"))


def test_unknown_sources_and_missing_datasets_fail_in_one_line(monkeypatch):
    tok = ByteTokenizer()
    with pytest.raises(data.CalibrationError, match="neither a file nor"):
        data.load_calibration("no/such/file.txt", tok)
    with pytest.raises(data.CalibrationError, match="needs the model"):
        data.load_calibration("default", tok)
    monkeypatch.setitem(sys.modules, "datasets", None)  # make `import datasets` fail
    with pytest.raises(data.CalibrationError, match="needs the 'datasets' package") as err:
        data.load_calibration("hf:wikitext:wikitext-2-raw-v1", tok)
    assert "\n" not in str(err.value)


@torch.no_grad()
def test_cached_generation_matches_full_recomputation(tiny):
    """Greedy decoding through the contiguous KV cache equals re-running the whole prefix."""
    prompts = [torch.tensor([5, 17, 300]), torch.tensor([9]), torch.tensor([44, 45, 46, 47, 48])]
    got = generate(tiny, prompts, seq_len=12, temperature=0.0, batch_size=2)
    for p, row in zip(prompts, got):
        seq = p.tolist()
        while len(seq) < 12:
            h = tiny(torch.tensor(seq), torch.arange(len(seq)), CausalAttention([len(seq)]))
            seq.append(int(tiny.compute_logits(h[-1:]).argmax()))
        assert row.tolist() == seq


def test_generated_and_default_sources_are_deterministic(tiny):
    tok = ByteTokenizer()
    a = data.load_calibration("generated", tok, tiny, num_samples=3, seq_len=40, seed=7)
    assert a.shape == (3, 40)
    assert torch.equal(a, data.generated(tiny, tok, 3, 40, 7))
    assert not torch.equal(a, data.generated(tiny, tok, 3, 40, 8))
    prompt = list(corpus.PROMPTS[0].encode("utf-8"))[:20]
    assert a[0, :20].tolist() == prompt  # the prompt opens the sample
    d = data.load_calibration(None, tok, tiny, num_samples=5, seq_len=40, seed=7)
    assert d.shape == (5, 40) and torch.equal(d, data.default_calibration(tiny, tok, 5, 40, 7))
