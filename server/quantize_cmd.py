"""`quantserve quantize` and `quantserve eval`: offline work on a model, no server."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from server.config import ModelConfig
from server.loader import (DEFAULT_MODEL, LlamaForCausalLM, ModelLoadError, QuantizeSpec, _download,
                           _quantize_and_save, default_gguf, load_float_from_dir, load_float_from_gguf)

log = logging.getLogger("quantserve")


def load_float(source: str) -> tuple[LlamaForCausalLM, dict, object]:
    """'default', a directory or a HF id -> our float32 model on the CPU, its config, tokenizer."""
    if source == DEFAULT_MODEL:
        return load_float_from_gguf(default_gguf())
    path = Path(source).expanduser()
    if not path.exists():
        path = _download(source)
    if (path / "quantize_config.json").exists() or "quantization_config" in json.loads(
            (path / "config.json").read_text()):
        raise ModelLoadError(f"{path} is already quantized; quantize a plain (float) model")
    return load_float_from_dir(path)


def run_quantize(args: argparse.Namespace) -> int:
    spec = QuantizeSpec(method=args.method, bits=args.bits, group_size=args.group_size,
                        sym=not args.asym, desc_act=args.desc_act)
    t0 = time.perf_counter()
    model, config, tokenizer = load_float(args.model)
    out = Path(args.output_dir)
    _quantize_and_save(model, config, tokenizer, spec, out)
    print(f"wrote {spec.tag()} GPTQ checkpoint to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def run_eval(args: argparse.Namespace, mcfg: ModelConfig) -> int:
    raise ModelLoadError("eval is not available in this build")
