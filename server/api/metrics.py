"""Prometheus metrics (prefix quantserve_, base units), fed from EngineStats once per engine step.

Counters and histograms are updated by `observe_step` (engine thread) and `observe_request`
(HTTP handlers); gauges that describe the present (queue, KV blocks, memory) are read at scrape
time by a collector, so they are never stale.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily

from server.engine.engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                   2.0, 3.0, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.5, 1.0, 2.5)
TOKENS_PER_S_WINDOW = 10.0


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("quantserve_requests", "Finished HTTP requests to the API",
                                ["endpoint", "status", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("quantserve_prompt_tokens", "Prompt tokens computed (prefill)",
                                     registry=r)
        self.generation_tokens = Counter("quantserve_generation_tokens", "Tokens generated",
                                         registry=r)
        self.preemptions = Counter("quantserve_preemptions", "Sequences preempted for KV space",
                                   registry=r)
        self.prefix_queries = Counter("quantserve_prefix_cache_queries",
                                      "Full prompt blocks looked up in the prefix cache", registry=r)
        self.prefix_hits = Counter("quantserve_prefix_cache_hits",
                                   "Full prompt blocks found in the prefix cache", registry=r)
        self.aborted = Counter("quantserve_aborted_requests", "Requests aborted (client gone, "
                               "shutdown)", registry=r)
        self.rejected = Counter("quantserve_rejected_requests", "Requests refused before running",
                                ["reason"], registry=r)
        self.ttft = Histogram("quantserve_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("quantserve_inter_token_latency_seconds",
                             "Time between consecutive tokens of a request", buckets=ITL_BUCKETS,
                             registry=r)
        self.e2e = Histogram("quantserve_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("quantserve_request_queue_time_seconds",
                                    "Arrival to first scheduled step", buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.step_time = Histogram("quantserve_engine_step_seconds", "Duration of one engine step",
                                   buckets=ITL_BUCKETS, registry=r)
        self.info = Info("quantserve_build", "Server version", registry=r)
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self._last_totals = (0, 0, 0)
        self.gauge_sources: list[Callable[[], list[GaugeMetricFamily]]] = []
        r.register(_CallbackCollector(self))
        self.tokens_per_second = Gauge("quantserve_generation_tokens_per_second",
                                       f"Generated tokens per second over the last "
                                       f"{TOKENS_PER_S_WINDOW:.0f} s", registry=r)
        self.tokens_per_second.set_function(self._rate)

    # ------------------------------------------------------------------ feeding

    def observe_step(self, stats: EngineStats) -> None:
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.step_time.observe(stats.step_seconds)
        for v in stats.time_to_first_token:
            self.ttft.observe(v)
        for v in stats.inter_token_latency:
            self.itl.observe(v)
        for f in stats.finished:
            self.e2e.observe(f.e2e_seconds)
            self.queue_time.observe(f.queue_seconds)
        pre, q, h = self._last_totals
        self.preemptions.inc(max(0, stats.num_preemptions_total - pre))
        self.prefix_queries.inc(max(0, stats.prefix_cache_queries_total - q))
        self.prefix_hits.inc(max(0, stats.prefix_cache_hits_total - h))
        self._last_totals = (stats.num_preemptions_total, stats.prefix_cache_queries_total,
                             stats.prefix_cache_hits_total)
        if stats.num_generation_tokens:
            with self._lock:
                self._window.append((time.monotonic(), stats.num_generation_tokens))

    def observe_request(self, endpoint: str, status: int, finish_reason: str | None) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status),
                             finish_reason=finish_reason or "none").inc()

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0][0] < now - TOKENS_PER_S_WINDOW:
                self._window.popleft()
            total = sum(n for _, n in self._window)
        return total / TOKENS_PER_S_WINDOW

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CallbackCollector:
    """Gauges computed at scrape time from the registered sources (engine state, memory, quant)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        for source in self.metrics.gauge_sources:
            yield from source()

    def describe(self):
        return []
