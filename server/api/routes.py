"""/v1/completions and /v1/chat/completions: tokenise, admit, run, shape OpenAI's responses."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from server.api.errors import APIError, error_body
from server.api.generation import (ChoiceSpec, chat_logprobs, collect_choices, completion_logprobs,
                                   prompt_completion_logprobs, stream_choices, until_disconnected)
from server.api.metrics import Metrics
from server.api.protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields
from server.engine.async_engine import AsyncEngine


@dataclass
class ServingContext:
    engine: AsyncEngine
    tokenizer: object
    model_name: str
    max_model_len: int
    vocab_size: int
    metrics: Metrics
    max_queued_requests: int
    max_queued_tokens: int
    shutdown_timeout: float
    is_draining: Callable[[], bool]


def _json(obj: dict, status: int = 200) -> JSONResponse:
    return JSONResponse(obj, status_code=status)


def build_router(ctx: ServingContext) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _serve(ctx, "completions", body, request)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _serve(ctx, "chat", body, request)

    return router


# ---------------------------------------------------------------------- admission

def _check_model(ctx: ServingContext, body: _SamplingFields) -> None:
    if body.model and body.model != ctx.model_name:
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves "
                            f"'{ctx.model_name}'", param="model", code="model_not_found")


def _tokenize_completion(ctx: ServingContext, body: CompletionRequest) -> list[list[int]]:
    out = []
    for p in body.prompts():
        if isinstance(p, str):
            out.append(ctx.tokenizer.encode(p))
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
    except Exception as exc:  # the template rejects the conversation (e.g. role order)
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages")
    return ctx.tokenizer.encode(text, add_special_tokens=False)


def _admit(ctx: ServingContext, prompts: list[list[int]], n: int) -> None:
    if ctx.is_draining():
        # Connection: close, so a keep-alive client (or an L4 load balancer's pinned connection)
        # retries on a fresh connection, which lands on another replica
        raise APIError(503, "the server is shutting down", code="server_draining",
                       headers={"Connection": "close"})
    engine = ctx.engine
    in_queue = engine.last_stats.num_waiting + engine.num_in_flight - engine.last_stats.num_running
    new_requests = len(prompts) * n
    if max(0, in_queue) + new_requests > ctx.max_queued_requests:
        ctx.metrics.rejected.labels(reason="queue_full").inc()
        raise APIError(429, f"the server is overloaded: {max(0, in_queue)} requests queued "
                            f"(limit {ctx.max_queued_requests}); retry later",
                       code="queue_full", headers={"Retry-After": "1"})
    new_tokens = sum(len(p) for p in prompts) * n
    if engine.queued_prompt_tokens + new_tokens > ctx.max_queued_tokens:
        ctx.metrics.rejected.labels(reason="token_limit").inc()
        raise APIError(429, f"the server is overloaded: {engine.queued_prompt_tokens} prompt tokens "
                            f"queued (limit {ctx.max_queued_tokens}); retry later",
                       code="queue_full", headers={"Retry-After": "1"})


def _max_tokens(ctx: ServingContext, prompts: list[list[int]], requested: int | None,
                default: int | None) -> int:
    longest = max(len(p) for p in prompts)
    room = ctx.max_model_len - longest
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {ctx.max_model_len} tokens. "
                            f"However, your prompt has {longest} tokens, leaving no room to generate.",
                       param="messages" if default is None else "prompt",
                       code="context_length_exceeded")
    max_tokens = requested if requested is not None else (default if default is not None else room)
    if longest + max_tokens > ctx.max_model_len:
        raise APIError(400, f"This model's maximum context length is {ctx.max_model_len} tokens. "
                            f"However, you requested {longest + max_tokens} tokens ({longest} in the "
                            f"prompt, {max_tokens} for the completion). Please reduce the prompt or "
                            f"max_tokens.", param="max_tokens", code="context_length_exceeded")
    return max_tokens


# ---------------------------------------------------------------------- serving

async def _serve(ctx: ServingContext, kind: str, body, request: Request):
    endpoint = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
    try:
        _check_model(ctx, body)
        if kind == "completions":
            prompts = _tokenize_completion(ctx, body)
            max_tokens = _max_tokens(ctx, prompts, body.max_tokens, 16)
            logprobs = body.logprobs
            prompt_lp = body.logprobs if (body.echo and body.logprobs is not None) else None
        else:
            prompts = [_tokenize_chat(ctx, body)]
            max_tokens = _max_tokens(ctx, prompts, body.requested_max_tokens(), None)
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            prompt_lp = None
        specs = []
        for pi, prompt in enumerate(prompts):
            for j in range(body.n):
                try:
                    params = body.sampling_params(max_tokens, logprobs, ctx.vocab_size,
                                                  prompt_logprobs=prompt_lp, seed_offset=j)
                except ValueError as exc:
                    raise APIError(400, str(exc))
                specs.append(ChoiceSpec(pi * body.n + j, prompt, params, body.stop))
        _admit(ctx, prompts, body.n)
    except APIError as exc:
        ctx.metrics.observe_request(endpoint, exc.status, None)
        raise
    rid = f"{'cmpl' if kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.stream:
        return EventSourceResponse(
            _stream(ctx, kind, body, specs, prompts, rid, created, endpoint),
            sep="\n", ping=15, send_timeout=30,
            shutdown_grace_period=ctx.shutdown_timeout)
    return await _collect(ctx, kind, body, specs, prompts, rid, created, endpoint, request)


def _usage(prompts: list[list[int]], completion_tokens: int, cached: int) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


async def _collect(ctx, kind, body, specs, prompts, rid, created, endpoint, request):
    work = asyncio.create_task(collect_choices(ctx.engine, ctx.tokenizer, specs, rid))
    watch = asyncio.create_task(until_disconnected(request))
    done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    if work not in done:  # the client went away: cancelling aborts every engine request
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        ctx.metrics.aborted.inc()
        ctx.metrics.observe_request(endpoint, 499, "abort")
        return JSONResponse(error_body(400, "client disconnected"), status_code=499)
    watch.cancel()
    try:
        results = work.result()
    except ValueError as exc:  # the engine refused the request
        ctx.metrics.observe_request(endpoint, 400, None)
        raise APIError(400, str(exc))
    except Exception as exc:
        ctx.metrics.observe_request(endpoint, 503, None)
        raise APIError(503, f"generation failed: {exc}")
    completion_tokens = sum(len(r.token_ids) for r in results)
    cached = sum(r.num_cached_tokens for r in results[:: max(1, body.n)])
    choices = []
    for r, spec in zip(results, specs):
        ctx.metrics.observe_request(endpoint, 200, r.finish_reason)
        if kind == "completions":
            text = r.text
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(ctx.tokenizer, r.logprobs)
            if body.echo:
                prompt_text = ctx.tokenizer.decode(spec.prompt_ids)
                text = prompt_text + text
                if lp is not None:
                    head = prompt_completion_logprobs(ctx.tokenizer, spec.prompt_ids, r.prompt_logprobs)
                    tail = completion_logprobs(ctx.tokenizer, r.logprobs, len(prompt_text))
                    lp = {k: head[k] + tail[k] for k in head}
            choices.append({"index": r.index, "text": text, "logprobs": lp,
                            "finish_reason": r.finish_reason})
        else:
            choices.append({"index": r.index,
                            "message": {"role": "assistant", "content": r.text},
                            "logprobs": chat_logprobs(ctx.tokenizer, r.logprobs) if body.logprobs else None,
                            "finish_reason": r.finish_reason})
    obj = "text_completion" if kind == "completions" else "chat.completion"
    return _json({"id": rid, "object": obj, "created": created, "model": ctx.model_name,
                  "choices": choices, "usage": _usage(prompts, completion_tokens, cached),
                  "system_fingerprint": None})


async def _stream(ctx, kind, body, specs, prompts, rid, created, endpoint):
    obj = "text_completion" if kind == "completions" else "chat.completion.chunk"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": rid, "object": obj, "created": created, "model": ctx.model_name}
    completion_tokens = 0
    cached = 0
    text_offsets = {s.index: 0 for s in specs}
    finished_ok = False

    def chunk(choices: list[dict]) -> dict:
        return {"data": _dumps({**base, "choices": choices, **({"usage": None} if include_usage else {})})}

    try:
        if kind == "chat":
            yield chunk([{"index": s.index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None} for s in specs])
        elif body.echo:
            for s in specs:
                prompt_text = ctx.tokenizer.decode(s.prompt_ids)
                text_offsets[s.index] = len(prompt_text)
                yield chunk([{"index": s.index, "text": prompt_text, "logprobs": None,
                              "finish_reason": None}])
        async for ev in stream_choices(ctx.engine, ctx.tokenizer, specs, rid):
            d = ev.delta
            completion_tokens += len(d.token_ids)
            if ev.index % max(1, body.n) == 0:
                cached = max(cached, ev.num_cached_tokens)
            if not d.text and d.finish_reason is None and not (body.logprobs and d.logprobs):
                continue
            if kind == "completions":
                lp = None
                if body.logprobs is not None:
                    lp = completion_logprobs(ctx.tokenizer, d.logprobs, text_offsets[ev.index])
                text_offsets[ev.index] += len(d.text)
                yield chunk([{"index": ev.index, "text": d.text, "logprobs": lp,
                              "finish_reason": d.finish_reason}])
            else:
                delta = {"content": d.text} if d.text else {}
                yield chunk([{"index": ev.index, "delta": delta,
                              "logprobs": chat_logprobs(ctx.tokenizer, d.logprobs) if body.logprobs else None,
                              "finish_reason": d.finish_reason}])
            if d.finish_reason is not None:
                ctx.metrics.observe_request(endpoint, 200, d.finish_reason)
        finished_ok = True
        if include_usage:
            yield {"data": _dumps({**base, "choices": [],
                                   "usage": _usage(prompts, completion_tokens, cached)})}
        yield {"data": "[DONE]"}
    except asyncio.CancelledError:
        ctx.metrics.aborted.inc()
        ctx.metrics.observe_request(endpoint, 499, "abort")
        raise
    except Exception as exc:  # mid-stream failure: an error event, then the end of the stream
        if not finished_ok:
            status = 400 if isinstance(exc, ValueError) else 503
            ctx.metrics.observe_request(endpoint, status, None)
            yield {"data": _dumps(error_body(status, str(exc)))}
            yield {"data": "[DONE]"}


def _dumps(obj: dict) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
