"""Bad input over raw HTTP: every refusal is a 4xx (or 503 while draining) with OpenAI's error
object, and nothing a client sends leaves anything behind in the server."""

from __future__ import annotations

import json

import httpx
import pytest

from server.api.app import keys_match
from server.config import ServerConfig, read_api_keys
from tests.api.conftest import wait_idle
from tests.live_server import start_server


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if param != "any":
        assert err["param"] == param, err
    return err


def post(live, path: str, payload=None, content: bytes | None = None, headers=None, **kw):
    headers = {"content-type": "application/json", **(headers or {})}
    if content is None:
        content = json.dumps(payload).encode()
    return httpx.post(live.url + path, content=content, headers=headers, timeout=30, **kw)


BAD_BODIES = [
    # (payload, param named in the error)
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2**70}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "temperature": float("inf")}, "temperature"),  # Python's json reads Infinity
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 10_000}, "n"),
    ({"prompt": "x", "n": 1.5}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 1000}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"99999999": 1}}, None),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "stop": ""}, "stop"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, None),
    ({"prompt": "x", "best_of": 1, "n": 2}, None),
    ({"prompt": "x", "suffix": "tail"}, None),
    ({"prompt": "x", "top_k": -5}, "top_k"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "stop_token_ids": [-1]}, None),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt.0"),
    ({"prompt": [True, False]}, "prompt"),
    ({"prompt": [-3]}, "prompt"),
    ({"prompt": [10**12]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x" * 20_000}, "prompt"),  # far past the context length
    ({"prompt": "x", "max_tokens": 100_000}, "max_tokens"),
]


@pytest.mark.parametrize("payload,param", BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_completion_requests_are_400_with_the_param(live, payload, param):
    err = assert_openai_error(post(live, "/v1/completions", payload), 400,
                              param if param else "any")
    assert err["type"] == "invalid_request_error"


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 30},
     "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, None),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, None),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     None),
    ({"messages": "hello"}, "messages"),
]


@pytest.mark.parametrize("payload,param", BAD_CHATS, ids=[str(i) for i in range(len(BAD_CHATS))])
def test_bad_chat_requests_are_400_with_the_param(live, payload, param):
    assert_openai_error(post(live, "/v1/chat/completions", payload), 400, param if param else "any")


def test_malformed_bodies(live):
    for content in (b"{not json", b"", b"[1, 2]", b'"text"', b"null", b'{"prompt": "x"',
                    b"\xff\xfe{\x00", b'{"prompt": "\xc3\x28"}', b'{"prompt": "\\ud800"}',
                    b'{"messages": [{"role": "user", "content": "\\udfff"}]}', b"[" * 100_000):
        for path in ("/v1/completions", "/v1/chat/completions"):
            assert_openai_error(post(live, path, content=content), 400)
    # JSON sent without its content type: a clear message rather than a type error
    r = httpx.post(live.url + "/v1/completions", content=b'{"prompt": "x"}', timeout=10,
                   headers={"content-type": "text/plain"})
    assert "Content-Type: application/json" in assert_openai_error(r, 400)["message"]


def test_context_length_error_gives_both_numbers(live):
    limit = live.engine.limits.max_model_len
    err = assert_openai_error(post(live, "/v1/completions", {"prompt": [5] * 10, "max_tokens": limit}),
                              400, "max_tokens")
    assert str(limit) in err["message"] and "10 in the prompt" in err["message"]
    assert err["code"] == "context_length_exceeded"
    err = assert_openai_error(post(live, "/v1/completions", {"prompt": [5] * (limit + 3)}), 400, "prompt")
    assert str(limit) in err["message"] and str(limit + 3) in err["message"]


