"""Two real replicas behind a real load balancer: nginx on loopback in front of two
`python -m server.cli serve` processes configured from the base Deployment's environment.

Concurrent streaming completions spread over both replicas (each replica's /metrics counts its
share); one replica gets SIGTERM mid-load, as the kubelet sends it after preStop: its streams in
flight finish whole ([DONE], finish_reason, every token), the requests that reach it while it drains
get 503 and nginx retries them on the other replica, no client sees an error, and the drained
process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from server.config import ENV_PREFIX
from tests.k8s.manifests import ROOT, env_values, render, server_container
from tests.k8s.nginx import nginx_binary, start_nginx
from tests.k8s.scrape import metric
from tests.live_server import free_port

MAX_TOKENS = 48
CLIENTS = 8
SPREAD_MIN = 2  # completed requests each replica must show before the SIGTERM


@dataclass
class Replica:
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Result:
    start: float
    end: float = 0.0
    status: int = 0
    upstreams: list[str] = field(default_factory=list)
    upstream_statuses: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    completion_tokens: int | None = None
    done: bool = False
    error: str | None = None


def start_replica(checkpoint: Path, tmp: Path, name: str) -> Replica:
    """`quantserve serve` with the base Deployment's literal env (minus what only makes sense in a
    pod: the listen address, the cache volume), the tiny model, and a free port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(env_values(server_container(render("base"))))
    cache = tmp / f"cache-{name}"
    env.update(HF_HOME=str(cache / "huggingface"), XDG_CACHE_HOME=str(cache / "xdg"),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    port = free_port()
    log = tmp / f"replica-{name}.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(checkpoint), "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), "--cache-dir", str(cache),
           "--kv-cache-gb", "0.1", "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Replica(port, proc, log)


