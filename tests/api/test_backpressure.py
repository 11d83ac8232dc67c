"""Backpressure and cancellation on a live server whose engine is slowed down (a sleep per step),
so that requests are reliably running or waiting when the test acts.

Queue limits: 429 with Retry-After past --max-queued-requests / --max-queued-tokens, counting
requests waiting in the engine (not running ones); a request that could never fit is a 400.
Cancellation: a client that goes away (streaming or not, running or waiting) has its sequence
aborted, and its KV blocks are free within one engine step of the abort.
"""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest

from server.config import EngineConfig, ServerConfig
from server.engine.sequence import FinishReason
from tests.api.conftest import wait_idle
from tests.live_server import start_server

STEP_SLEEP = 0.02


@contextlib.contextmanager
def slow_engine(srv, seconds: float = STEP_SLEEP):
    runner = srv.engine.runner
    execute = runner.execute

    def slowed(batch):
        time.sleep(seconds)
        return execute(batch)

    runner.execute = slowed
    try:
        yield
    finally:
        del runner.execute  # back to the class method


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def narrow(tiny_checkpoint):
    """One sequence runs at a time; at most 4 requests / 100 prompt tokens may wait."""
    srv = start_server(str(tiny_checkpoint), served_model_name="tiny",
                       engine_config=EngineConfig(kv_cache_gb=0.05, max_num_seqs=1),
                       server_config=ServerConfig(max_queued_requests=4, max_queued_tokens=100))
    yield srv
    srv.stop()


def long_stream(client: httpx.Client, url: str, prompt, stack: contextlib.ExitStack) -> httpx.Response:
    r = stack.enter_context(client.stream("POST", url + "/v1/completions", json={
        "prompt": prompt, "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}))
    return r


def test_queue_limits_give_429_with_retry_after_and_never_leak(narrow):
    url = narrow.url
    qs = narrow.state.engine
    with slow_engine(narrow), httpx.Client(timeout=30) as client, contextlib.ExitStack() as stack:
        assert long_stream(client, url, [11] * 30, stack).status_code == 200
        # the running one does not count as queued (from the end of its first step on)
        wait_for(lambda: qs.queue_depth() == (0, 0) and len(narrow.engine.scheduler.running) == 1)
        for _ in range(3):
            assert long_stream(client, url, [12] * 30, stack).status_code == 200
        assert qs.queue_depth() == (3, 90)
        r = client.post(url + "/v1/completions", json={"prompt": [13] * 30, "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and "90 prompt tokens" in r.text
        assert long_stream(client, url, [14] * 5, stack).status_code == 200  # 95 tokens: fits
        r = client.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and "4 requests are waiting" in r.json()["error"]["message"]
        r = client.post(url + "/v1/completions", json={"prompt": "x", "n": 5, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"
        r = client.post(url + "/v1/completions", json={"prompt": [5] * 150, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"
        assert qs.queue_depth() == (4, 95)
        metrics = client.get(url + "/metrics").text
        assert 'quantserve_rejected_requests_total{reason="queue_full"} 1.0' in metrics
        assert 'quantserve_rejected_requests_total{reason="token_limit"} 1.0' in metrics
    # every stream closed by the client: all aborted, nothing left behind
    assert not any(wait_idle(narrow).values()), wait_idle(narrow)
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


def test_a_waiting_client_that_leaves_is_dequeued(narrow):
    qs = narrow.state.engine
    with slow_engine(narrow), httpx.Client(timeout=30) as client:
        with contextlib.ExitStack() as running:
            long_stream(client, narrow.url, [21] * 8, running)
            wait_for(lambda: len(narrow.engine.scheduler.running) == 1)
            with contextlib.ExitStack() as waiting:
                long_stream(client, narrow.url, [22] * 8, waiting)
                wait_for(lambda: qs.queue_depth() == (1, 8))
            wait_for(lambda: qs.queue_depth() == (0, 0), timeout=2)
            assert len(narrow.engine.scheduler.running) == 1  # the other one still runs
    assert not any(wait_idle(narrow).values())


class AbortProbe:
    """Records, at the moment the API aborts a request, how many tokens its sequence had."""

    def __init__(self, srv) -> None:
        self.srv = srv
        self.at_abort: dict[str, int] = {}
        self.seqs: dict[str, object] = {}
        self._abort = srv.state.engine.abort

    def __enter__(self):
        def abort(request_id, *args):
            seq = self.seqs.get(request_id) or self.srv.engine.requests.get(request_id)
            if seq is not None and request_id not in self.at_abort:
                self.seqs[request_id] = seq
                self.at_abort[request_id] = seq.num_output_tokens
            return self._abort(request_id, *args)

        self.srv.state.engine.abort = abort
        return self

    def __exit__(self, *exc):
        del self.srv.state.engine.abort

    def grab_running(self, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rid, seq in list(self.srv.engine.requests.items()):
                if seq.num_output_tokens > 2:
                    self.seqs[rid] = seq
                    return rid, seq
            time.sleep(0.005)
        raise AssertionError("no running request found")


def check_freed_within_a_step(srv, probe: AbortProbe, rid: str, seq) -> None:
    left = wait_idle(srv, timeout=5)
    assert not any(left.values()), left
    assert rid in probe.at_abort, "the request was never aborted"
    assert seq.finish_reason == FinishReason.ABORT
    # a step may have been running when the abort came: at most one more token, then freed
    assert seq.num_output_tokens - probe.at_abort[rid] <= 1
    assert seq.num_output_tokens < 400 and not seq.block_table


def test_streaming_client_disconnect_frees_kv_within_a_step(live):
    payload = {"prompt": "Disconnect me", "max_tokens": 400, "temperature": 0, "stream": True,
               "ignore_eos": True}
    with slow_engine(live), AbortProbe(live) as probe:
        with httpx.stream("POST", live.url + "/v1/completions", json=payload, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            rid, seq = probe.grab_running()
        # leaving the block closed the connection mid-stream
        check_freed_within_a_step(live, probe, rid, seq)


def test_non_streaming_client_disconnect_frees_kv_within_a_step(live):
    payload = {"prompt": "Wait for me", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with slow_engine(live), AbortProbe(live) as probe:
        found = {}

        def grab():
            found["x"] = probe.grab_running()

        t = threading.Thread(target=grab)
        t.start()
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the socket
            httpx.post(live.url + "/v1/completions", json=payload, timeout=httpx.Timeout(30, read=0.5))
        t.join()
        check_freed_within_a_step(live, probe, *found["x"])


def test_many_clients_leaving_at_once_leave_nothing_behind(live):
    payload = {"prompt": "crowd", "max_tokens": 400, "temperature": 0, "stream": True,
               "ignore_eos": True, "n": 2}
    with slow_engine(live, 0.005), httpx.Client(timeout=30) as client:
        with contextlib.ExitStack() as stack:
            streams = [stack.enter_context(client.stream("POST", live.url + "/v1/completions",
                                                         json=payload)) for _ in range(16)]
            lines = [r.iter_lines() for r in streams]  # (a dropped iterator closes its connection)
            for it in lines:
                next(it)
            wait_for(lambda: len(live.engine.scheduler.running) == 32)
        left = wait_idle(live)
        assert not any(left.values()), left
