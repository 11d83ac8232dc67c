"""AsyncEngine: the asyncio bridge to an LLMEngine stepping in its own thread.

`generate()` returns an async iterator of RequestOutput for one request; leaving the iterator
early (a client disconnect cancels the handler's task) aborts the request, and the engine frees
its blocks before its next step. Adds and aborts are queued to the engine thread, which applies
them between steps, so the engine itself is never touched by two threads. An exception inside a
step fails the requests in flight (each gets the error and its blocks are freed); the loop keeps
serving new requests. A request the engine refuses (too long) fails alone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from server.engine.engine import EngineStats, LLMEngine, RequestOutput
from server.engine.sequence import FinishReason, SamplingParams

log = logging.getLogger("quantserve.engine")


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Pending:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, engine: LLMEngine,
                 on_stats: Callable[[EngineStats], None] | None = None) -> None:
        self.engine = engine
        self.on_stats = on_stats
        self._cv = threading.Condition()
        self._adds: list[_Pending] = []
        self._aborts: list[tuple[str, FinishReason]] = []
        self._queues: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.last_stats: EngineStats = engine.stats()
        self.queued_prompt_tokens = 0  # tokens of requests added but not yet finished
        self._request_tokens: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="quantserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    # ------------------------------------------------------------------ requests

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield this request's outputs until it finishes. Raises ValueError for a request the
        engine refuses (e.g. too long), EngineDeadError if the engine loop is gone."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        rid = request_id or self.new_request_id()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cv:
            self._queues[rid] = (queue, loop)
            self._request_tokens[rid] = len(prompt_ids)
            self.queued_prompt_tokens += len(prompt_ids)
            self._adds.append(_Pending(rid, prompt_ids, params, queue, loop))
            self._cv.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)
            self._forget(rid)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        with self._cv:
            self._aborts.append((request_id, reason))
            self._cv.notify()

    def _forget(self, request_id: str) -> None:
        with self._cv:
            self._queues.pop(request_id, None)
            self.queued_prompt_tokens -= self._request_tokens.pop(request_id, 0)

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not (self._stop or self._adds or self._aborts or engine.has_unfinished()):
                    self._cv.wait()
                if self._stop:
                    break
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            for p in adds:
                try:
                    engine.add_request(p.request_id, p.prompt_ids, p.params)
                except Exception as exc:  # refused: tell only that request
                    p.loop.call_soon_threadsafe(p.queue.put_nowait, exc)
            for rid, reason in aborts:
                engine.abort_request(rid, reason)
            if not engine.has_unfinished():
                self.last_stats = engine.stats()
                continue
            try:
                outputs, stats = engine.step()
            except Exception as exc:
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(exc)
                continue
            self.last_stats = stats
            self._deliver(outputs)
            if self.on_stats is not None:
                try:
                    self.on_stats(stats)
                except Exception:
                    log.exception("stats callback failed")
        self._fail_all(EngineDeadError("the server is shutting down"))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._cv:
            for out in outputs:
                entry = self._queues.get(out.request_id)
                if entry is not None:
                    by_loop.setdefault(entry[1], []).append((entry[0], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed (shutdown)
                pass

    def _fail_all(self, exc: Exception) -> None:
        engine = self.engine
        for rid in list(engine.requests):
            engine.abort_request(rid)
        with self._cv:
            entries = list(self._queues.values())
        for queue, loop in entries:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            except RuntimeError:
                pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
