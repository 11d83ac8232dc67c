"""AsyncEngine: the asyncio bridge to an LLMEngine stepping in its own thread.

`submit()` queues one request at once and returns its RequestHandle, an async iterator of
RequestOutput; closing the handle before the request finished (a client disconnect, an error,
shutdown) aborts it, and the engine frees its blocks before its next step. A handle dropped
without being closed is aborted when it is collected. `generate()` wraps both for simple callers.
Adds and aborts are queued to the engine thread, which applies them between steps, so the engine
itself is never touched by two threads. An exception inside a step fails the requests in flight
(they get the error); the loop keeps serving.

Queue depth for admission control (`queue_depth()`): requests not yet running, i.e. adds not yet
taken by the engine thread plus the scheduler's waiting queue, which the engine thread republishes
from the scheduler itself after every step, so the figure cannot drift or leak.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import weakref
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
        # requests (and their prompt tokens) in the scheduler's waiting queue, as of the last
        # publication by the engine thread; adds it has taken but not yet scheduled included
        self._waiting_requests = 0
        self._waiting_tokens = 0
        self._fail_with: BaseException | None = None

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
        """Engine requests with a consumer (waiting, running, or finishing delivery)."""
        return len(self._queues)

    def queue_depth(self) -> tuple[int, int]:
        """(requests, prompt tokens) waiting to run: not yet taken by the engine thread, or in the
        scheduler's waiting queue (preempted sequences included)."""
        with self._cv:
            pending = self._adds
            return (len(pending) + self._waiting_requests,
                    sum(len(p.prompt_ids) for p in pending) + self._waiting_tokens)

    @property
    def queued_prompt_tokens(self) -> int:
        """Prompt tokens of requests waiting to run (see queue_depth)."""
        return self.queue_depth()[1]

    def fail_all(self, exc: BaseException) -> None:
        """Abort every request in flight and raise `exc` in each consumer (used at the end of a
        drain that ran out of time); the engine keeps running."""
        with self._cv:
            self._fail_with = exc
            self._cv.notify()

    # ------------------------------------------------------------------ requests

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               request_id: str | None = None) -> "RequestHandle":
        """Queue a request now (synchronously, so an admission check just before it is exact) and
        return its handle. Iterate the handle for outputs; close() it when done (idempotent; a
        handle dropped unclosed is aborted when collected). Raises EngineDeadError if the loop is
        gone; the handle raises ValueError for a request the engine refuses (e.g. too long)."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        rid = request_id or self.new_request_id()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cv:
            if rid in self._queues:
                raise ValueError(f"duplicate request id {rid}")
            self._queues[rid] = (queue, loop)
            self._adds.append(_Pending(rid, prompt_ids, params, queue, loop))
            self._cv.notify()
        return RequestHandle(self, rid, queue)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield this request's outputs until it finishes; leaving early aborts it."""
        handle = self.submit(prompt_ids, params, request_id)
        try:
            async for out in handle:
                yield out
        finally:
            handle.close()

    def _drop(self, request_id: str) -> None:
        """Abort (a no-op for a finished request) and forget a request's consumer queue."""
        self.abort(request_id)
        self._forget(request_id)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        with self._cv:
            self._aborts.append((request_id, reason))
            self._cv.notify()

    def _forget(self, request_id: str) -> None:
        with self._cv:
            self._queues.pop(request_id, None)

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not (self._stop or self._adds or self._aborts or self._fail_with
                           or engine.has_unfinished()):
                    self._cv.wait()
                if self._stop:
                    break
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                fail_with, self._fail_with = self._fail_with, None
                # taken adds stay counted as waiting until the next publication
                self._waiting_requests += len(adds)
                self._waiting_tokens += sum(len(p.prompt_ids) for p in adds)
            for p in adds:
                try:
                    engine.add_request(p.request_id, p.prompt_ids, p.params)
                except Exception as exc:  # refused: tell only that request
                    _put(p.loop, p.queue, exc)
            for rid, reason in aborts:
                engine.abort_request(rid, reason)
            if fail_with is not None:
                self._fail_all(fail_with)
            if not engine.has_unfinished():
                self.last_stats = engine.stats()
                self._publish_waiting()
                continue
            try:
                outputs, stats = engine.step()
            except Exception as exc:
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(exc)
                self._publish_waiting()
                continue
            self.last_stats = stats
            self._publish_waiting()
            self._deliver(outputs)
            if self.on_stats is not None:
                try:
                    self.on_stats(stats)
                except Exception:
                    log.exception("stats callback failed")
        self._fail_all(EngineDeadError("the server is shutting down"))
        self._publish_waiting()

    def _publish_waiting(self) -> None:
        waiting = self.engine.scheduler.waiting
        tokens = sum(seq.num_prompt_tokens for seq in waiting)
        with self._cv:
            self._waiting_requests = len(waiting)
            self._waiting_tokens = tokens

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
            _put(loop, queue, exc)


class RequestHandle:
    """The output stream of one engine request (see AsyncEngine.submit)."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue = queue
        self.finished = False
        # runs _drop once: at close(), or when the handle is collected without being closed
        self._finalizer = weakref.finalize(self, engine._drop, request_id)

    def __aiter__(self) -> "RequestHandle":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or not self._finalizer.alive:  # done, or closed
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:  # nothing to abort: just free the queue entry now
            self.finished = True
            if self._finalizer.detach() is not None:
                self._engine._forget(self.request_id)
        return item

    def close(self) -> None:
        """Abort the request unless it finished, and release its queue (idempotent)."""
        self._finalizer()


def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the event loop is closed (shutdown)
        pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