def wait_ready(replicas: list[Replica], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    pending = list(replicas)
    while pending and time.monotonic() < deadline:
        for r in list(pending):
            if r.proc.poll() is not None:
                raise AssertionError(f"replica exited with {r.proc.returncode}:\n{r.log.read_text()}")
            try:
                if httpx.get(r.url + "/ready", timeout=1).status_code == 200:
                    pending.remove(r)
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    assert not pending, "replicas not ready in time:\n" + "\n".join(r.log.read_text() for r in pending)


def completed(text: str) -> int:
    return int(metric(text, "quantserve_requests_total", endpoint="/v1/completions", status="200"))


async def one_stream(client: httpx.AsyncClient, url: str, i: int) -> Result:
    res = Result(start=time.monotonic())
    body = {"prompt": f"Request {i}: tell me about load balancers.", "max_tokens": MAX_TOKENS,
            "stream": True, "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            res.status = r.status_code
            res.upstreams = [u.strip() for u in r.headers.get("x-upstream", "").split(",")]
            res.upstream_statuses = r.headers.get("x-upstream-status", "")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    res.done = True
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"]["message"]
                for choice in obj.get("choices", []):
                    if choice.get("finish_reason"):
                        res.finish_reasons.append(choice["finish_reason"])
                if obj.get("usage"):
                    res.completion_tokens = obj["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.end = time.monotonic()
    return res


async def drive(lb_url: str, a: Replica, b: Replica) -> dict:
    results: list[Result] = []
    stop = asyncio.Event()
    counter = iter(range(10**6))

    async def client_loop(client):
        while not stop.is_set():
            results.append(await one_stream(client, lb_url, next(counter)))

    async with httpx.AsyncClient(timeout=120) as client, httpx.AsyncClient(timeout=5) as probe:
        workers = [asyncio.create_task(client_loop(client)) for _ in range(CLIENTS)]
        # 1. both replicas serve a share, and a stream is running on A
        deadline = time.monotonic() + 60
        while True:
            a_text = (await probe.get(a.url + "/metrics")).text
            b_text = (await probe.get(b.url + "/metrics")).text
            a_done, b_done = completed(a_text), completed(b_text)
            if (a_done >= SPREAD_MIN and b_done >= SPREAD_MIN
                    and metric(a_text, "quantserve_num_requests_in_flight") >= 1):
                break
            assert time.monotonic() < deadline, f"load did not spread: A {a_done}, B {b_done}"
            await asyncio.sleep(0.05)
        # 2. SIGTERM to A, as the kubelet sends it once preStop is over
        t_term = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        # 3. keep the load on until A has exited and B has served a few more
        while a.proc.poll() is None:
            assert time.monotonic() - t_term < 90, "the drained replica did not exit"
            await asyncio.sleep(0.05)
        t_exit = time.monotonic()
        after = len(results)
        while len(results) < after + CLIENTS and time.monotonic() - t_exit < 30:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*workers)
        b_final = completed((await probe.get(b.url + "/metrics")).text)
    return dict(results=results, t_term=t_term, t_exit=t_exit, a_before=a_done, b_before=b_done,
                b_final=b_final)


@pytest.mark.slow
def test_two_replicas_behind_nginx_drain_without_client_errors(tiny_checkpoint, tmp_path):
    nginx_binary()  # fail or skip before starting anything
    replicas = [start_replica(tiny_checkpoint, tmp_path, n) for n in ("a", "b")]
    lb = None
    try:
        wait_ready(replicas)
        a, b = replicas
        lb = start_nginx(free_port(), [a.port, b.port], tmp_path / "nginx")
        run = asyncio.run(drive(lb.url, a, b))
        results: list[Result] = run["results"]
        print(f"{len(results)} streams; before SIGTERM A {run['a_before']} B {run['b_before']}; "
              f"drain {run['t_exit'] - run['t_term']:.2f} s; statuses "
              f"{sorted({r.upstream_statuses for r in results})}; retried "
              f"{sum(len(r.upstreams) > 1 for r in results)}")
        context = f"nginx:\n{lb.log()[-3000:]}\nreplica A:\n{a.log.read_text()[-3000:]}"

        # load spread over both replicas (their own /metrics)
        assert run["a_before"] >= SPREAD_MIN and run["b_before"] >= SPREAD_MIN

        # zero client errors: every stream whole
        bad = [r for r in results if r.status != 200 or r.error or not r.done
               or r.finish_reasons != ["length"] or r.completion_tokens != MAX_TOKENS]
        assert not bad, f"{len(bad)} of {len(results)} requests failed: {bad[:3]}\n{context}"

        # streams running on A when it got SIGTERM finished whole (checked above) and were there
        on_a = [r for r in results if r.upstreams[-1] == a.addr]
        cut = [r for r in on_a if r.start < run["t_term"] < r.end]
        assert cut, "no stream was in flight on the drained replica at SIGTERM"

        # new requests went to B; the ones that reached A while it drained or after it exited were
        # retried there by nginx (a 503 from the drain, or a refused connection)
        late = [r for r in results if r.start > run["t_term"] + 0.1]
        assert late and all(r.upstreams[-1] == b.addr for r in late), context
        retried = [r for r in results if r.upstreams == [a.addr, b.addr]]
        assert retried, f"nginx never had to retry on the other replica\n{context}"
        # 503: refused while draining; 502: nginx's status for a connection A refused or closed
        assert all(re.fullmatch(r"50[23], 200", r.upstream_statuses) for r in retried), context

        # the drained replica exited 0; B's own count matches what the clients saw it serve
        assert a.proc.returncode == 0, context
        assert run["t_exit"] - run["t_term"] < 60  # its QUANTSERVE_SHUTDOWN_TIMEOUT
        assert run["b_final"] == sum(1 for r in results if r.upstreams[-1] == b.addr)
    finally:
        if lb is not None:
            lb.stop()
        for r in replicas:
            if r.proc.poll() is None:
                r.proc.kill()
            r.proc.wait(10)
