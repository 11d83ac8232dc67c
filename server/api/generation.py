"""Running the choices of one API request through the engine, streamed or collected.

A request with several prompts and/or n > 1 becomes one engine request per choice, all submitted
at once right after admission (`submit_choices`), so the queue check and the queueing are one
atomic step on the event loop. `stream_choices` merges their deltas as they come (in the order
they come); `collect_choices` waits for all. Both end a choice early when a stop string appears
(the engine request is finished with reason "stop"). The caller owns the handles and closes them
all when it is done, however it ends (`close_all`): a choice still running is then aborted and
its KV blocks are freed before the engine's next step.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from server.api.streaming import ChoiceText, Delta
from server.engine.async_engine import AsyncEngine, RequestHandle
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


@dataclass
class Submitted:
    spec: ChoiceSpec
    handle: RequestHandle


def submit_choices(engine: AsyncEngine, specs: list[ChoiceSpec], request_id: str) -> list[Submitted]:
    """Queue every choice now; on failure, nothing stays queued."""
    out: list[Submitted] = []
    try:
        for spec in specs:
            out.append(Submitted(spec, engine.submit(spec.prompt_ids, spec.params,
                                                     f"{request_id}-{spec.index}")))
    except BaseException:
        close_all(out)
        raise
    return out


def close_all(choices: list[Submitted]) -> None:
    for c in choices:
        c.handle.close()


async def _run_choice(engine: AsyncEngine, tokenizer, choice: Submitted, sink: asyncio.Queue) -> None:
    spec, handle = choice.spec, choice.handle
    state = ChoiceText(tokenizer, spec.stops)
    try:
        async for out in handle:
            delta = state.feed(out)
            await sink.put(ChoiceEvent(spec.index, delta, out.num_prompt_tokens,
                                       out.num_cached_tokens, out.prompt_logprobs))
            if delta.stopped_by_string:
                engine.abort(handle.request_id, FinishReason.STOP)
                return
            if delta.finish_reason is not None:
                return
    finally:
        handle.close()


async def stream_choices(engine: AsyncEngine, tokenizer,
                         choices: list[Submitted]) -> AsyncIterator[ChoiceEvent]:
    """Yield events of all choices as they arrive; raises the first error of any choice."""
    sink: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_run_choice(engine, tokenizer, c, sink)) for c in choices]
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
        close_all(choices)  # synchronous: aborts reach the engine even if we are cancelled again
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_choices(engine: AsyncEngine, tokenizer,
                          choices: list[Submitted]) -> list[ChoiceResult]:
    results = {c.spec.index: ChoiceResult(c.spec.index) for c in choices}
    async for ev in stream_choices(engine, tokenizer, choices):
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


async def until_disconnected(request) -> None:
    """Return when the HTTP client has gone away (non-streaming requests).

    The body has been read by then, so the next ASGI receive() blocks until the server reports
    `http.disconnect` (or the response is complete): no polling, no delay."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
