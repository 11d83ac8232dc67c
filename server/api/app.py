"""The FastAPI app: routes, auth, body limits, CORS, health / readiness, metrics.

`create_app` takes a loaded model and a started AsyncEngine; it builds nothing heavy itself, so
tests can build an app around a tiny model in milliseconds.
"""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from server.api.errors import APIError, error_response, install_error_handlers
from server.api.gauges import engine_gauges, memory_gauges, quant_gauges, self_check_gauges
from server.api.metrics import HTTPMetrics, Metrics
from server.api.routes import ServingContext, build_router
from server.config import ServerConfig
from server.engine.async_engine import AsyncEngine
from server.loader import LoadedModel


@dataclass
class AppState:
    loaded: LoadedModel
    engine: AsyncEngine
    config: ServerConfig
    metrics: Metrics
    ready: bool = False
    draining: bool = False
    self_check: dict = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)


def keys_match(given: str, keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every configured key (no early exit on a match)."""
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given.encode(), k.encode())
    return ok


class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit (declared or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = error_response(413, f"request body exceeds {self.max_bytes} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise APIError(413, f"request body exceeds {self.max_bytes} bytes")
            return message

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

    app = FastAPI(title="quantserve", version="0.1.0", lifespan=lifespan)
    app.state.qs = state
    install_error_handlers(app)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(HTTPMetrics, metrics=metrics)  # outermost: counts 413s too

    async def require_key(request: Request) -> None:
        if not config.api_keys:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not keys_match(token.strip(), config.api_keys):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    e = engine.engine
    report = loaded.self_check  # server.selfcheck.SelfCheckReport, or None if never run
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

    ctx = ServingContext(
        engine=engine, tokenizer=loaded.tokenizer, model_name=loaded.name,
        max_model_len=e.limits.max_model_len, vocab_size=e.model.config.vocab_size, metrics=metrics,
        max_queued_requests=config.max_queued_requests, max_queued_tokens=config.max_queued_tokens,
        shutdown_timeout=config.shutdown_timeout, is_draining=lambda: state.draining)
    app.include_router(build_router(ctx), dependencies=[Depends(require_key)])

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def list_models():
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_key)])
    async def get_model(model_id: str):
        if model_id != loaded.name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model",
                           code="model_not_found")
        return model_card(state)

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return error_response(503, "the engine loop is not running")
        return {"status": "ok", "model": loaded.name, "backends": loaded.backends,
                "fallbacks": state.fallbacks}

    @app.get("/ready")
    async def ready():
        if state.draining:
            return error_response(503, "draining: the server is shutting down", code="server_draining")
        if not (state.ready and engine.is_running):
            return error_response(503, "not ready", code="not_ready")
        return {"status": "ready"}

    metrics_deps = [Depends(require_key)] if config.metrics_require_key else []

    @app.get("/metrics", dependencies=metrics_deps)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


__all__ = ["create_app", "AppState", "JSONResponse"]
