"""Admission control: whether a new API request may join the engine's queue right now.

Refusals, in the order they are checked:
  503 `server_draining`  the server got SIGTERM and is finishing what it has
  503 `engine_dead`      the engine loop is not running
  400 `request_too_large` one request alone is bigger than the queue limits (it could never run)
  429 `queue_full`       the waiting queue (requests or prompt tokens) would pass its limit;
                         with `Retry-After`, so the OpenAI SDK and proxies back off and retry

"Waiting" means not yet running in the engine: adds not yet taken by the engine thread plus the
scheduler's waiting queue (`AsyncEngine.queue_depth()`); running sequences do not count, so a
full batch of long generations never blocks admission by itself. Each choice (prompt x n) is one
engine request. The figures come from the engine, so nothing here can leak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from server.api.errors import APIError
from server.api.metrics import Metrics
from server.engine.async_engine import AsyncEngine

RETRY_AFTER_SECONDS = 1


@dataclass
class Admission:
    engine: AsyncEngine
    metrics: Metrics
    max_queued_requests: int
    max_queued_tokens: int
    is_draining: Callable[[], bool]

    def check(self, num_requests: int, num_prompt_tokens: int) -> None:
        """Raise APIError unless `num_requests` engine requests carrying `num_prompt_tokens` prompt
        tokens in all may be queued now."""
        if self.is_draining():
            # Connection: close, so a keep-alive client (or an L4 load balancer's pinned
            # connection) retries on a fresh connection, which lands on another replica
            raise APIError(503, "the server is shutting down; retry on another replica",
                           code="server_draining", headers={"Connection": "close"})
        if not self.engine.is_running:
            raise APIError(503, "the engine loop is not running", code="engine_dead")
        if num_requests > self.max_queued_requests:
            raise APIError(400, f"this request needs {num_requests} sequences (prompts x n); the "
                                f"server queues at most {self.max_queued_requests}",
                           param="n", code="request_too_large")
        if num_prompt_tokens > self.max_queued_tokens:
            raise APIError(400, f"this request has {num_prompt_tokens} prompt tokens (prompts x n); "
                                f"the server queues at most {self.max_queued_tokens}",
                           param="prompt", code="request_too_large")
        queued, queued_tokens = self.engine.queue_depth()
        if queued + num_requests > self.max_queued_requests:
            self._reject("queue_full", f"{queued} requests are waiting (limit "
                                       f"{self.max_queued_requests})")
        if queued_tokens + num_prompt_tokens > self.max_queued_tokens:
            self._reject("token_limit", f"{queued_tokens} prompt tokens are waiting (limit "
                                        f"{self.max_queued_tokens})")

    def _reject(self, reason: str, detail: str) -> None:
        self.metrics.rejected.labels(reason=reason).inc()
        raise APIError(429, f"the server is overloaded: {detail}; retry later", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
