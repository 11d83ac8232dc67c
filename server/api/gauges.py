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
            _gauge("quantserve_kv_cache_blocks_capacity", "KV cache blocks in all",
                   s.kv_blocks_total),
            _gauge("quantserve_kv_cache_usage_ratio", "Used / total KV blocks (0-1)", s.kv_usage),
            _gauge("quantserve_queued_prompt_tokens", "Prompt tokens of requests waiting to run",
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
    """The NVML handle of torch's `device`, or None (no nvidia-ml-py, no driver, not CUDA).

    NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES, so the device is matched by UUID (then PCI
    bus id); a bare index is trusted only when CUDA_VISIBLE_DEVICES is unset."""
    if device.type != "cuda":
        return None
    try:
        import pynvml  # the optional extra: pip install 'quantserve[nvml]' (nvidia-ml-py)
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    lookups = []
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        lookups.append(lambda: pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}"))
    if getattr(props, "pci_bus_id", None) is not None:
        bus = (f"{getattr(props, 'pci_domain_id', 0):08X}:{props.pci_bus_id:02X}:"
               f"{getattr(props, 'pci_device_id', 0):02X}.0")
        lookups.append(lambda: pynvml.nvmlDeviceGetHandleByPciBusId(bus))
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        lookups.append(lambda: pynvml.nvmlDeviceGetHandleByIndex(index))
    for lookup in lookups:
        try:
            return lookup()
        except Exception:
            continue
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
        moved = fallbacks or {}
        for name in sorted(set(backends) | set(moved)):  # 0 for every backend in use: no gaps
            falls.add_metric([name], moved.get(name, 0))
        return [info, layers, falls]
    return collect


SELF_CHECK_STATES = ("passed", "fallback", "skipped", "not_run")


def self_check_gauges(report) -> GaugeSource:
    """`report`: server.selfcheck_report.SelfCheckReport, or None when the check was never run."""
    current = report.status if report is not None else "not_run"

    def collect() -> list[GaugeMetricFamily]:
        status = GaugeMetricFamily("quantserve_self_check_status",
                                   "Outcome of the start-up self-check (1 on the current state)",
                                   labels=["state"])
        for state in SELF_CHECK_STATES:
            status.add_metric([state], 1.0 if state == current else 0.0)
        out = [status]
        if report is not None and report.status != "skipped":
            out.append(_gauge("quantserve_self_check_duration_seconds",
                              "Wall time of the start-up self-check", report.seconds))
            worst = GaugeMetricFamily("quantserve_self_check_max_relative_error",
                                      "Worst relative error of a kernel backend against the float32 "
                                      "reference at start-up (before any fallback)",
                                      labels=["backend"])
            for name, err in sorted(report.max_rel_error.items()):
                worst.add_metric([name], err)
            out.append(worst)
        return out
    return collect
