"""Calibration data: int64 token ids [num_samples, seq_len] for the GPTQ driver.

Sources (`load_calibration` picks one from a string, as the CLI passes it):
    "default"        offline, no file, no network, deterministic: see `default_calibration`
    "builtin"        only the mixed-domain text shipped in `quant.corpus`
    "generated"      only text the model writes itself from fixed prompts (data-free calibration)
    a path           a UTF-8 text file (`--calibration path.txt`)
    "hf:NAME[:CONFIG][:SPLIT]"  a Hugging Face dataset (needs the optional `datasets` package and the
                     network), e.g. "hf:wikitext:wikitext-2-raw-v1:train"

Text sources are tokenised as one stream (documents joined by blank lines) and samples are windows
of seq_len tokens at seeded random offsets (the GPTQ recipe). Same arguments -> same ids.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quant import corpus
from quant.generate import generate

DEFAULT_NUM_SAMPLES = 64
DEFAULT_SEQ_LEN = 256
DEFAULT_SEED = 0


class CalibrationError(ValueError):
    """A calibration source that cannot give the requested samples; the message says why."""


def _encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """ids int64 [T] -> [num_samples, seq_len]: windows at seeded random offsets.

    When the stream holds at least num_samples whole windows, offsets are drawn without overlap
    (a random choice of disjoint slots with a random shift each), so no token is used twice;
    otherwise windows may overlap."""
    ids = ids.reshape(-1)
    total = ids.numel()
    if total < seq_len:
        raise CalibrationError(f"calibration text has {total} tokens, fewer than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    slots = total // seq_len
    if slots >= num_samples:
        chosen = torch.randperm(slots, generator=g)[:num_samples].sort().values
        slack = total - slots * seq_len  # a shared shift keeps the slots disjoint
        shift = int(torch.randint(0, slack + 1, (1,), generator=g))
        starts = chosen * seq_len + shift
    else:
        starts = torch.randint(0, total - seq_len + 1, (num_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def from_text(text: str, tokenizer, num_samples: int = DEFAULT_NUM_SAMPLES,
              seq_len: int = DEFAULT_SEQ_LEN, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Samples from one text (any length >= seq_len tokens)."""
    return windows(_encode(tokenizer, text), num_samples, seq_len, seed)


def from_file(path: str | Path, tokenizer, num_samples: int = DEFAULT_NUM_SAMPLES,
              seq_len: int = DEFAULT_SEQ_LEN, seed: int = DEFAULT_SEED) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    return from_text(path.read_text(encoding="utf-8"), tokenizer, num_samples, seq_len, seed)


def from_hf_dataset(spec: str, tokenizer, num_samples: int = DEFAULT_NUM_SAMPLES,
                    seq_len: int = DEFAULT_SEQ_LEN, seed: int = DEFAULT_SEED,
                    text_field: str = "text") -> torch.Tensor:
    """spec "NAME[:CONFIG][:SPLIT]" (default split "train"); needs `datasets` and the network."""
    try:
        import datasets  # optional dependency
    except ImportError:
        raise CalibrationError(f"calibration dataset {spec!r} needs the 'datasets' package "
                               f"(pip install datasets); or pass a text file instead") from None
    parts = spec.split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    data = datasets.load_dataset(name, config, split=split)
    if text_field not in data.column_names:
        raise CalibrationError(f"dataset {spec!r} has no {text_field!r} column: {data.column_names}")
    # enough documents for the samples, in a seeded order, so huge corpora are not tokenised whole
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    texts, chars = [], 0
    for i in order:
        texts.append(data[i][text_field])
        chars += len(texts[-1])
        if chars > 8 * num_samples * seq_len:  # ~4 characters per token, with a margin of 2
            break
    return from_text("\n\n".join(texts), tokenizer, num_samples, seq_len, seed)


def builtin(tokenizer, num_samples: int = DEFAULT_NUM_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
            seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Windows of the mixed-domain text in `quant.corpus` (our own writing, shipped as code)."""
    return from_text(corpus.text(seed), tokenizer, num_samples, seq_len, seed)


def generated(model: nn.Module, tokenizer, num_samples: int = DEFAULT_NUM_SAMPLES,
              seq_len: int = DEFAULT_SEQ_LEN, seed: int = DEFAULT_SEED,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Data-free calibration: the model continues each of `corpus.PROMPTS` (cycled) by sampling
    (temperature 1, seeded) until seq_len tokens; the prompt tokens are part of the sample."""
    prompts = [_encode(tokenizer, corpus.PROMPTS[i % len(corpus.PROMPTS)]) for i in range(num_samples)]
    prompts = [p[:seq_len // 2] for p in prompts]
    return generate(model, prompts, seq_len, seed=seed, device=device)


def default_calibration(model: nn.Module, tokenizer, num_samples: int = DEFAULT_NUM_SAMPLES,
                        seq_len: int = DEFAULT_SEQ_LEN, seed: int = DEFAULT_SEED,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """The offline default: half the samples from the built-in text, half written by the model.

    Measured on SmolLM2-135M, GPTQ 4-bit g64, WikiText-2 perplexity (bench/NOTES.md): the mix
    26.95 in 126 s on 2 cores, the model's own text alone 26.77 in 194 s (generation is the slow
    part), the built-in text alone 28.56 in 58 s. The mix takes most of the quality for half the
    generation time."""
    n_text = num_samples - num_samples // 2
    parts = [builtin(tokenizer, n_text, seq_len, seed)]
    if num_samples // 2:
        parts.append(generated(model, tokenizer, num_samples // 2, seq_len, seed, device))
    return torch.cat(parts)


def load_calibration(source: str | None, tokenizer, model: nn.Module | None = None,
                     num_samples: int = DEFAULT_NUM_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                     seed: int = DEFAULT_SEED, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 [num_samples, seq_len] from a source string (module docstring); None = "default"."""
    if num_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples}, {seq_len}")
    source = source or "default"
    if source in ("default", "generated") and model is None:
        raise CalibrationError(f"calibration source {source!r} needs the model (it writes text itself)")
    if source == "default":
        return default_calibration(model, tokenizer, num_samples, seq_len, seed, device)
    if source == "generated":
        return generated(model, tokenizer, num_samples, seq_len, seed, device)
    if source == "builtin":
        return builtin(tokenizer, num_samples, seq_len, seed)
    if source.startswith("hf:"):
        return from_hf_dataset(source[3:], tokenizer, num_samples, seq_len, seed)
    if Path(source).is_file():
        return from_file(source, tokenizer, num_samples, seq_len, seed)
    raise CalibrationError(f"calibration source {source!r} is neither a file nor one of "
                           f"'default', 'builtin', 'generated', 'hf:NAME[:CONFIG][:SPLIT]'")
