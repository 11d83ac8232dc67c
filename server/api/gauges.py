"""Scrape-time gauges: engine queue and KV state, memory (VRAM / RSS), quantisation facts."""

from __future__ import annotations

import os
from typing import Callable

import psutil
import torch
from prometheus_client.core import GaugeMetricFamily

from quant.format import QuantConfig
from server.engine.async_engine import AsyncEngine

GaugeSource = Callable[[], list[GaugeMetricFamily]]


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
    if labels:
        g.add_metric(list(labels.values()), value)
    else:
        g.add_metric([], value)
    return g


def engine_gauges(engine: AsyncEngine) -> GaugeSource:
    def collect() -> list[GaugeMetricFamily]:
        s = engine.last_stats
        return [
            _gauge("quantserve_num_requests_running", "Sequences in the running batch", s.num_running),
            _gauge("quantserve_num_requests_waiting", "Sequences waiting to be scheduled",
                   s.num_waiting),
            _gauge("quantserve_num_requests_in_flight", "HTTP requests being served",
                   engine.num_in_flight),
            _gauge("quantserve_kv_cache_blocks_used", "KV cache blocks in use", s.kv_blocks_used),
            _gauge("quantserve_kv_cache_blocks_total", "KV cache blocks in all", s.kv_blocks_total),
            _gauge("quantserve_kv_cache_usage_ratio", "Used / total KV blocks (0-1)", s.kv_usage),
            _gauge("quantserve_queued_prompt_tokens", "Prompt tokens of requests not finished",
                   engine.queued_prompt_tokens),
        ]
    return collect


def memory_gauges(weight_bytes: int, kv_cache_bytes: int, device: torch.device) -> GaugeSource:
    process = psutil.Process(os.getpid())
    nvml = _nvml_handle(device)

    def collect() -> list[GaugeMetricFamily]:
        out = [
            _gauge("quantserve_model_weight_bytes", "Bytes of model weights as loaded", weight_bytes),
            _gauge("quantserve_kv_cache_bytes", "Bytes allocated to the KV cache", kv_cache_bytes),
            _gauge("quantserve_process_resident_memory_bytes", "Resident set size of the server",
                   process.memory_info().rss),
        ]
        if device.type == "cuda":
            idx = {"device": str(device.index or 0)}
            out += [
                _gauge("quantserve_torch_allocated_bytes", "CUDA memory held by tensors",
                       torch.cuda.memory_allocated(device), idx),
                _gauge("quantserve_torch_reserved_bytes", "CUDA memory reserved by torch's allocator",
                       torch.cuda.memory_reserved(device), idx),
            ]
            free, total = torch.cuda.mem_get_info(device)
            used = total - free
            if nvml is not None:
                try:
                    import pynvml

                    info = pynvml.nvmlDeviceGetMemoryInfo(nvml)
                    used, total = info.used, info.total
                except Exception:
                    pass
            out += [
                _gauge("quantserve_device_memory_used_bytes", "Device memory in use (all processes)",
                       used, idx),
                _gauge("quantserve_device_memory_total_bytes", "Device memory in all", total, idx),
            ]
        return out
    return collect


def _nvml_handle(device: torch.device):
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except Exception:
        return None


def quant_gauges(quant: QuantConfig | None, checkpoint_format: str, backends: dict[str, int],
                 fallbacks: dict[str, int] | None = None) -> GaugeSource:
    def collect() -> list[GaugeMetricFamily]:
        info = GaugeMetricFamily("quantserve_quantization_info",
                                 "Quantisation of the served model (value 1; facts in labels)",
                                 labels=["method", "bits", "group_size", "desc_act", "sym",
                                         "checkpoint_format"])
        if quant is None:
            info.add_metric(["none", "16", "0", "false", "true", "dense"], 1)
        else:
            info.add_metric(["gptq", str(quant.bits), str(quant.group_size),
                             str(quant.desc_act).lower(), str(quant.sym).lower(), checkpoint_format], 1)
        layers = GaugeMetricFamily("quantserve_kernel_backend_layers",
                                   "Quantised layers served by each kernel backend",
                                   labels=["backend"])
        for name, count in sorted(backends.items()):
            layers.add_metric([name], count)
        falls = GaugeMetricFamily("quantserve_kernel_fallback_layers",
                                  "Layers moved to the reference path by the start-up self-check",
                                  labels=["backend"])
        for name, count in sorted((fallbacks or {}).items()):
            falls.add_metric([name], count)
        return [info, layers, falls]
    return collect
