"""Read and write GPTQ checkpoints (HF layout: config.json, quantize_config.json, safetensors).

Writing follows GPTQ_FORMAT.md §5/§7/§9: every config key explicit in both quantize_config.json and
config.json["quantization_config"], int32 packing, fp16 scales, `model.safetensors` or shards
`model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json` past `max_shard_bytes`,
safetensors metadata {"format": "pt"}. Reading accepts our files and the names AutoGPTQ, GPTQModel
and optimum use (sharded or not, `gptq_model-4bit-128g.safetensors`, v1 or v2), and refuses what it
cannot represent with one clear message. Only safetensors are ever read: no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant.format import TENSOR_SUFFIXES, FormatError, QuantConfig

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json",
                   "vocab.json", "merges.txt", "added_tokens.json")


class CheckpointError(FormatError):
    """A checkpoint directory that cannot be read; the message names the file and what is wrong."""


@dataclass
class CheckpointFiles:
    """A checkpoint on disk: its config dict, GPTQ settings (None when not quantised), weights."""

    path: Path
    config: dict
    quant_config: QuantConfig | None
    weight_files: list[Path]

    def tensor_names(self) -> dict[str, Path]:
        """Every tensor name -> the file that holds it."""
        names: dict[str, Path] = {}
        for f in self.weight_files:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    names[name] = f
        return names

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, one file open at a time (CPU tensors)."""
        for f in self.weight_files:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)

    def quantized_modules(self) -> set[str]:
        """Prefixes P that have P.qweight; checks each has the full GPTQ tensor set."""
        names = self.tensor_names()
        modules = {n[: -len(".qweight")] for n in names if n.endswith(".qweight")}
        for m in sorted(modules):
            missing = [s for s in TENSOR_SUFFIXES if f"{m}.{s}" not in names and s != "g_idx"]
            if missing:
                raise CheckpointError(f"{self.path}: quantized module {m} lacks {', '.join(missing)}")
        return modules


def read_config(path: Path) -> tuple[dict, QuantConfig | None]:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)")
    config = json.loads(cfg_file.read_text())
    qdict = config.get("quantization_config")
    for name in ("quantize_config.json", "quant_config.json"):
        if qdict is None and (path / name).exists():
            qdict = json.loads((path / name).read_text())
    quant = QuantConfig.from_dict(qdict) if qdict else None
    return config, quant


def find_weight_files(path: Path, quant: QuantConfig | None = None,
                      base_name: str | None = None) -> list[Path]:
    """The safetensors files of a checkpoint, via its index when sharded.

    Tries AutoGPTQ's order: `model_file_base_name`, `gptq_model-{b}bit-{g}g`, then `model`."""
    stems = [base_name, "model"]
    if quant is not None:
        stems.insert(1, f"gptq_model-{quant.bits}bit-{quant.group_size}g")
    stems = [s for s in stems if s]
    for stem in stems:
        index = path / f"{stem}.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [path / f for f in sorted(set(weight_map.values()))]
        single = path / f"{stem}.safetensors"
        if single.exists():
            return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only pickle weights (.bin/.pt) found; quantserve reads "
                              f"safetensors only (convert with transformers' save_pretrained)")
    raise CheckpointError(f"{path}: no .safetensors weights found")


def open_checkpoint(path: str | os.PathLike) -> CheckpointFiles:
    p = Path(path)
    config, quant = read_config(p)
    base_name = (config.get("quantization_config") or {}).get("model_file_base_name")
    return CheckpointFiles(path=p, config=config, quant_config=quant,
                           weight_files=find_weight_files(p, quant, base_name))


def save_checkpoint(out_dir: str | os.PathLike, state: dict[str, torch.Tensor], config: dict,
                    quant: QuantConfig | None, float_dtype: torch.dtype = torch.float16,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer=None) -> Path:
    """Write `state` (GPTQ buffers as they are; other floating tensors cast to `float_dtype`), the
    configs, and the tokenizer (anything with `save_pretrained`, chat template included).

    Writes into a temporary sibling directory and renames it into place, so a reader never sees a
    half-written checkpoint. Returns the directory.
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach().to("cpu")
        if t.is_floating_point() and not name.endswith(".scales"):
            t = t.to(float_dtype)
        elif name.endswith(".scales"):
            t = t.to(torch.float16)
        tensors[name] = t.contiguous()
    shards = _split_shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if quant is not None:
        metadata.update({"quantserve_bits": str(quant.bits),
                         "quantserve_group_size": str(quant.group_size),
                         "quantserve_checkpoint_format": quant.checkpoint_format})
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata=metadata)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = dict(config)
    cfg["torch_dtype"] = str(float_dtype).replace("torch.", "")
    if quant is not None:
        qd = quant.to_dict()
        cfg["quantization_config"] = qd
        (tmp / "quantize_config.json").write_text(json.dumps(qd, indent=2))
    else:
        cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order, keeping every tensor of one module in the same shard."""
    def module(name: str) -> str:
        return name.rsplit(".", 1)[0]

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    last_module = None
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_bytes and module(name) != last_module:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        last_module = module(name)
    return shards
