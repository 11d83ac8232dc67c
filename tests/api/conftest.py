"""A live server around the tiny GPTQ checkpoint, shared by the API tests, and helpers to check
that it is idle again (no request, queue entry or KV block left behind)."""

from __future__ import annotations

import time

import openai
import pytest

from tests.live_server import LiveServer, start_server


@pytest.fixture(scope="session")
def live(tiny_checkpoint):
    srv = start_server(str(tiny_checkpoint), served_model_name="tiny")
    yield srv
    srv.stop()


@pytest.fixture()
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def leftovers(srv: LiveServer) -> dict:
    """Everything that should be zero on an idle server."""
    eng = srv.engine
    depth = srv.state.engine.queue_depth()
    return {"kv_blocks_used": eng.allocator.num_used, "engine_requests": len(eng.requests),
            "waiting": len(eng.scheduler.waiting), "running": len(eng.scheduler.running),
            "consumer_queues": srv.state.engine.num_in_flight,
            "http_in_flight": srv.state.requests_in_flight,
            "queued_requests": depth[0], "queued_tokens": depth[1]}


def wait_idle(srv: LiveServer, timeout: float = 10.0) -> dict:
    """Wait until the server holds nothing; returns the leftovers (all zero unless it timed out)."""
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(srv)
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.01)
