"""/v1/completions and /v1/chat/completions: tokenise, admit, run, shape OpenAI's responses.

Every request goes: model check -> tokenise -> context-length check -> admission (503 draining,
429 queue full) -> all choices submitted to the engine at once -> streamed (SSE) or collected.
The handles of the submitted choices are closed whatever happens after (client gone, error,
shutdown), which aborts what is still running; see generation.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from server.api.admission import Admission
from server.api.errors import ERROR_RESPONSES, APIError, error_body
from server.api.generation import (ChoiceResult, ChoiceSpec, Submitted, close_all, collect_choices,
                                   stream_choices, submit_choices, until_disconnected)
from server.api.logprobs import CompletionLogprobs, TokenTexts, chat_logprobs, join
from server.api.metrics import Metrics
from server.api.protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields
from server.engine.async_engine import AsyncEngine, EngineDeadError

SSE_PING_SECONDS = 15
SSE_SEND_TIMEOUT_SECONDS = 30  # a client that stops reading for this long is dropped (and aborted)


@dataclass
class ServingContext:
    engine: AsyncEngine
    tokenizer: object
    model_name: str
    max_model_len: int
    vocab_size: int
    metrics: Metrics
    admission: Admission
    texts: TokenTexts


@dataclass
class Prepared:
    """A request turned into engine work: what to submit and how to shape the answer."""

    kind: str  # "completions" | "chat"
    body: CompletionRequest | ChatCompletionRequest
    prompts: list[list[int]]
    specs: list[ChoiceSpec]
    candidates: int  # choices generated per prompt (best_of, else n)
    hidden: bool  # max_tokens 0: one token is generated to run the prompt, and not shown

    @property
    def endpoint(self) -> str:
        return "/v1/completions" if self.kind == "completions" else "/v1/chat/completions"


_STREAM_DOC = {200: {"description": "The completion (JSON), or with stream=true an SSE stream of "
                                    "chunks ending with `data: [DONE]`",
                     "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def build_router(ctx: ServingContext) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions", responses={**_STREAM_DOC, **ERROR_RESPONSES})
    async def completions(body: CompletionRequest, request: Request):
        return await _serve(ctx, "completions", body, request)

    @router.post("/v1/chat/completions", responses={**_STREAM_DOC, **ERROR_RESPONSES})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _serve(ctx, "chat", body, request)

    return router


# ---------------------------------------------------------------------- preparing

def _check_model(ctx: ServingContext, body: _SamplingFields) -> None:
    if body.model and body.model != ctx.model_name:
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves "
                            f"'{ctx.model_name}'", param="model", code="model_not_found")


def _encode(ctx: ServingContext, text: str, param: str, **kw) -> list[int]:
    try:
        return ctx.tokenizer.encode(text, **kw)
    except Exception as exc:
        raise APIError(400, f"the {param} could not be tokenized: {exc}", param=param)


def _tokenize_completion(ctx: ServingContext, body: CompletionRequest) -> list[list[int]]:
    out = []
    for p in body.prompts():
        if isinstance(p, str):
            out.append(_encode(ctx, p, "prompt"))
        else:
            bad = [t for t in p if not 0 <= t < ctx.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary "
                                    f"(0..{ctx.vocab_size - 1})", param="prompt")
            out.append(list(p))
    if any(len(p) == 0 for p in out):
        raise APIError(400, "the prompt is empty", param="prompt")
    return out


def _tokenize_chat(ctx: ServingContext, body: ChatCompletionRequest) -> list[int]:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    try:
        text = ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # no template, or it rejects the conversation (e.g. role order)
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages")
    return _encode(ctx, text, "messages", add_special_tokens=False)


def _max_tokens(ctx: ServingContext, prompts: list[list[int]], requested: int | None,
                default: int | None, prompt_param: str) -> int:
    longest = max(len(p) for p in prompts)
    room = ctx.max_model_len - longest
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {ctx.max_model_len} tokens. "
                            f"However, your prompt has {longest} tokens, leaving no room to generate.",
                       param=prompt_param, code="context_length_exceeded")
    max_tokens = requested if requested is not None else (default if default is not None else room)
    if longest + max_tokens > ctx.max_model_len:
        raise APIError(400, f"This model's maximum context length is {ctx.max_model_len} tokens. "
                            f"However, you requested {longest + max_tokens} tokens ({longest} in the "
                            f"prompt, {max_tokens} for the completion). Please reduce the prompt or "
                            f"max_tokens.", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _prepare(ctx: ServingContext, kind: str, body) -> Prepared:
    _check_model(ctx, body)
    if kind == "completions":
        prompts = _tokenize_completion(ctx, body)
        max_tokens = _max_tokens(ctx, prompts, body.max_tokens, 16, "prompt")
        candidates = body.num_candidates
        # best_of ranks candidates by their summed logprobs, so it needs them even if not shown
        logprobs = body.logprobs if body.logprobs is not None else (0 if candidates > body.n else None)
        prompt_lp = body.logprobs if (body.echo and body.logprobs is not None) else None
    else:
        prompts = [_tokenize_chat(ctx, body)]
        max_tokens = _max_tokens(ctx, prompts, body.requested_max_tokens(), None, "messages")
        candidates = body.n
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt_lp = None
    hidden = max_tokens == 0
    specs = []
    for pi, prompt in enumerate(prompts):
        for j in range(candidates):
            try:
                params = body.sampling_params(max(1, max_tokens), logprobs, ctx.vocab_size,
                                              prompt_logprobs=prompt_lp, seed_offset=j)
            except ValueError as exc:
                raise APIError(400, str(exc))
            specs.append(ChoiceSpec(pi * candidates + j, prompt, params, body.stop))
    return Prepared(kind, body, prompts, specs, candidates, hidden)


# ---------------------------------------------------------------------- serving

async def _serve(ctx: ServingContext, kind: str, body, request: Request):
    endpoint = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
    rid = f"{'cmpl' if kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
    try:
        prep = _prepare(ctx, kind, body)
        ctx.admission.check(len(prep.specs), sum(len(s.prompt_ids) for s in prep.specs))
        try:  # no await between the admission check and this: the check is exact
            choices = submit_choices(ctx.engine, prep.specs, rid)
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_dead")
    except APIError as exc:
        ctx.metrics.observe_request(endpoint, exc.status, None)
        raise
    created = int(time.time())
    if body.stream:
        return ChoicesStreamResponse(
            choices, _stream(ctx, prep, choices, rid, created),
            sep="\n", ping=SSE_PING_SECONDS, send_timeout=SSE_SEND_TIMEOUT_SECONDS)
    return await _collect(ctx, prep, choices, rid, created, request)


class ChoicesStreamResponse(EventSourceResponse):
    """An SSE response that closes its engine requests however it ends, even if its generator
    never started (a client gone before the first byte)."""

    def __init__(self, choices: list[Submitted], *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.choices = choices

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close_all(self.choices)


def _usage(prompts: list[list[int]], completion_tokens: int, cached: int) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}  # served from the prefix cache


def _best(prep: Prepared, results: list[ChoiceResult]) -> list[ChoiceResult]:
    """Per prompt, the n candidates with the highest summed logprob (best_of), re-indexed."""
    n, k = prep.body.n, prep.candidates
    if k == n:
        return results
    chosen = []
    for pi in range(len(prep.prompts)):
        group = results[pi * k:(pi + 1) * k]
        group.sort(key=lambda r: -sum(lp.logprob for lp in r.logprobs if lp is not None))
        for j, r in enumerate(group[:n]):
            r.index = pi * n + j
            chosen.append(r)
    return chosen


async def _collect(ctx: ServingContext, prep: Prepared, choices: list[Submitted], rid: str,
                   created: int, request: Request):
    endpoint = prep.endpoint
    work = asyncio.create_task(collect_choices(ctx.engine, ctx.tokenizer, choices))
    watch = asyncio.create_task(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        close_all(choices)  # aborts whatever still runs (client gone, or this task cancelled)
        for t in (work, watch):
            if not t.done():
                t.cancel()
    if work not in done:  # the client went away
        await asyncio.gather(work, return_exceptions=True)
        ctx.metrics.aborted.inc()
        ctx.metrics.observe_request(endpoint, 499, "abort")
        return JSONResponse(error_body(400, "client disconnected"), status_code=499)
    await asyncio.gather(watch, return_exceptions=True)
    try:
        results = work.result()
    except ValueError as exc:  # the engine refused the request
        ctx.metrics.observe_request(endpoint, 400, None)
        raise APIError(400, str(exc))
    except EngineDeadError as exc:
        ctx.metrics.observe_request(endpoint, 503, None)
        raise APIError(503, str(exc), code="engine_dead")
    except Exception as exc:
        ctx.metrics.observe_request(endpoint, 503, None)
        raise APIError(503, f"generation failed: {exc}")
    body = prep.body
    completion_tokens = 0 if prep.hidden else sum(len(r.token_ids) for r in results)
    cached = sum(r.num_cached_tokens for r in results[::prep.candidates])
    out = []
    for r in _best(prep, results):
        reason = "length" if prep.hidden else r.finish_reason
        ctx.metrics.observe_request(endpoint, 200, reason)
        text = "" if prep.hidden else r.text
        if prep.kind == "completions":
            prompt_ids = prep.prompts[r.index // body.n]
            lp = None
            prompt_text = ctx.tokenizer.decode(prompt_ids) if body.echo else ""
            if body.logprobs is not None:
                lp = CompletionLogprobs(ctx.texts, len(prompt_text)).generated(
                    [] if prep.hidden else r.logprobs)
                if body.echo:
                    lp = join(CompletionLogprobs(ctx.texts).prompt(prompt_ids, r.prompt_logprobs), lp)
            out.append({"index": r.index, "text": prompt_text + text, "logprobs": lp,
                        "finish_reason": reason})
        else:
            out.append({"index": r.index, "message": {"role": "assistant", "content": text},
                        "logprobs": chat_logprobs(ctx.texts, r.logprobs) if body.logprobs else None,
                        "finish_reason": reason})
    obj = "text_completion" if prep.kind == "completions" else "chat.completion"
    return JSONResponse({"id": rid, "object": obj, "created": created, "model": ctx.model_name,
                         "choices": out, "usage": _usage(prep.prompts, completion_tokens, cached),
                         "system_fingerprint": None})


async def _stream(ctx: ServingContext, prep: Prepared, choices: list[Submitted], rid: str,
                  created: int):
    body, kind, endpoint = prep.body, prep.kind, prep.endpoint
    obj = "text_completion" if kind == "completions" else "chat.completion.chunk"
    opts = body.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(opts and opts.continuous_usage_stats)
    base = {"id": rid, "object": obj, "created": created, "model": ctx.model_name}
    completion_tokens = 0
    cached = 0
    formatters: dict[int, CompletionLogprobs] = {}
    started: set[int] = set()

    def chunk(choice: dict) -> dict:
        extra = {}
        if continuous:
            extra["usage"] = _usage(prep.prompts, completion_tokens, cached)
        elif include_usage:
            extra["usage"] = None
        return {"data": _dumps({**base, "choices": [choice], **extra})}

    try:
        if kind == "chat":
            for c in choices:
                yield chunk({"index": c.spec.index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None})
        async for ev in stream_choices(ctx.engine, ctx.tokenizer, choices):
            d, idx = ev.delta, ev.index
            if idx % prep.candidates == 0:
                cached = max(cached, ev.num_cached_tokens)
            if kind == "completions" and idx not in started:
                started.add(idx)
                prompt_text = ctx.tokenizer.decode(prep.specs[idx].prompt_ids) if body.echo else ""
                formatters[idx] = CompletionLogprobs(ctx.texts, len(prompt_text))
                if body.echo:  # the prompt first (its logprobs arrive with the first output)
                    lp = None
                    if body.logprobs is not None:
                        lp = CompletionLogprobs(ctx.texts).prompt(prep.specs[idx].prompt_ids,
                                                                   ev.prompt_logprobs)
                    yield chunk({"index": idx, "text": prompt_text, "logprobs": lp,
                                 "finish_reason": None})
            if prep.hidden:
                if d.finish_reason is not None:
                    ctx.metrics.observe_request(endpoint, 200, "length")
                    yield chunk({"index": idx, "text": "", "logprobs": None, "finish_reason": "length"})
                continue
            completion_tokens += len(d.token_ids)
            wants_lp = bool(body.logprobs) if kind == "chat" else body.logprobs is not None
            if not d.text and d.finish_reason is None and not (wants_lp and d.logprobs):
                continue
            if kind == "completions":
                lp = formatters[idx].generated(d.logprobs) if body.logprobs is not None else None
                yield chunk({"index": idx, "text": d.text, "logprobs": lp,
                             "finish_reason": d.finish_reason})
            else:
                delta = {"content": d.text} if d.text else {}
                yield chunk({"index": idx, "delta": delta,
                             "logprobs": chat_logprobs(ctx.texts, d.logprobs) if body.logprobs else None,
                             "finish_reason": d.finish_reason})
            if d.finish_reason is not None:
                ctx.metrics.observe_request(endpoint, 200, d.finish_reason)
        if include_usage:
            yield {"data": _dumps({**base, "choices": [],
                                   "usage": _usage(prep.prompts, completion_tokens, cached)})}
        yield {"data": "[DONE]"}
    except asyncio.CancelledError:
        ctx.metrics.aborted.inc()
        ctx.metrics.observe_request(endpoint, 499, "abort")
        raise
    except Exception as exc:  # mid-stream failure: an error event, then the end of the stream
        status = 400 if isinstance(exc, ValueError) else 503
        ctx.metrics.observe_request(endpoint, status, None)
        yield {"data": _dumps(error_body(status, str(exc)))}
        yield {"data": "[DONE]"}


def _dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
