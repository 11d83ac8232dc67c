"""Every request parameter through the real openai SDK (extras through extra_body), checked for its
observable effect: against a reference engine run on the same weights, against greedy decoding
where the parameter must reduce to it, or by a property that ignoring the parameter would break.
The tiny model is random, so texts are compared with other runs, never with fixed strings."""

from __future__ import annotations

import math

import pytest

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sequence import SamplingParams
from server.serve import eos_token_ids
from tests.api.conftest import wait_idle

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def reference(live):
    """Sequential generation on a private engine over the served model's weights."""
    loaded = live.state.loaded
    engine = LLMEngine(loaded.model, EngineConfig(kv_cache_gb=0.02), eos_token_ids(loaded))

    def run(prompt: str, **params):
        ids = loaded.tokenizer.encode(prompt)
        seq = engine.add_request(f"ref-{id(params)}-{len(engine.requests)}", ids, SamplingParams(**params))
        while engine.has_unfinished():
            engine.step()
        return loaded.tokenizer.decode(seq.output_ids, skip_special_tokens=True), seq
    return run


def greedy(client, prompt=PROMPT, max_tokens=12, **kw):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, **kw).choices[0]


def test_n_choices_are_seeded_indexed_and_counted(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.5, n=3, seed=5,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1  # each choice draws its own sample
    assert r.usage.completion_tokens == 24
    assert [c.text for c in client.completions.create(**kw).choices] == texts  # seeded


def test_best_of_returns_the_most_likely_candidate(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.5, seed=9,
              extra_body={"ignore_eos": True})
    best = client.completions.create(best_of=3, n=1, **kw)
    assert len(best.choices) == 1 and best.usage.completion_tokens == 18  # all 3 were generated
    # the same seed gives the same three candidates with n=3; best_of keeps the highest-scoring
    cands = client.completions.create(n=3, logprobs=0, **kw).choices
    scores = [sum(c.logprobs.token_logprobs) for c in cands]
    assert best.choices[0].text == cands[scores.index(max(scores))].text
    assert best.choices[0].logprobs is None  # scored internally, not shown unless asked


def test_completion_logprobs_have_openais_shape_and_the_engines_values(client, reference):
    c = greedy(client, max_tokens=6, logprobs=3)
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    _, seq = reference(PROMPT, max_tokens=6, temperature=0, logprobs=3)
    for i, rec in enumerate(seq.output_logprobs):
        top = lp.top_logprobs[i]
        assert len(top) in (3, 4) and lp.tokens[i] in top  # k most likely + the sampled one
        assert top[lp.tokens[i]] == pytest.approx(lp.token_logprobs[i])
        assert lp.token_logprobs[i] == pytest.approx(rec.logprob, abs=1e-4)
        assert lp.token_logprobs[i] == pytest.approx(max(top.values()), abs=1e-6)  # greedy
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx([v for _, v in rec.top], abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    if not any(t.startswith("bytes:") for t in lp.tokens):
        assert "".join(lp.tokens) == c.text or c.finish_reason == "stop"
    zero = greedy(client, max_tokens=4, logprobs=0).logprobs
    assert all(len(top) == 1 for top in zero.top_logprobs)  # just the sampled token
    assert greedy(client, max_tokens=4).logprobs is None


def test_echo_returns_the_prompt_with_its_logprobs(client):
    prompt = "Hello there, general"
    c = greedy(client, prompt=prompt, max_tokens=3, logprobs=2, echo=True)
    assert c.text.startswith(prompt)
    lp = c.logprobs
    n_prompt = len(lp.tokens) - 3
    assert n_prompt >= 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:n_prompt]) == prompt
    assert lp.text_offset[n_prompt] == len(prompt)
    plain = greedy(client, prompt=prompt, max_tokens=3, logprobs=2)
    assert c.text == prompt + plain.text
    assert lp.token_logprobs[n_prompt:] == pytest.approx(plain.logprobs.token_logprobs)
    # max_tokens 0 + echo scores a prompt without generating (lm-eval's loglikelihood requests)
    scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True,
                                       logprobs=1)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert scored.choices[0].finish_reason == "length"
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:n_prompt])
    streamed = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True,
                                              logprobs=2, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == c.text
    tokens = [t for ch in streamed if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    offsets = [t for ch in streamed if ch.choices[0].logprobs for t in ch.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_chat_logprobs_have_openais_shape(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Name a colour"}], max_tokens=5,
              temperature=0)
    r = client.chat.completions.create(logprobs=True, top_logprobs=3, **kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy
        assert item.logprob <= 0 and math.isfinite(item.logprob)
        if not item.token.startswith("bytes:"):
            assert bytes(item.bytes).decode("utf-8") == item.token
    assert r.choices[0].logprobs.refusal is None
    bare = client.chat.completions.create(logprobs=True, **kw).choices[0].logprobs.content
    assert all(item.top_logprobs == [] for item in bare)
    assert client.chat.completions.create(**kw).choices[0].logprobs is None
    stream = list(client.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **kw))
    streamed = [i for ch in stream if ch.choices and ch.choices[0].logprobs
                for i in ch.choices[0].logprobs.content]
    assert [(i.token, round(i.logprob, 5)) for i in streamed] == \
        [(i.token, round(i.logprob, 5)) for i in content]


def test_stop_string_and_list_cut_the_text_streamed_or_not(client):
    full = greedy(client, max_tokens=16)
    assert len(full.text) > 6
    stop = full.text[4:7]
    if not stop.strip():
        pytest.skip("greedy text has no usable stop string")
    want = full.text[:full.text.index(stop)]
    for stops in (stop, ["\u2603 never", stop]):
        cut = greedy(client, max_tokens=16, stop=stops)
        assert cut.finish_reason == "stop" and cut.text == want
        pieces = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                                temperature=0, stop=stops, stream=True))
        assert "".join(p.choices[0].text for p in pieces) == want
        assert pieces[-1].choices[0].finish_reason == "stop"


