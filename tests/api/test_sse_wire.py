"""The SSE wire format as a raw client sees it: OpenAI's `data: {json}` events separated by blank
lines, one id per stream, and `data: [DONE]` last."""

from __future__ import annotations

import json

import httpx
import pytest


def raw_events(live, path: str, payload: dict) -> tuple[httpx.Response, list[str]]:
    with httpx.stream("POST", live.url + path, json=payload, timeout=30) as r:
        body = b"".join(r.iter_bytes()).decode("utf-8")
    assert body.endswith("\n\n"), body[-50:]
    events = [e for e in body.split("\n\n") if e]
    return r, events


@pytest.mark.parametrize("path,payload,obj", [
    ("/v1/completions", {"prompt": "Once upon", "max_tokens": 8, "temperature": 0,
                         "stream_options": {"include_usage": True}}, "text_completion"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                              "temperature": 0, "stream_options": {"include_usage": True}},
     "chat.completion.chunk"),
])
def test_sse_events_are_openai_data_lines_ending_with_done(live, path, payload, obj):
    r, events = raw_events(live, path, {**payload, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].split(";")[0] == "text/event-stream"
    assert r.headers["cache-control"] == "no-store"
    assert events[-1] == "data: [DONE]"
    data = []
    for e in events[:-1]:
        if e.startswith(":"):  # keep-alive comment, allowed by the SSE spec and ignored by clients
            continue
        assert e.startswith("data: ") and "\n" not in e, e
        data.append(json.loads(e[len("data: "):]))
    assert len({d["id"] for d in data}) == 1
    assert all(d["object"] == obj and d["model"] == "tiny" and isinstance(d["created"], int)
               for d in data)
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] > 0
    assert all("usage" in d and d["usage"] is None for d in data[:-1])
    finish = [c["finish_reason"] for d in data for c in d["choices"] if c["finish_reason"]]
    assert finish and finish[-1] in ("stop", "length")
    # the non-streamed answer has the same text
    plain = {k: v for k, v in payload.items() if k != "stream_options"}  # only allowed streaming
    full = httpx.post(live.url + path, json=plain, timeout=30).json()
    if obj == "text_completion":
        text = "".join(c["text"] for d in data for c in d["choices"])
        assert text == full["choices"][0]["text"]
    else:
        text = "".join(c["delta"].get("content", "") for d in data for c in d["choices"])
        assert text == full["choices"][0]["message"]["content"]
        assert data[0]["choices"][0]["delta"]["role"] == "assistant"
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [data[-1]["usage"][k] for k in counts] == [full["usage"][k] for k in counts]


def test_without_include_usage_chunks_have_no_usage_key(live):
    _, events = raw_events(live, "/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True})
    data = [json.loads(e[6:]) for e in events[:-1] if e.startswith("data: ")]
    assert all("usage" not in d for d in data) and events[-1] == "data: [DONE]"


def test_refusals_of_stream_requests_are_plain_json_errors(live):
    r = httpx.post(live.url + "/v1/completions", timeout=10,
                   json={"prompt": "x", "stream": True, "max_tokens": 10**6})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "context_length_exceeded"
