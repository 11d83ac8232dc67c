"""The real openai SDK against a live uvicorn on 127.0.0.1, around the tiny GPTQ checkpoint."""

import httpx
import openai
import pytest

from server.config import ServerConfig
from tests.live_server import start_server


def test_models_lists_the_served_model_with_quantization(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    card = models.data[0].model_extra
    assert card["quantization"]["bits"] == 4 and card["quantization"]["group_size"] == 32


def test_completion_stream_reassembles_to_greedy_text(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0)
    full = client.completions.create(**kw)
    assert full.object == "text_completion"
    assert full.usage.completion_tokens == 24 or full.choices[0].finish_reason == "stop"
    pieces, reasons = [], []
    for chunk in client.completions.create(stream=True, **kw):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == full.choices[0].text
    assert reasons[-1] == full.choices[0].finish_reason
    assert full.choices[0].text  # something was generated


def test_chat_stream_reassembles_to_greedy_text(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=20,
              temperature=0)
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_parameters_seed_stop_and_max_tokens(client):
    kw = dict(model="tiny", prompt="The weather", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b  # same seed, same text
    greedy = client.completions.create(model="tiny", prompt="The weather", max_tokens=12,
                                       temperature=0).choices[0]
    assert greedy.finish_reason in ("length", "stop")
    stop = greedy.text[3:6]
    if stop.strip():
        cut = client.completions.create(model="tiny", prompt="The weather", max_tokens=12,
                                        temperature=0, stop=[stop]).choices[0]
        assert cut.finish_reason == "stop"
        assert cut.text == greedy.text[:greedy.text.index(stop)]


def test_invalid_requests_get_openai_errors(client, live):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", temperature=5)
    assert e.value.body["param"] == "temperature" and e.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-a-model", prompt="x")
    r = httpx.post(live.url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(live.url + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and "error" in r.json()


def test_metrics_count_requests_and_tokens(client, live):
    client.completions.create(model="tiny", prompt="count me", max_tokens=5, temperature=0)
    text = httpx.get(live.url + "/metrics", timeout=10).text
    assert 'quantserve_requests_total{endpoint="/v1/completions"' in text
    gen = [l for l in text.splitlines() if l.startswith("quantserve_generation_tokens_total")]
    assert gen and float(gen[0].split()[-1]) >= 5
    assert "quantserve_prompt_tokens_total" in text


def test_api_key_is_required_when_configured(tiny_checkpoint):
    srv = start_server(str(tiny_checkpoint), served_model_name="tiny",
                       server_config=ServerConfig(api_keys=("k-one", "k-two")))
    try:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="k-two", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200  # open
    finally:
        srv.stop()