def test_logit_bias_forces_and_forbids_tokens(client, live):
    tok = live.state.loaded.tokenizer
    forced = tok.encode(" banana")[0]
    c = greedy(client, max_tokens=4, logit_bias={str(forced): 100}, logprobs=0)
    assert c.logprobs.tokens == [tok.decode([forced])] * 4
    first = greedy(client, max_tokens=1, logprobs=0).logprobs.tokens[0]
    first_id = tok.encode(first)[0] if first else None
    banned = greedy(client, max_tokens=1, logprobs=0, logit_bias={str(first_id): -100})
    assert banned.logprobs.tokens[0] != first


def test_penalties_match_the_reference_engine(client, reference):
    plain, _ = reference(PROMPT, max_tokens=16, temperature=0)
    cases = [dict(presence_penalty=1.5), dict(frequency_penalty=1.2),
             dict(repetition_penalty=1.5)]
    changed = 0
    for params in cases:
        want, _ = reference(PROMPT, max_tokens=16, temperature=0, **params)
        changed += want != plain
        extra = {"repetition_penalty": params.pop("repetition_penalty")} \
            if "repetition_penalty" in params else None
        got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                        extra_body=extra, **params).choices[0].text
        assert got == want
    assert changed >= 2  # the penalties do change this model's greedy text


def test_truncation_extras_reduce_to_greedy_when_degenerate(client):
    want = greedy(client, max_tokens=10).text
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=1.5, seed=3)
    sampled = client.completions.create(**kw).choices[0].text
    assert sampled != want  # so the checks below can tell a parameter that was ignored
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        assert client.completions.create(extra_body=extra, **kw).choices[0].text == want
    assert client.completions.create(top_p=1e-9, **kw).choices[0].text == want


def test_ignore_eos_and_stop_token_ids(client, live):
    eos = sorted(live.engine.eos_ids)[0]
    bias = {str(eos): 100}
    stopped = greedy(client, max_tokens=8, logit_bias=bias)
    assert stopped.finish_reason == "stop" and stopped.text == ""
    goes_on = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                        logit_bias=bias, extra_body={"ignore_eos": True})
    assert goes_on.choices[0].finish_reason == "length" and goes_on.usage.completion_tokens == 8
    stop_id = live.state.loaded.tokenizer.encode(" banana")[0]
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                  logit_bias={str(stop_id): 100},
                                  extra_body={"stop_token_ids": [stop_id]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1


def test_max_tokens_and_max_completion_tokens(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Count"}], temperature=0,
              extra_body={"ignore_eos": True})
    assert client.chat.completions.create(max_completion_tokens=5, **kw).usage.completion_tokens == 5
    r = client.chat.completions.create(max_tokens=7, **kw)
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    both = client.chat.completions.create(max_tokens=7, max_completion_tokens=3, **kw)
    assert both.usage.completion_tokens == 3  # the newer parameter wins
    assert greedy(client, max_tokens=5, extra_body={"ignore_eos": True}).finish_reason == "length"


def test_user_seed_and_usage_everywhere(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
              temperature=1.2, seed=42, user="user-1234")
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a.choices[0].finish_reason in ("stop", "length")


def test_chat_n_streams_each_choice_with_its_role(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Go"}], max_tokens=6, n=2,
              temperature=1.3, seed=8)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == full.choices[i].message.content
        assert mine[-1].finish_reason == full.choices[i].finish_reason


def test_continuous_usage_stats_extra(client):
    chunks = list(client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True} |
        {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}))
    counts = [c.usage.completion_tokens for c in chunks if c.usage is not None]
    assert counts == sorted(counts) and counts[-1] == 4 and len(counts) >= 4


def test_the_server_is_idle_after_all_of_it(live):
    assert not any(wait_idle(live).values())
