"""Checkpoint -> a ready model: resolve the model argument (server.first_boot quantises a plain
model once and caches it), then build our model from the GPTQ checkpoint on the device, fuse
projections and pick each layer's kernel.

Whatever the source, serving always reads a GPTQ checkpoint from disk, through the same code.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quant import kernels
from quant.checkpoint import CheckpointError, CheckpointFiles, open_checkpoint
from quant.format import QuantConfig
from quant.linear import QuantLinear
from server.first_boot import (ModelLoadError, QuantizeSpec, default_cache_dir, default_gguf, ensure_quantized,
                               pick_device)
from server.models.config import LlamaConfig
from server.models.llama import LlamaForCausalLM, dense_linear

log = logging.getLogger("quantserve.loader")


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: object
    name: str  # the id clients use in "model"
    path: Path  # the GPTQ checkpoint actually served
    hf_config: dict
    quant_config: QuantConfig | None
    backends: dict[str, int] = field(default_factory=dict)
    load_seconds: float = 0.0
    self_check: object = None  # server.selfcheck_report.SelfCheckReport, set by server.serve.build_engine

    @property
    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total


# --------------------------------------------------------------------------- GPTQ -> device

def build_model(ckpt: CheckpointFiles, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Construct our model for a checkpoint on `device` without materialising it twice, and load it.

    Linear layers with `.qweight` in the checkpoint become QuantLinear; others stay dense.
    """
    config = LlamaConfig.from_hf(ckpt.config)
    names = ckpt.tensor_names()
    quantized = ckpt.quantized_modules()
    qcfg = ckpt.quant_config

    def linear(in_features: int, out_features: int, bias: bool, name: str) -> nn.Module:
        if name in quantized:
            if qcfg is None:
                raise CheckpointError(f"{ckpt.path}: {name} is packed but no quantization_config")
            return QuantLinear.from_config(in_features, out_features, qcfg, bias=bias)
        return dense_linear(in_features, out_features, bias, name)

    with torch.device("meta"):
        model = LlamaForCausalLM(config, linear)
    model.to_empty(device=device)
    model.reset_non_persistent()
    for m in model.modules():  # dense weights in the compute dtype; packed buffers keep theirs
        if not isinstance(m, QuantLinear):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(dtype)
    params = model.state_dict(keep_vars=True)  # persistent tensors only, tied ones under both names
    loaded = set()
    for name, tensor in ckpt.tensors():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        target = params.get(name)
        if target is None:
            raise CheckpointError(f"{ckpt.path}: unexpected tensor {name} {tuple(tensor.shape)}")
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{ckpt.path}: {name} has shape {tuple(tensor.shape)}, the model "
                                  f"expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)  # casts floating tensors to the target's dtype
        loaded.add(name)
    if config.tie_word_embeddings:
        model.tie_weights()
        loaded.add("lm_head.weight")
    for mod_name in quantized:
        if f"{mod_name}.g_idx" not in names:  # old checkpoints: contiguous groups
            layer = model.get_submodule(mod_name)
            gs = layer.group_size if layer.group_size != -1 else layer.in_features
            layer.g_idx.copy_(torch.arange(layer.in_features, device=device) // gs)
            loaded.add(f"{mod_name}.g_idx")
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{ckpt.path}: missing tensors {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}")
    return model.eval()


def pick_dtype(dtype: str, device: torch.device, hf_config: dict) -> torch.dtype:
    if dtype != "auto":
        return {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}[dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if hf_config.get("torch_dtype") == "bfloat16" else torch.float16


def finalize(model: LlamaForCausalLM, kernel: str | None = None,
             lm_head: str = "auto") -> dict[str, int]:
    """After loading: fuse q/k/v and gate/up, move act-order down_proj permutations into gate/up
    (server.models.act_order: no gather before down_proj), maybe pack lm_head, pick each layer's
    kernel.

    lm_head "int8": an 8-bit per-channel copy served by the packed kernels (the embedding table
    stays as it is). "auto" does that on the CPU, where the dense head is the largest read of a
    decode step (SmolLM2: 113 MB fp32 against ~53 MB of 4-bit decoder weights) and costs +0.85%
    perplexity when packed (bench/NOTES.md); on CUDA the head stays dense fp16/bf16."""
    model.fuse_projections()
    moved = model.absorb_act_order()
    if moved:
        log.info("act-order: down_proj row order moved into gate/up in %d layers (no gather there)", moved)
    if lm_head not in ("auto", "dense", "int8"):
        raise ModelLoadError(f"--lm-head must be auto, dense or int8, got {lm_head!r}")
    if lm_head == "int8" or (lm_head == "auto" and model.device.type == "cpu" and kernel is None):
        pack_lm_head(model)
    return kernels.prepare_model(model, kernel)


def pack_lm_head(model: LlamaForCausalLM) -> None:
    """Replace the dense lm_head by an 8-bit per-output-channel QuantLinear (RTN, symmetric)."""
    from quant.rtn import quantize_rtn

    head = model.lm_head
    if isinstance(head, QuantLinear):
        return
    cfg = QuantConfig(bits=8, group_size=-1, sym=True)
    result = quantize_rtn(head.weight.data.float(), 8, -1, True)
    packed = QuantLinear.from_result(result, cfg, bias=head.bias)
    model.lm_head = packed.to(head.weight.device)


def load_tokenizer(path: str | None, vocab_size: int):
    """A tokenizer directory, or (None) the default model's tokenizer from its GGUF."""
    from transformers import AutoTokenizer

    from server.dummy import VocabClampTokenizer

    if path:
        tok = AutoTokenizer.from_pretrained(path)
    else:
        gguf = default_gguf()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return VocabClampTokenizer(tok, vocab_size) if len(tok) > vocab_size else tok


def load_dummy(source: str, device: str, dtype: str, spec: QuantizeSpec, kernel: str | None,
               served_name: str | None, tokenizer: str | None, lm_head: str = "auto") -> LoadedModel:
    """`--load-format dummy`: random packed weights of a preset / config shape, built on the device."""
    from server.dummy import build_dummy_model, dummy_config

    t0 = time.perf_counter()
    config = dummy_config(source)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev, config)
    qcfg = spec.config()
    model = build_dummy_model(config, qcfg, dev, dt)
    backends = finalize(model, kernel, lm_head)
    tok = load_tokenizer(tokenizer, model.config.vocab_size)
    name = served_name or f"dummy-{Path(source).stem if not source.startswith('llama') else source}"
    return LoadedModel(model=model, tokenizer=tok, name=name, path=Path(source), hf_config=config,
                       quant_config=qcfg, backends=backends, load_seconds=time.perf_counter() - t0)


def load_model(source: str, device: str = "auto", dtype: str = "auto",
               cache_dir: Path | None = None, spec: QuantizeSpec | None = None,
               kernel: str | None = None, served_name: str | None = None,
               load_format: str = "auto", tokenizer: str | None = None,
               lm_head: str = "auto") -> LoadedModel:
    """The one entry point: resolve, quantise if needed, load onto the device, pick kernels."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    spec = spec or QuantizeSpec()
    if load_format == "dummy":
        return load_dummy(source, device, dtype, spec, kernel, served_name, tokenizer, lm_head)
    if load_format != "auto":
        raise ModelLoadError(f"unknown --load-format {load_format!r} (auto, dummy)")
    path, name = ensure_quantized(source, cache_dir or default_cache_dir(), spec)
    ckpt = open_checkpoint(path)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev, ckpt.config)
    log.info("loading %s onto %s (%s)", path.name, dev, str(dt).replace("torch.", ""))
    model = build_model(ckpt, dev, dt)
    backends = finalize(model, kernel, lm_head)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer or str(path))
    return LoadedModel(model=model, tokenizer=tokenizer, name=served_name or name, path=path,
                       hf_config=ckpt.config, quant_config=ckpt.quant_config, backends=backends,
                       load_seconds=time.perf_counter() - t0)


def read_generation_eos(path: Path) -> list[int]:
    f = path / "generation_config.json"
    if not f.exists():
        return []
    eos = json.loads(f.read_text()).get("eos_token_id")
    return list(eos) if isinstance(eos, list) else ([] if eos is None else [int(eos)])
