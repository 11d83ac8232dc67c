"""A bounded soak: 128 concurrent streaming clients for 60 s against a real server process on the
tiny model (completions and chat, varied lengths, greedy). Every stream must succeed and carry
exactly the text the same request gives when sent alone; afterwards the KV cache is empty, no
request is left anywhere, and the server's RSS has not grown after warm-up.

RSS: after the warm-up every allocator arena, pymalloc pool and tokenizer cache has reached its
working size for 128 concurrent streams. RSS still dips now and then by ~20 MiB for a few seconds
(glibc trims its heap, then grows back), so each figure is the peak over a 10 s window, not one
sample. Measured: +0.1 MiB over a 60 s soak, +4 MiB over 150 s and 4,437 streams. The bound,
12 MiB, fails on a leak of ~3-6 KiB per stream (the soak serves 2,000-4,000 of them, each with a
Sequence, an asyncio queue, an SSE response and dozens of chunk objects); leaks of counted things
(requests, queue entries, KV blocks) are caught exactly by the gauges checked at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx
import psutil
import pytest

from tests.subprocess_server import metric, start_server_process

SOAK_SECONDS = float(os.environ.get("QUANTSERVE_SOAK_SECONDS", "60"))
WARMUP_SECONDS = min(15.0, SOAK_SECONDS / 4)
CLIENTS = 128
RSS_TOLERANCE = 12 * 2**20
RSS_WINDOW = 10.0


def request_specs() -> list[tuple[str, dict]]:
    specs = []
    for i in range(24):
        max_tokens = 8 + (i * 7) % 41
        if i % 3 == 0:
            specs.append(("/v1/chat/completions", {
                "messages": [{"role": "user", "content": f"Tell me about topic number {i}"}],
                "max_tokens": max_tokens, "temperature": 0}))
        else:
            specs.append(("/v1/completions", {"prompt": f"Story {i}: once upon a time in place {i * 13}",
                                              "max_tokens": max_tokens, "temperature": 0}))
    return specs


def text_of(path: str, body: dict) -> str:
    c = body["choices"][0]
    return c["text"] if path == "/v1/completions" else c["message"]["content"]


async def one_stream(client: httpx.AsyncClient, url: str, path: str, payload: dict) -> str:
    pieces = []
    last = None
    async with client.stream("POST", url + path, json={**payload, "stream": True}) as r:
        if r.status_code != 200:
            raise AssertionError(f"status {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            last = line[6:]
            if last == "[DONE]":
                break
            chunk = json.loads(last)
            if "error" in chunk:
                raise AssertionError(f"error event: {chunk['error']}")
            for c in chunk["choices"]:
                pieces.append(c["text"] if path == "/v1/completions" else c["delta"].get("content", ""))
    if last != "[DONE]":
        raise AssertionError("stream ended without [DONE]")
    return "".join(pieces)


async def soak(url: str, specs, expected, seconds: float) -> dict:
    limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=CLIENTS + 8)
    stats = {"streams": 0, "errors": 0, "mismatches": 0, "first_errors": []}
    deadline = time.monotonic() + seconds

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        k = i
        while time.monotonic() < deadline:
            path, payload = specs[k % len(specs)]
            try:
                text = await one_stream(client, url, path, payload)
                if text != expected[k % len(specs)]:
                    stats["mismatches"] += 1
                    if len(stats["first_errors"]) < 5:
                        stats["first_errors"].append(f"spec {k % len(specs)}: {text!r} != "
                                                     f"{expected[k % len(specs)]!r}")
                stats["streams"] += 1
            except Exception as exc:
                stats["errors"] += 1
                if len(stats["first_errors"]) < 5:
                    stats["first_errors"].append(repr(exc)[:300])
            k += 7

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(CLIENTS)))
    return stats


@pytest.mark.slow
def test_soak_128_streams(tiny_checkpoint, tmp_path):
    # glibc returns freed heap to the OS in bursts (RSS dips of ~30 MiB that come and go); with
    # trimming off, RSS is the heap's high-water mark, which settles after the warm-up unless
    # memory leaks, so the comparison below measures leaks rather than trim timing
    srv = start_server_process(tiny_checkpoint, tmp_path / "server.log",
                               extra_env={"MALLOC_TRIM_THRESHOLD_": str(2**30)})
    try:
        specs = request_specs()
        expected = []
        for path, payload in specs:  # one at a time: the reference texts
            r = httpx.post(srv.url + path, json=payload, timeout=60)
            assert r.status_code == 200, r.text
            expected.append(text_of(path, r.json()))
        assert len(set(expected)) > len(expected) // 2 and all(expected)

        proc = psutil.Process(srv.proc.pid)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def sample_rss() -> None:
            while not stop.wait(0.5):
                samples.append((time.monotonic() - t0, proc.memory_info().rss))

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        stats = asyncio.run(soak(srv.url, specs, expected, SOAK_SECONDS))
        stop.set()
        sampler.join()
        elapsed = time.monotonic() - t0

        warm = [rss for t, rss in samples if WARMUP_SECONDS <= t < WARMUP_SECONDS + RSS_WINDOW]
        late = [rss for t, rss in samples if SOAK_SECONDS - RSS_WINDOW <= t < SOAK_SECONDS]
        rss_warm, rss_late = max(warm), max(late)
        print(f"\nsoak: {stats['streams']} streams by {CLIENTS} clients in {elapsed:.1f}s, "
              f"{stats['errors']} errors, {stats['mismatches']} mismatches; RSS after warm-up "
              f"{rss_warm / 2**20:.1f} MiB, at the end {rss_late / 2**20:.1f} MiB "
              f"({(rss_late - rss_warm) / 2**20:+.1f} MiB)")
        assert stats["errors"] == 0 and stats["mismatches"] == 0, stats["first_errors"]
        assert stats["streams"] >= CLIENTS * 2  # every client ran streams through the whole soak
        assert rss_late - rss_warm <= RSS_TOLERANCE

        deadline = time.monotonic() + 10
        while True:  # nothing left behind: the gauges read the engine itself
            m = httpx.get(srv.url + "/metrics", timeout=10).text
            left = {name: metric(m, name) for name in (
                "quantserve_kv_cache_blocks_used", "quantserve_num_requests_running",
                "quantserve_num_requests_waiting", "quantserve_num_requests_in_flight",
                "quantserve_queued_prompt_tokens")}
            if not any(left.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not any(left.values()), left
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, srv.log()[-3000:]
