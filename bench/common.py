"""Shared helpers for the benchmarks: GPU identity, copy bandwidth, result files."""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def copy_bandwidth(gib: float = 2.0) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / sorted(times)[len(times) // 2]


def write_result(kind: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"device": device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), **payload}
    path = RESULTS / f"{kind}-{slug(payload['device'])}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
