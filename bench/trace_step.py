"""The decode step's linears as bench/kernels.py times them (the same random 4-bit g128 layers, own
weights per layer, one CUDA graph of the 129 calls), replayed once in a trace build of the kernels:
the part bench/gemv_timeline.py and bench/gemm_timeline.py share."""

from __future__ import annotations

import os

import torch

from bench.kernels import SHAPES, capture_graph, ours_call, ours_make, step_calls, step_order
from quant.backends import cuda as cuda_backend


def trace_extension():
    """The extension's trace build (QUANTSERVE_CUDA_TRACE=1, a separate cached build; set here before
    the extension is first built or loaded in this process)."""
    os.environ["QUANTSERVE_CUDA_TRACE"] = "1"
    return cuda_backend.extension()


def step_weights(layers: int) -> dict[str, list]:
    """Every layer's own weights: `layers` copies of each shape, one lm_head."""
    return {s: [ours_make(*SHAPES[s]) for _ in range(layers if s != "lm_head" else 1)] for s in SHAPES}


def weight_keys(weights: dict[str, list]) -> dict[int, str]:
    """The trace key of each layer's weights (qweight address >> 8, 32 bits) -> its shape name."""
    return {(w.qweight.data_ptr() >> 8) & 0xFFFFFFFF: s for s, ws in weights.items() for w in ws}


def step_graph(m: int, layers: int, weights: dict[str, list]) -> tuple[torch.cuda.CUDAGraph, dict]:
    """The step's calls at m tokens, captured, and the fp16 inputs it reads (keep them alive while it
    is replayed)."""
    xs = {k: torch.randn(m, k, device="cuda", dtype=torch.float16) for k in {4096, 11008}}
    return capture_graph(step_calls(step_order(layers), weights, xs, ours_call())), xs


def replay_traced(graph: torch.cuda.CUDAGraph, take) -> tuple[torch.Tensor, float]:
    """One replay's trace records (take(): the extension's *_trace_take, called once before to drop
    the warm-up replays' records) and its event-timed milliseconds."""
    torch.cuda.synchronize()
    take()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return take(), start.elapsed_time(end)
