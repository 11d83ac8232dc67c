"""The HPA's signal moves: quantserve_num_requests_waiting (the metric base/hpa.yaml scales on) is 0
while a replica keeps up and counts the requests it cannot fit into its batch once it is full."""

from __future__ import annotations

import asyncio

import httpx

from server.config import EngineConfig
from tests.k8s.manifests import one, render
from tests.k8s.scrape import metric
from tests.live_server import start_server

MAX_NUM_SEQS = 2
CONCURRENT = 6


async def waiting_under_load(url: str, name: str) -> tuple[float, float]:
    body = {"prompt": "Count slowly:", "max_tokens": 64, "ignore_eos": True, "stream": True}

    async def stream(client):
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for _ in r.aiter_lines():
                pass

    async with httpx.AsyncClient(timeout=120) as client:
        idle = metric((await client.get(url + "/metrics")).text, name)
        tasks = [asyncio.create_task(stream(client)) for _ in range(CONCURRENT)]
        peak = 0.0
        while not all(t.done() for t in tasks):
            peak = max(peak, metric((await client.get(url + "/metrics")).text, name))
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)
    return idle, peak


def test_hpa_metric_counts_requests_beyond_the_batch(tiny_checkpoint):
    hpa = one(render("base"), "HorizontalPodAutoscaler")
    name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    srv = start_server(str(tiny_checkpoint),
                       EngineConfig(kv_cache_gb=0.05, max_num_seqs=MAX_NUM_SEQS))
    try:
        idle, peak = asyncio.run(waiting_under_load(srv.url, name))
    finally:
        srv.stop()
    assert idle == 0
    assert peak >= 1, f"{name} never rose with {CONCURRENT} streams on a batch of {MAX_NUM_SEQS}"
    assert peak <= CONCURRENT - MAX_NUM_SEQS
