"""Dummy weights: a Llama-family model of any shape with random packed 4-bit weights, made directly
in their final layout on the device (never a float copy of the whole model), for benchmarks and
load tests of shapes too big to quantise here (`--load-format dummy`).

The model argument is a preset name (`llama-2-7b`, `llama-2-13b`, `llama-2-70b`, `llama-3-8b`,
`llama-3-70b`, `smollm2-135m`) or a config.json / model directory. Random values are scaled so
activations stay finite through every layer; the text they produce is meaningless.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from quant.format import QuantConfig
from quant.linear import QuantLinear
from quant.pack import pack_qzeros
from server.models.config import LlamaConfig
from server.models.llama import LlamaForCausalLM

_LLAMA2 = dict(model_type="llama", vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1,
               eos_token_id=2, hidden_act="silu")
_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
               max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
               eos_token_id=128001, hidden_act="silu")
PRESETS: dict[str, dict] = {
    "llama-2-7b": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824,
                    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-2-70b": {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    "llama-3-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3-70b": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    "smollm2-135m": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                     "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                     "max_position_embeddings": 8192, "tie_word_embeddings": True,
                     "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"},
}


def dummy_config(model: str) -> dict:
    """A preset name, a config.json, or a directory holding one -> HF config dict."""
    if model in PRESETS:
        return dict(PRESETS[model], architectures=["LlamaForCausalLM"])
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ValueError(f"--load-format dummy needs a preset ({', '.join(PRESETS)}) or a "
                         f"config.json; {model!r} is neither")
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    return config


@torch.no_grad()
def build_dummy_model(config: dict, quant: QuantConfig | None, device: torch.device,
                      dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """Random GPTQ model of `config`'s shape: every decoder linear is a QuantLinear whose codes,
    scales and zeros are drawn on `device` (symmetric zero, v1 format). With `quant` None the
    linears are dense `dtype` instead (the unquantised baseline of the same shape). quant.desc_act
    draws a random act-order g_idx per input (the checkpoints that need a gather per call): q/k/v
    share one, as do gate/up, as GPTQ gives them (their Hessians come from the same input), so
    they fuse as a real act-order checkpoint's do."""
    cfg = LlamaConfig.from_hf(config)

    def linear(in_features: int, out_features: int, bias: bool, name: str) -> nn.Module:
        if quant is None:
            return nn.Linear(in_features, out_features, bias=bias)
        return QuantLinear.from_config(in_features, out_features, quant, bias=bias)

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, linear)
    model.to_empty(device=device)
    model.reset_non_persistent()
    gen = torch.Generator(device=device).manual_seed(seed)
    orders: dict[str, torch.Tensor] = {}  # act-order channel order per input (see the docstring)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            order = None
            if quant.desc_act:
                key = _input_key(name)
                if key not in orders:
                    orders[key] = torch.randperm(m.in_features, generator=gen, device=device)
                order = orders[key]
            _fill_quant(m, quant, gen, order)
        else:
            for p in m.parameters(recurse=False):
                p.data = p.data.to(dtype)
            if isinstance(m, nn.Linear) and m is not model.lm_head:
                m.weight.normal_(0.0, 0.5 / math.sqrt(m.in_features), generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
    model.model.embed_tokens.weight.normal_(0.0, 1.0, generator=gen)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            p.fill_(1.0)
    if not cfg.tie_word_embeddings:
        model.lm_head.weight.normal_(0.0, 1.0 / math.sqrt(cfg.hidden_size), generator=gen)
    model.tie_weights()
    return model.eval()


def _input_key(name: str) -> str:
    """Linears that read the same input share a key: a layer's q/k/v, a layer's gate/up."""
    parent, _, leaf = name.rpartition(".")
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return f"{parent}.qkv"
    if leaf in ("gate_proj", "up_proj"):
        return f"{parent}.gate_up"
    return name


def _fill_quant(layer: QuantLinear, quant: QuantConfig, gen: torch.Generator,
                order: torch.Tensor | None = None) -> None:
    """Random codes, scales and symmetric zeros; with `order` (a permutation of the K input
    channels, desc_act) channel i joins group order[i] // group_size."""
    k, n = layer.in_features, layer.out_features
    words = layer.qweight
    words.copy_(torch.randint(-(2**31), 2**31, words.shape, generator=gen, device=words.device,
                              dtype=torch.int64).to(torch.int32))
    zeros = torch.full((layer.shape.num_groups, n), 1 << (quant.bits - 1), dtype=torch.int32)
    layer.qzeros.copy_(pack_qzeros(zeros, quant.bits, quant.checkpoint_format))
    # uniform codes have std ~ 2^b / sqrt(12); aim for a weight std of ~0.5 / sqrt(K)
    code_std = (1 << quant.bits) / math.sqrt(12)
    base = 0.5 / (code_std * math.sqrt(k))
    layer.scales.uniform_(0.5 * base, 1.5 * base, generator=gen)
    gs = k if layer.group_size == -1 else layer.group_size
    if order is not None:  # act-order: channels join groups in a random order (a permuted g_idx)
        layer.g_idx.copy_((order // gs).to(torch.int32))
    else:
        layer.g_idx.copy_(torch.arange(k, device=words.device, dtype=torch.int32) // gs)
    if layer.bias is not None:
        layer.bias.zero_()


class VocabClampTokenizer:
    """Wraps a tokenizer whose vocabulary is larger than a dummy model's: ids are folded into the
    model's range on encode (the text of a dummy model is meaningless anyway)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._tok = tokenizer
        self._vocab = vocab_size

    def encode(self, text: str, **kwargs) -> list[int]:
        return [i % self._vocab for i in self._tok.encode(text, **kwargs)]

    def __getattr__(self, name):
        return getattr(self._tok, name)
