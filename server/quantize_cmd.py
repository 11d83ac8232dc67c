"""`quantserve quantize` and `quantserve eval`: offline work on a model, no server.

quantize  a plain model ('default', a directory or a Hugging Face id) -> a GPTQ checkpoint
          directory that we, transformers + optimum, GPTQModel and vLLM load.
eval      perplexity of a model over a text, through the same loading path the server uses
          (quantised kernels and all), or of the unquantised model with --unquantized.
With --json the last line on stdout is one JSON object (what scripts and bench/ parse).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from pathlib import Path

from server.config import ModelConfig
from server.first_boot import (DEFAULT_MODEL, ModelLoadError, QuantizeSpec, default_gguf, load_float_from_dir,
                               load_float_from_gguf, pick_device, quantize_and_save, resolve_model_dir)
from server.models.llama import LlamaForCausalLM

log = logging.getLogger("quantserve")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'4GB', '500MB', '2GiB', '1048576' -> bytes (decimal units as in transformers' shard sizes)."""
    m = _SIZE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"size {text!r} is not a positive number with an optional unit "
                         f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def is_quantized_dir(path: Path) -> bool:
    return (path / "quantize_config.json").exists() or "quantization_config" in json.loads(
        (path / "config.json").read_text())


def load_float(source: str) -> tuple[LlamaForCausalLM, dict, object]:
    """'default', a directory or a HF id -> our float32 model on the CPU, its config, tokenizer."""
    if source == DEFAULT_MODEL:
        return load_float_from_gguf(default_gguf())
    path = resolve_model_dir(source)
    if is_quantized_dir(path):
        raise ModelLoadError(f"{path} is already quantized; quantize a plain (float) model")
    return load_float_from_dir(path)


def spec_from_args(args: argparse.Namespace) -> QuantizeSpec:
    if args.static_groups and args.method != "gptq":
        raise ValueError("--static-groups applies to GPTQ only")
    if args.desc_act and args.method != "gptq":
        raise ValueError("--desc-act applies to GPTQ only (RTN has no processing order)")
    if args.static_groups and args.desc_act is False:
        raise ValueError("--static-groups needs act-order (drop --no-desc-act)")
    if args.group_size != -1 and args.group_size < 1:
        raise ValueError(f"--group-size must be -1 or positive, got {args.group_size}")
    if args.num_samples < 1 or args.seq_len < 2:
        raise ValueError(f"--num-samples must be >= 1 and --seq-len >= 2, got {args.num_samples}, "
                         f"{args.seq_len}")
    if not 0 < args.damp_percent < 1:
        raise ValueError(f"--damp-percent must be in (0, 1), got {args.damp_percent}")
    return QuantizeSpec(method=args.method, bits=args.bits, group_size=args.group_size,
                        sym=not args.asym, desc_act=args.desc_act, static_groups=args.static_groups,
                        calibration=args.calibration, num_samples=args.num_samples,
                        seq_len=args.seq_len, damp_percent=args.damp_percent, device=args.device)


def run_quantize(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    shard_bytes = parse_size(args.shard_size)
    out = Path(args.output_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"{out} exists and is not empty; choose a new output directory")
    t0 = time.perf_counter()
    model, config, tokenizer = load_float(args.model)
    load_s = time.perf_counter() - t0
    report = quantize_and_save(model, config, tokenizer, spec, out, max_shard_bytes=shard_bytes)
    total = time.perf_counter() - t0
    files = sorted(p.name for p in out.glob("*.safetensors"))
    print(f"wrote {spec.tag()} GPTQ checkpoint to {out} ({len(files)} safetensors file"
          f"{'s' if len(files) != 1 else ''}) in {total:.1f}s: load {load_s:.1f}s, "
          f"quantize {report.seconds:.1f}s on {report.device}")
    if args.json:
        losses = [r.loss for r in report.layers if r.loss is not None]
        print(json.dumps({
            "output_dir": str(out), "tag": spec.tag(), "method": spec.method, "bits": spec.bits,
            "group_size": spec.group_size, "sym": spec.sym, "desc_act": spec.desc_act,
            "static_groups": spec.static_groups, "order": report.order, "device": report.device,
            "num_samples": report.num_samples, "seq_len": report.seq_len,
            "seconds": {"total": round(total, 2), "load": round(load_s, 2),
                        "quantize": round(report.seconds, 2), **report.times.as_dict()},
            "layers": len(report.layers),
            "loss_sum": round(sum(losses), 6) if losses else None,
            "files": files}))
    return 0


def _eval_model(args: argparse.Namespace, mcfg: ModelConfig):
    """-> (model, tokenizer, description) for `eval`."""
    if args.unquantized:
        if mcfg.model != DEFAULT_MODEL and is_quantized_dir(resolve_model_dir(mcfg.model)):
            raise ModelLoadError(f"{mcfg.model} is a quantized checkpoint; --unquantized needs a "
                                 f"plain model")
        model, _, tokenizer = load_float(mcfg.model)
        return model.to(pick_device(mcfg.device)), tokenizer, "float32 (unquantized)"
    from server.serve import quantize_spec
    from server.loader import load_model

    loaded = load_model(mcfg.model, device=mcfg.device, dtype=mcfg.dtype, cache_dir=mcfg.cache_dir,
                        spec=quantize_spec(mcfg), kernel=mcfg.kernel, load_format=mcfg.load_format,
                        tokenizer=mcfg.tokenizer, lm_head=mcfg.lm_head)
    qc = loaded.quant_config
    desc = (f"{qc.bits}-bit g{qc.group_size}{'' if qc.sym else ' asym'}"
            f"{' act-order' if qc.desc_act else ''}" if qc else "unquantized")
    return loaded.model, loaded.tokenizer, f"{loaded.path.name}: {desc}, kernels {loaded.backends}"


def run_eval(args: argparse.Namespace, mcfg: ModelConfig) -> int:
    from quant import corpus
    from quant.eval import perplexity

    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.stride is not None and not 0 < args.stride <= args.seq_len:
        raise ValueError(f"--stride must be in 1..--seq-len ({args.seq_len}), got {args.stride}")
    if args.text:
        path = Path(args.text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--text {path}: no such file")
        text, source = path.read_text(encoding="utf-8"), path.name
    else:
        text, source = corpus.text(0), "built-in text"
    model, tokenizer, desc = _eval_model(args, mcfg)
    result = perplexity(model, tokenizer, text, seq_len=args.seq_len, stride=args.stride,
                        max_tokens=args.max_tokens, batch_size=args.batch_size,
                        progress=not args.json)
    if not math.isfinite(result.perplexity):
        raise ArithmeticError(f"perplexity is {result.perplexity} (the model produced non-finite "
                              f"logits)")
    print(f"{desc}\nperplexity {result.perplexity:.4f} over {result.tokens} tokens of {source} "
          f"({result.windows} windows of {result.seq_len}) in {result.seconds:.1f}s")
    if args.json:
        print(json.dumps({"model": mcfg.model, "description": desc, "text": source,
                          "perplexity": result.perplexity, "nll": result.nll,
                          "tokens": result.tokens, "windows": result.windows,
                          "seq_len": result.seq_len, "seconds": round(result.seconds, 2)}))
    return 0
