"""`quantserve serve | quantize | eval`: argparse -> frozen configs -> the work.

Every serve flag also reads QUANTSERVE_<FLAG> from the environment (see server.config). Errors
end with one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server.config import EngineConfig, ModelConfig, ServerConfig, env_default, read_api_keys

log = logging.getLogger("quantserve")


def _flag(p: argparse.ArgumentParser, name: str, default, help: str, **kw) -> None:
    kind = type(default) if default is not None and not isinstance(default, bool) else None
    if isinstance(default, bool):
        p.add_argument(name, action=argparse.BooleanOptionalAction, default=env_default(name, default),
                       help=help)
        return
    p.add_argument(name, default=env_default(name, default), type=kw.pop("type", kind), help=help, **kw)


def add_model_args(p: argparse.ArgumentParser) -> None:
    _flag(p, "--device", "auto", "auto | cuda | cpu", choices=["auto", "cuda", "cpu"])
    _flag(p, "--dtype", "auto", "activation dtype", choices=["auto", "float16", "bfloat16", "float32"])
    _flag(p, "--cache-dir", None, "where quantized models are cached (default: the user cache dir)",
          type=str)
    _flag(p, "--quantize-method", "gptq", "method for quantizing a plain model on first boot",
          choices=["gptq", "rtn"])
    _flag(p, "--quantize-bits", 4, "bits for first-boot quantization", type=int,
          choices=[2, 3, 4, 8])
    _flag(p, "--quantize-group-size", 64, "group size for first-boot quantization", type=int)
    _flag(p, "--quantize-calibration", None, "GPTQ calibration for first boot: default, builtin, "
          "generated, a text file, or hf:NAME[:CONFIG][:SPLIT]", type=str)
    _flag(p, "--kernel", None, "force one kernel backend for every layer (e.g. torch, dense)", type=str)
    _flag(p, "--load-format", "auto", "auto, or dummy: random 4-bit weights of a preset "
          "(llama-2-7b, llama-2-70b, llama-3-8b, ...) or config.json shape", choices=["auto", "dummy"])
    _flag(p, "--tokenizer", None, "tokenizer directory (default: the model's)", type=str)
    _flag(p, "--lm-head", "auto", "lm_head format: auto (8-bit packed on the CPU, dense on CUDA), "
          "dense, int8", choices=["auto", "dense", "int8"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantserve", description="GPTQ inference server")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible API")
    _flag(s, "--model", "default", "'default', a local directory or a Hugging Face id", type=str)
    _flag(s, "--served-model-name", None, "the model id clients use (default: the model's name)",
          type=str)
    _flag(s, "--host", "127.0.0.1", "address to listen on", type=str)
    _flag(s, "--port", 8000, "port to listen on", type=int)
    s.add_argument("--api-key", action="append", default=None,
                   help="accepted API key (repeatable; also QUANTSERVE_API_KEY, comma-separated)")
    _flag(s, "--api-key-file", None, "file with one API key per line", type=str)
    _flag(s, "--metrics-require-key", False, "require an API key on /metrics too")
    s.add_argument("--cors-origin", action="append", default=None,
                   help="allowed CORS origin (repeatable; also QUANTSERVE_CORS_ORIGIN, comma-separated)")
    add_model_args(s)
    _flag(s, "--block-size", 16, "tokens per KV-cache block", type=int)
    _flag(s, "--max-num-seqs", 128, "most sequences in one batch", type=int)
    _flag(s, "--max-num-batched-tokens", 1024, "token budget of one engine step", type=int)
    _flag(s, "--max-model-len", None, "context length (default: the model's, capped by the KV cache)",
          type=int)
    _flag(s, "--gpu-memory-utilization", 0.90, "fraction of GPU memory for weights + KV cache",
          type=float)
    _flag(s, "--kv-cache-gb", None, "KV cache size in GiB (CPU default 1)", type=float)
    _flag(s, "--prefix-caching", True, "share KV blocks of common prompt prefixes")
    _flag(s, "--enforce-eager", False, "no CUDA graphs")
    _flag(s, "--cuda-graph-max-batch", None,
          "largest decode batch replayed as a CUDA graph (default: --max-num-seqs)", type=int)
    _flag(s, "--max-queued-requests", 256, "requests waiting beyond this get 429", type=int)
    _flag(s, "--max-queued-tokens", 1_000_000, "queued prompt tokens beyond this get 429", type=int)
    _flag(s, "--max-body-bytes", 4 * 1024 * 1024, "largest request body (413 above)", type=int)
    _flag(s, "--shutdown-timeout", 30.0, "seconds in-flight requests get to finish on SIGTERM",
          type=float)
    _flag(s, "--log-level", "info", "logging level", choices=["debug", "info", "warning", "error"])
    _flag(s, "--skip-self-check", False, "start without checking every kernel against the float32 "
          "reference and decoding a golden prompt")
    _flag(s, "--allow-fallback", False, "serve layers that fail the self-check on the reference "
          "backend instead of refusing to start")

    q = sub.add_parser("quantize", help="quantize a model into a GPTQ checkpoint")
    q.add_argument("model", help="'default', a local directory or a Hugging Face id")
    q.add_argument("output_dir", help="where to write the GPTQ checkpoint")
    q.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    q.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    q.add_argument("--group-size", type=int, default=64, help="input channels per scale/zero "
                   "(-1: one group per row; the last group may be partial)")
    q.add_argument("--asym", action="store_true", help="asymmetric zero points (written as gptq_v2)")
    q.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=None,
                   help="act-order: process channels by decreasing activation energy (GPTQ only; "
                        "on by default for GPTQ)")
    q.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="with --desc-act: group scales fixed before any update, so g_idx stays "
                        "contiguous and serving needs no permutation (on by default with --desc-act)")
    q.add_argument("--calibration", default=None,
                   help="default (offline: built-in text + text the model writes), builtin, "
                        "generated, a text file, or hf:NAME[:CONFIG][:SPLIT]")
    q.add_argument("--num-samples", type=int, default=64, help="calibration samples")
    q.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample")
    q.add_argument("--damp-percent", type=float, default=0.01,
                   help="Hessian dampening, a fraction of its mean diagonal (raised if needed)")
    q.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="where quantization runs (auto: CUDA when present)")
    q.add_argument("--shard-size", default="4GB", help="largest safetensors shard, e.g. 2GB, 500MB")
    q.add_argument("--json", action="store_true", help="last line: one JSON object (times, losses)")

    e = sub.add_parser("eval", help="perplexity of a model over a text")
    e.add_argument("model", help="'default', a local directory (GPTQ or plain) or a Hugging Face id")
    e.add_argument("--text", default=None, help="UTF-8 text file (default: the built-in "
                   "calibration text, which a serious evaluation should not use)")
    e.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    e.add_argument("--stride", type=int, default=None,
                   help="window stride (default: seq-len, non-overlapping windows)")
    e.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    e.add_argument("--unquantized", action="store_true",
                   help="evaluate the plain float32 model (the baseline), not its GPTQ version")
    e.add_argument("--json", action="store_true", help="last line: one JSON object")
    add_model_args(e)
    return parser


def _split_env_list(values: list[str] | None, flag: str) -> tuple[str, ...]:
    if values:
        return tuple(values)
    raw = env_default(flag, "")
    return tuple(v.strip() for v in raw.split(",") if v.strip())


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        model=getattr(args, "model", "default"),
        served_model_name=getattr(args, "served_model_name", None),
        device=args.device, dtype=args.dtype,
        cache_dir=Path(args.cache_dir).expanduser() if args.cache_dir else None,
        kernel=args.kernel, quantize_method=args.quantize_method,
        quantize_bits=args.quantize_bits, quantize_group_size=args.quantize_group_size,
        quantize_calibration=args.quantize_calibration,
        load_format=args.load_format, tokenizer=args.tokenizer, lm_head=args.lm_head,
        self_check=not getattr(args, "skip_self_check", False),
        allow_fallback=getattr(args, "allow_fallback", False))


def serve(args: argparse.Namespace) -> int:
    from server.serve import run_server

    server_cfg = ServerConfig(
        host=args.host, port=args.port,
        api_keys=read_api_keys(args.api_key, args.api_key_file),
        metrics_require_key=args.metrics_require_key,
        cors_origins=_split_env_list(args.cors_origin, "--cors-origin"),
        max_queued_requests=args.max_queued_requests, max_queued_tokens=args.max_queued_tokens,
        max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level)
    engine_cfg = EngineConfig(
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gb=args.kv_cache_gb,
        enable_prefix_caching=args.prefix_caching, enforce_eager=args.enforce_eager,
        cuda_graph_max_batch=args.cuda_graph_max_batch)
    return run_server(model_config(args), engine_cfg, server_cfg)


def quantize(args: argparse.Namespace) -> int:
    from server.quantize_cmd import run_quantize

    return run_quantize(args)


def evaluate(args: argparse.Namespace) -> int:
    from server.quantize_cmd import run_eval

    return run_eval(args, model_config(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return {"serve": serve, "quantize": quantize, "eval": evaluate}[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, non-zero exit
        if getattr(args, "log_level", "info") == "debug":
            log.exception("failed")
        print(f"quantserve {args.command}: error: {exc}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
