"""SIGTERM on a real `python -m server.cli serve` process with streams in flight.

While draining: /ready is 503, new requests get 503 with OpenAI's error object, and every request
admitted before the signal (running or still queued) completes normally with [DONE]; then the
process exits 0. If --shutdown-timeout runs out first, what is left gets an error event and
[DONE], and the process still exits 0, promptly.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from tests.subprocess_server import start_server_process


def read_stream(url: str, payload: dict, out: dict, started: threading.Event) -> None:
    events = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=payload, timeout=60) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
    except Exception as exc:  # recorded, asserted on by the test
        out["error"] = repr(exc)
    finally:
        out["events"] = events
        started.set()


def start_streams(url: str, n: int, max_tokens: int) -> list[tuple[threading.Thread, dict]]:
    streams = []
    for i in range(n):
        out: dict = {}
        started = threading.Event()
        payload = {"prompt": f"Stream number {i}", "max_tokens": max_tokens, "temperature": 0,
                   "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        t = threading.Thread(target=read_stream, args=(url, payload, out, started), daemon=True)
        t.start()
        if i == 0:
            assert started.wait(60), "the first stream never started"
        streams.append((t, out))
    # with --max-num-seqs 1: one runs and the others are admitted and waiting before the signal
    deadline = time.monotonic() + 30
    while f"quantserve_num_requests_waiting {n - 1}.0" not in httpx.get(url + "/metrics", timeout=5).text:
        assert time.monotonic() < deadline, "streams not admitted"
        time.sleep(0.02)
    return streams


def test_sigterm_drains_in_flight_streams_then_exits_0(tiny_checkpoint, tmp_path):
    srv = start_server_process(tiny_checkpoint, tmp_path / "server.log", "--max-num-seqs", "1",
                               "--shutdown-timeout", "60")
    try:
        # one stream running, two admitted and waiting behind it (one sequence at a time)
        streams = start_streams(srv.url, 3, max_tokens=200)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        ready = None
        while time.monotonic() - t0 < 5:
            ready = httpx.get(srv.url + "/ready", timeout=5)
            if ready.status_code == 503:
                break
            time.sleep(0.01)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "server_draining"
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_draining"
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=5, json={
            "messages": [{"role": "user", "content": "late"}], "stream": True})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
        assert srv.proc.poll() is None, "exited before the streams finished"
        for t, out in streams:
            t.join(60)
            assert out.get("status") == 200 and "error" not in out, out.get("error")
            assert out["events"][-1] == "[DONE]"
            chunks = [json.loads(e) for e in out["events"][:-1]]
            assert chunks[-1]["usage"]["completion_tokens"] == 200  # ran to the end, not cut
            assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert srv.proc.wait(30) == 0, srv.log()[-3000:]
        assert time.monotonic() - t0 < 60
    finally:
        srv.stop()


def test_shutdown_timeout_bounds_the_drain(tiny_checkpoint, tmp_path):
    srv = start_server_process(tiny_checkpoint, tmp_path / "server.log", "--max-num-seqs", "1",
                               "--shutdown-timeout", "1")
    try:
        streams = start_streams(srv.url, 4, max_tokens=450)  # several seconds of work, one at a time
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(20) == 0, srv.log()[-3000:]
        elapsed = time.monotonic() - t0
        # timeout + final grace + process teardown (loose: the cut below proves the deadline acted)
        assert elapsed < 1 + 2 + 7, elapsed
        cut = 0
        for t, out in streams:
            t.join(10)
            events = out["events"]
            assert events and events[-1] == "[DONE]", out
            last = json.loads(events[-2])
            if "error" in last:  # failed at the deadline: OpenAI's error object, then [DONE]
                cut += 1
                assert last["error"]["type"] == "server_error"
                assert "shutting down" in last["error"]["message"]
        assert cut >= 1
    finally:
        srv.stop()
