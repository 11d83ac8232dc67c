"""Running the choices of one API request through the engine, streamed or collected.

A request with several prompts and/or n > 1 becomes one engine request per choice. `stream_choices`
merges their deltas as they come (in the order they come); `collect_choices` waits for all. Both
end a choice early when a stop string appears (the engine request is finished with reason "stop"),
and both abort every engine request of theirs if the caller goes away.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from server.api.streaming import ChoiceText, Delta
from server.engine.async_engine import AsyncEngine
from server.engine.sequence import FinishReason, SamplingParams, TokenLogprob


@dataclass
class ChoiceSpec:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class ChoiceEvent:
    """One piece of one choice's stream."""

    index: int
    delta: Delta
    num_prompt_tokens: int
    num_cached_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None


async def _run_choice(engine: AsyncEngine, tokenizer, spec: ChoiceSpec, request_id: str,
                      sink: asyncio.Queue) -> None:
    state = ChoiceText(tokenizer, spec.stops)
    agen = engine.generate(spec.prompt_ids, spec.params, request_id)
    try:
        async for out in agen:
            delta = state.feed(out)
            await sink.put(ChoiceEvent(spec.index, delta, out.num_prompt_tokens,
                                       out.num_cached_tokens, out.prompt_logprobs))
            if delta.stopped_by_string:
                engine.abort(request_id, FinishReason.STOP)
                return
            if delta.finish_reason is not None:
                return
    finally:
        await agen.aclose()


async def stream_choices(engine: AsyncEngine, tokenizer, specs: list[ChoiceSpec],
                         request_id: str) -> AsyncIterator[ChoiceEvent]:
    """Yield events of all choices as they arrive; raises the first error of any choice."""
    sink: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_run_choice(engine, tokenizer, spec, f"{request_id}-{spec.index}", sink))
             for spec in specs]
    done_marker = object()
    remaining = len(tasks)

    def _on_done(task: asyncio.Task) -> None:
        sink.put_nowait(done_marker if task.cancelled() or task.exception() is None else task.exception())

    for t in tasks:
        t.add_done_callback(_on_done)
    try:
        while remaining:
            item = await sink.get()
            if item is done_marker:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_choices(engine: AsyncEngine, tokenizer, specs: list[ChoiceSpec],
                          request_id: str) -> list[ChoiceResult]:
    results = {s.index: ChoiceResult(s.index) for s in specs}
    async for ev in stream_choices(engine, tokenizer, specs, request_id):
        r = results[ev.index]
        r.text += ev.delta.text
        r.token_ids += ev.delta.token_ids
        r.logprobs += ev.delta.logprobs
        r.num_prompt_tokens = ev.num_prompt_tokens
        r.num_cached_tokens = ev.num_cached_tokens
        if ev.prompt_logprobs is not None:
            r.prompt_logprobs = ev.prompt_logprobs
        if ev.delta.finish_reason is not None:
            r.finish_reason = ev.delta.finish_reason
    return [results[i] for i in sorted(results)]


async def until_disconnected(request, poll_seconds: float = 0.25) -> None:
    """Return when the HTTP client has gone away (for non-streaming requests)."""
    while not await request.is_disconnected():
        await asyncio.sleep(poll_seconds)


# ---------------------------------------------------------------------- logprob formats

def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, records: list[TokenLogprob | None], text_start: int = 0) -> dict:
    """OpenAI completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_start
    for rec in records:
        if rec is None:
            continue
        t = _token_text(tokenizer, rec.token_id)
        tokens.append(t)
        token_lps.append(rec.logprob)
        tops.append({_token_text(tokenizer, i): lp for i, lp in rec.top} if rec.top else None)
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def prompt_completion_logprobs(tokenizer, prompt_ids: list[int],
                               records: list[TokenLogprob | None] | None) -> dict:
    """Echoed prompt tokens: the first has no logprob (null), as OpenAI returns them."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    records = records or [None] * len(prompt_ids)
    for i, token_id in enumerate(prompt_ids):
        t = _token_text(tokenizer, token_id)
        rec = records[i] if i < len(records) else None
        tokens.append(t)
        token_lps.append(None if rec is None else rec.logprob)
        tops.append(None if rec is None or not rec.top else
                    {_token_text(tokenizer, j): lp for j, lp in rec.top})
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, records: list[TokenLogprob | None]) -> dict:
    """OpenAI chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    content = []
    for rec in records:
        if rec is None:
            continue
        t = _token_text(tokenizer, rec.token_id)
        content.append({
            "token": t, "logprob": rec.logprob, "bytes": list(t.encode("utf-8")),
            "top_logprobs": [{"token": (tt := _token_text(tokenizer, i)), "logprob": lp,
                              "bytes": list(tt.encode("utf-8"))} for i, lp in rec.top],
        })
    return {"content": content}
