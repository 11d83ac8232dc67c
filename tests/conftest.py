"""Shared fixtures: a tiny random-weight Llama built from a config (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def tiny_hf_config(**overrides) -> dict:
    """A Llama config small enough to run anywhere in milliseconds; grouped-query attention on."""
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def pytest_configure(config):
    # One intra-op thread: on a 2-core machine the server's own threads (uvicorn, engine) compete
    # with OpenMP workers, and a descheduled worker turns a 10 us matmul into milliseconds.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_root() -> Path:
    """A model cache shared by the whole test session (quantised default model, tiny models)."""
    path = Path(os.environ.get("QUANTSERVE_TEST_CACHE", ROOT / ".cache" / "test"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def default_tokenizer_dir(cache_root) -> Path:
    """SmolLM2's tokenizer (from the default model's GGUF), saved once for the tiny fixtures."""
    out = cache_root / "smollm2-tokenizer"
    if not (out / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        from server.first_boot import default_gguf

        gguf = default_gguf()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(str(out))
    return out


def make_tiny_checkpoint(out: Path, tokenizer_dir: Path, bits: int = 4, group_size: int = 32,
                         sym: bool = True, seed: int = 0, edit=None, **overrides) -> Path:
    """A random tiny Llama quantised with RTN and written as a GPTQ checkpoint with a tokenizer."""
    from transformers import AutoTokenizer

    from server.first_boot import QuantizeSpec, quantize_and_save
    from server.models.config import LlamaConfig
    from server.models.llama import LlamaForCausalLM

    if (out / "quantize_config.json").exists():
        return out
    cfg = tiny_hf_config(**overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.from_hf(cfg))
    with torch.no_grad():  # larger logits than the default init, so greedy text is not uniform noise
        model.model.embed_tokens.weight.normal_(0, 0.5)
        if edit is not None:  # a test's own change to the float weights before quantisation
            edit(model)
    spec = QuantizeSpec(method="rtn", bits=bits, group_size=group_size, sym=sym)
    quantize_and_save(model, cfg, AutoTokenizer.from_pretrained(str(tokenizer_dir)), spec, out)
    return out


def save_plain_llama(out: Path, tokenizer_dir: Path, seed: int = 0, edit=None) -> Path:
    """A plain (float) tiny Llama directory as transformers writes it, with a tokenizer; `edit`
    may change the transformers model's weights before saving."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = {k: v for k, v in tiny_hf_config(tie_word_embeddings=False).items()
           if k not in ("model_type", "architectures", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(cache_root, default_tokenizer_dir) -> Path:
    return make_tiny_checkpoint(cache_root / "tiny-llama-gptq-4bit-g32", default_tokenizer_dir)