def test_unknown_model_route_and_method(live):
    err = assert_openai_error(post(live, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404,
                              "model")
    assert err["code"] == "model_not_found"
    assert_openai_error(post(live, "/v1/chat/completions",
                             {"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404)
    assert_openai_error(httpx.get(live.url + "/v1/models/gpt-9", timeout=10), 404)
    assert_openai_error(httpx.get(live.url + "/v1/embeddings", timeout=10), 404)
    assert_openai_error(httpx.get(live.url + "/v1/completions", timeout=10), 405)


def test_body_too_large_is_413_declared_or_chunked(live):
    limit = live.state.config.max_body_bytes
    big = json.dumps({"prompt": "x" * (limit + 10)}).encode()
    assert_openai_error(post(live, "/v1/completions", content=big), 413)

    def chunks():  # no content-length: the limit is enforced while reading
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
    assert_openai_error(post(live, "/v1/completions", content=chunks()), 413)


def test_nothing_left_behind_by_bad_requests(live):
    assert not any(wait_idle(live).values())
    r = post(live, "/v1/completions", {"model": "tiny", "prompt": "still fine", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ---------------------------------------------------------------------- auth, CORS, limits

def test_api_keys_from_flags_env_and_file(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# team keys\nk-file-1\n\n  k-file-2  \n")
    monkeypatch.setenv("QUANTSERVE_API_KEY", "k-env-1, k-env-2")
    assert read_api_keys(None, str(f)) == ("k-env-1", "k-env-2", "k-file-1", "k-file-2")
    assert read_api_keys(["k-cli"], None) == ("k-cli",)  # the flag wins over the environment
    monkeypatch.setenv("QUANTSERVE_API_KEY_FILE", str(f))
    assert read_api_keys(["k-cli"], None) == ("k-cli", "k-file-1", "k-file-2")
    assert "k-cli" not in repr(ServerConfig(api_keys=("k-cli",)))  # never printed
    import hashlib

    digests = tuple(hashlib.sha256(k.encode()).digest() for k in ("a", "bb"))
    assert keys_match(b"bb", digests) and not keys_match(b"b", digests) and not keys_match(b"", digests)


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint):
    srv = start_server(str(tiny_checkpoint), served_model_name="tiny", server_config=ServerConfig(
        api_keys=("k-one", "k-two"), metrics_require_key=True,
        cors_origins=("https://app.example",), max_body_bytes=2048))
    yield srv
    srv.stop()


def test_auth_guards_the_api_not_the_probes(guarded):
    u = guarded.url
    body = {"prompt": "x", "max_tokens": 1}
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "k-one"},
                    {"authorization": "Basic k-one"}, {"authorization": "Bearer k-one2"}):
        err = assert_openai_error(httpx.post(u + "/v1/completions", json=body, headers=headers,
                                             timeout=10), 401)
        assert err["code"] == "invalid_api_key" and "k-one" not in err["message"]
    # auth comes first: an unauthenticated client learns nothing about routes or bodies
    assert_openai_error(httpx.post(u + "/v1/completions", content=b"{bad", timeout=10), 401)
    assert_openai_error(httpx.get(u + "/v1/nothing", timeout=10), 401)
    for key in ("k-one", "k-two"):
        r = httpx.post(u + "/v1/completions", json=body, timeout=10,
                       headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 200
    assert httpx.get(u + "/health", timeout=10).status_code == 200
    assert httpx.get(u + "/ready", timeout=10).status_code == 200
    assert_openai_error(httpx.get(u + "/metrics", timeout=10), 401)  # configured to need the key
    assert httpx.get(u + "/metrics", headers={"authorization": "Bearer k-two"},
                     timeout=10).status_code == 200


def test_cors_preflight_and_headers(guarded):
    u = guarded.url
    pre = httpx.options(u + "/v1/chat/completions", timeout=10, headers={
        "origin": "https://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert pre.status_code == 200  # preflights carry no key and must not need one
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.post(u + "/v1/completions", json={"prompt": "x"}, timeout=10,
                   headers={"origin": "https://app.example"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(u + "/v1/completions", timeout=10, headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in other.headers


def test_configured_body_limit(guarded):
    r = httpx.post(guarded.url + "/v1/completions", json={"prompt": "y" * 4000}, timeout=10,
                   headers={"authorization": "Bearer k-one"})
    assert "2048" in assert_openai_error(r, 413)["message"]


def test_explicit_nulls_mean_defaults(live):
    nulls = {k: None for k in ("n", "stream", "stream_options", "stop", "temperature", "top_p", "seed",
                               "presence_penalty", "frequency_penalty", "logit_bias", "user",
                               "logprobs", "echo", "best_of", "top_k", "min_p",
                               "repetition_penalty", "ignore_eos", "max_tokens", "suffix")}
    r = post(live, "/v1/completions", {"model": "tiny", "prompt": "x", **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    chat = {k: None for k in ("n", "stream", "logprobs", "top_logprobs", "max_completion_tokens",
                              "response_format", "tools", "tool_choice")}
    r = post(live, "/v1/chat/completions",
             {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, **chat})
    assert r.status_code == 200, r.text


def test_not_ready_and_dead_engine_are_503(live):
    """An app whose engine loop never started (or died): /ready and generation answer 503."""
    import asyncio

    from server.api.app import create_app
    from server.config import EngineConfig
    from server.engine.async_engine import AsyncEngine
    from server.engine.engine import LLMEngine

    loaded = live.state.loaded
    engine = AsyncEngine(LLMEngine(loaded.model, EngineConfig(kv_cache_gb=0.01), [2]))
    app = create_app(loaded, engine, ServerConfig())  # lifespan not run: never started

    async def calls():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return (await c.get("/ready"), await c.get("/health"),
                    await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}))
    ready, health, gen = asyncio.run(calls())
    assert assert_openai_error(ready, 503)["code"] == "not_ready"
    assert_openai_error(health, 503)
    assert assert_openai_error(gen, 503)["code"] == "engine_dead"
