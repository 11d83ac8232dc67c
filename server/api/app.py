"""The FastAPI app: routes, auth, body limits, CORS, health / readiness, metrics.

`create_app` takes a loaded model and a started AsyncEngine; it builds nothing heavy itself, so
tests can build an app around a tiny model in milliseconds.

Middleware, outermost first: CORS (answers preflights, so browsers never need the key for them)
-> Gate (the API key on /v1/* and, if asked, /metrics; counts the API requests in flight, which
draining waits for) -> BodyLimit (413) -> the routes. /health, /ready and /openapi.json are open.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Path
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.admission import Admission
from server.api.errors import ERROR_RESPONSES, APIError, error_response, install_error_handlers
from server.api.gauges import engine_gauges, memory_gauges, quant_gauges, self_check_gauges
from server.api.logprobs import TokenTexts
from server.api.metrics import HTTPMetrics, Metrics
from server.api.routes import ServingContext, build_router
from server.config import ServerConfig
from server.engine.async_engine import AsyncEngine
from server.loader import LoadedModel

PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})


@dataclass
class AppState:
    loaded: LoadedModel
    engine: AsyncEngine
    config: ServerConfig
    metrics: Metrics
    ready: bool = False
    draining: bool = False
    requests_in_flight: int = 0  # HTTP requests other than probes, until their last byte is sent
    self_check: dict = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def keys_match(given: bytes, key_digests: tuple[bytes, ...]) -> bool:
    """Constant time in the key's content and length: fixed-size digests are compared with
    compare_digest against every configured key, with no early exit on a match."""
    d = _digest(given)
    ok = False
    for k in key_digests:
        ok |= hmac.compare_digest(d, k)
    return ok


class Gate:
    """ASGI middleware: API-key check and the count of API requests in flight."""

    def __init__(self, app, state: AppState) -> None:
        self.app = app
        self.state = state
        cfg = state.config
        self.key_digests = tuple(_digest(k.encode("utf-8")) for k in cfg.api_keys)
        self.metrics_need_key = cfg.metrics_require_key

    def _needs_key(self, path: str) -> bool:
        if not self.key_digests:
            return False
        return path.startswith("/v1/") or path == "/v1" or (path == "/metrics" and self.metrics_need_key)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and keys_match(token.strip(), self.key_digests)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self._needs_key(path) and not self._authorized(scope):
            response = error_response(401, "invalid or missing API key (send 'Authorization: "
                                           "Bearer <key>')", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        if path in PROBE_PATHS:
            return await self.app(scope, receive, send)
        self.state.requests_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.requests_in_flight -= 1


class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit (declared or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body exceeds {self.max_bytes} bytes"
        for name, value in scope.get("headers") or []:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await error_response(413, message)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:  # FastAPI re-raises HTTPExceptions from body reading
                    raise StarletteHTTPException(413, message)
            return msg

        return await self.app(scope, limited_receive, send)


def model_card(state: AppState) -> dict:
    q = state.loaded.quant_config
    return {
        "id": state.loaded.name, "object": "model", "created": int(state.started_at),
        "owned_by": "quantserve", "root": state.loaded.name,
        "max_model_len": state.engine.engine.limits.max_model_len,
        "quantization": None if q is None else {
            "method": "gptq", "bits": q.bits, "group_size": q.group_size, "desc_act": q.desc_act,
            "sym": q.sym, "checkpoint_format": q.checkpoint_format,
            "kernel_backends": state.loaded.backends, "self_check": state.self_check or None,
        },
    }


def create_app(loaded: LoadedModel, engine: AsyncEngine, config: ServerConfig,
               metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()
    state = AppState(loaded=loaded, engine=engine, config=config, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.is_running:
            engine.start()
        state.ready = True
        yield
        state.ready = False
        engine.stop()

    app = FastAPI(title="quantserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API of a GPTQ inference server")
    app.state.qs = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(Gate, state=state)
    app.add_middleware(HTTPMetrics, metrics=metrics)  # outside the gate and body limit: counts 401/413
    if config.cors_origins:  # added last: the outermost, so errors carry CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                           expose_headers=["Retry-After"])

    e = engine.engine
    report = loaded.self_check  # server.selfcheck_report.SelfCheckReport, or None if never run
    if report is not None:
        state.self_check = report.to_dict()
        state.fallbacks.update(report.fallbacks)
    metrics.info.info({"version": "0.1.0", "model": loaded.name})
    metrics.gauge_sources += [
        engine_gauges(engine),
        memory_gauges(loaded.weight_bytes, e.kv.nbytes, e.model.device),
        quant_gauges(loaded.quant_config,
                     loaded.quant_config.checkpoint_format if loaded.quant_config else "none",
                     loaded.backends, state.fallbacks),
        self_check_gauges(report),
    ]
    engine.on_stats = metrics.observe_step

    admission = Admission(engine=engine, metrics=metrics,
                          max_queued_requests=config.max_queued_requests,
                          max_queued_tokens=config.max_queued_tokens,
                          is_draining=lambda: state.draining)
    ctx = ServingContext(
        engine=engine, tokenizer=loaded.tokenizer, model_name=loaded.name,
        max_model_len=e.limits.max_model_len, vocab_size=e.model.config.vocab_size, metrics=metrics,
        admission=admission, texts=TokenTexts(loaded.tokenizer))
    app.include_router(build_router(ctx))

    @app.get("/v1/models", responses={401: ERROR_RESPONSES[401]})
    async def list_models():
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model_id:path}", responses={k: ERROR_RESPONSES[k] for k in (401, 404)})
    async def get_model(model_id: str = Path(examples=[loaded.name])):
        if model_id != loaded.name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model",
                           code="model_not_found")
        return model_card(state)

    @app.get("/health", responses={503: ERROR_RESPONSES[503]})
    async def health():
        if not engine.is_running:
            return error_response(503, "the engine loop is not running")
        return {"status": "ok", "model": loaded.name, "backends": loaded.backends,
                "fallbacks": state.fallbacks}

    @app.get("/ready", responses={503: ERROR_RESPONSES[503]})
    async def ready():
        if state.draining:
            return error_response(503, "draining: the server is shutting down", code="server_draining")
        if not (state.ready and engine.is_running):
            return error_response(503, "not ready", code="not_ready")
        return {"status": "ready"}

    @app.get("/metrics", responses={401: ERROR_RESPONSES[401]},
             response_class=Response)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


__all__ = ["create_app", "AppState", "JSONResponse"]
