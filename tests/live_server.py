"""A real uvicorn server on 127.0.0.1 in a background thread, around a loaded model."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import uvicorn

from clients.local import NotReadyError, free_port, wait_ready
from server.api.app import create_app
from server.config import EngineConfig, ModelConfig, ServerConfig
from server.serve import build_engine


@dataclass
class LiveServer:
    url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def state(self):
        return self.app.state.qs

    @property
    def engine(self):
        return self.state.engine.engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(model: str, engine_config: EngineConfig | None = None,
                 server_config: ServerConfig | None = None, **model_kw) -> LiveServer:
    port = free_port()
    mcfg = ModelConfig(model=model, device="cpu", **model_kw)
    loaded, engine = build_engine(mcfg, engine_config or EngineConfig(kv_cache_gb=0.25))
    scfg = server_config or ServerConfig()
    scfg = ServerConfig(**{**scfg.__dict__, "host": "127.0.0.1", "port": port})
    app = create_app(loaded, engine, scfg)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=60, interval=0.05)
    except NotReadyError:
        server.should_exit = True
        raise RuntimeError("test server did not become ready") from None
    return LiveServer(url, app, server, thread)
