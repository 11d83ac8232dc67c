"""Frozen configuration of the three layers; the only place that reads environment variables.

Every `quantserve serve` flag can also come from an environment variable QUANTSERVE_<FLAG>
(upper case, dashes as underscores), which is how the Docker image and Kubernetes set them.
Flags given on the command line win over the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "QUANTSERVE_"


def env_name(flag: str) -> str:
    """'--max-queued-requests' -> 'QUANTSERVE_MAX_QUEUED_REQUESTS'."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def env_default(flag: str, default):
    """The default for a CLI flag: its environment variable when set, else `default`."""
    raw = os.environ.get(env_name(flag))
    if raw is None or raw.strip() == "":  # set but empty (compose's ${VAR:-}) means unset
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def read_api_keys(cli_keys: list[str] | None, key_file: str | None) -> tuple[str, ...]:
    """API keys from --api-key (repeatable), QUANTSERVE_API_KEY (comma-separated) and a file
    (one key per line, # comments). Never logged."""
    keys: list[str] = list(cli_keys or [])
    env = os.environ.get(env_name("api-key"))
    if env and not cli_keys:
        keys += [k.strip() for k in env.split(",")]
    path = key_file or os.environ.get(env_name("api-key-file"))
    if path:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return tuple(k for k in keys if k)


@dataclass(frozen=True)
class ModelConfig:
    model: str = "default"  # 'default', a local directory or a Hugging Face id
    served_model_name: str | None = None
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto | float16 | bfloat16 | float32
    cache_dir: Path | None = None
    kernel: str | None = None  # force one kernel backend for every layer
    quantize_method: str = "gptq"  # first boot of a plain model: gptq | rtn
    quantize_bits: int = 4
    quantize_group_size: int = 64
    quantize_calibration: str | None = None  # GPTQ calibration source (quant.data); None = default
    lm_head: str = "auto"  # auto (int8-packed on the CPU, dense on CUDA) | dense | int8
    load_format: str = "auto"  # auto | dummy (random packed weights of a preset / config shape)
    tokenizer: str | None = None  # tokenizer directory (default: the checkpoint's, or SmolLM2's)
    self_check: bool = True  # kernels vs the float32 reference + a golden decode before serving
    allow_fallback: bool = False  # serve layers that fail the self-check on the reference path


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # None: the model's, capped by what the KV cache holds
    gpu_memory_utilization: float = 0.90
    kv_cache_gb: float | None = None  # CPU default 1 GiB; on CUDA overrides the utilization rule
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs
    cuda_graph_max_batch: int | None = None  # largest decode batch replayed as a graph (None: max_num_seqs)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    metrics_require_key: bool = False
    cors_origins: tuple[str, ...] = ()
    max_queued_requests: int = 256
    max_queued_tokens: int = 1_000_000
    max_body_bytes: int = 4 * 1024 * 1024
    shutdown_timeout: float = 30.0
    log_level: str = "info"
