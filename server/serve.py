"""`quantserve serve`: load the model, start the engine thread, run uvicorn, drain on SIGTERM.

Draining: the first SIGTERM/SIGINT turns /ready to 503 and makes new requests get 503 while the
requests in flight finish; once none is left (or --shutdown-timeout passes) uvicorn stops and the
process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from server.api.app import create_app
from server.config import EngineConfig, ModelConfig, ServerConfig
from server.engine.async_engine import AsyncEngine
from server.engine.engine import LLMEngine
from quant.kernels import backend_counts
from server.loader import LoadedModel, QuantizeSpec, load_model, read_generation_eos
from server.selfcheck import SelfCheckConfig, run_self_check

log = logging.getLogger("quantserve")


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    ids = set(loaded.model.config.eos_token_id)
    tok_eos = getattr(loaded.tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    ids.update(read_generation_eos(loaded.path))
    return sorted(ids)


def build_engine(mcfg: ModelConfig, ecfg: EngineConfig) -> tuple[LoadedModel, AsyncEngine]:
    spec = QuantizeSpec(method=mcfg.quantize_method, bits=mcfg.quantize_bits,
                        group_size=mcfg.quantize_group_size)
    loaded = load_model(mcfg.model, device=mcfg.device, dtype=mcfg.dtype, cache_dir=mcfg.cache_dir,
                        spec=spec, kernel=mcfg.kernel, served_name=mcfg.served_model_name,
                        load_format=mcfg.load_format, tokenizer=mcfg.tokenizer)
    log.info("model %s loaded in %.1fs: %.1f MiB of weights, kernel backends %s", loaded.name,
             loaded.load_seconds, loaded.weight_bytes / 2**20, loaded.backends)
    engine = LLMEngine(loaded.model, ecfg, eos_token_ids(loaded))
    loaded.self_check = run_self_check(engine, loaded.tokenizer, SelfCheckConfig(
        enabled=mcfg.self_check, allow_fallback=mcfg.allow_fallback))
    if loaded.self_check.fallbacks:  # in place: the metrics read this dict at scrape time
        loaded.backends.clear()
        loaded.backends.update(backend_counts(loaded.model))
    return loaded, AsyncEngine(engine)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app_state, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.app_state = app_state
        self.shutdown_timeout = shutdown_timeout
        self._draining_since: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._draining_since is not None:  # second signal: stop now
            super().handle_exit(sig, frame)
            return
        self._draining_since = time.monotonic()
        self.app_state.draining = True
        engine = self.app_state.engine
        log.info("draining: %d requests in flight, up to %.0fs", engine.num_in_flight,
                 self.shutdown_timeout)

        def wait_then_exit() -> None:
            deadline = self._draining_since + self.shutdown_timeout
            while engine.num_in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            if engine.num_in_flight:
                log.warning("shutdown timeout: %d requests still in flight", engine.num_in_flight)
            # not super().handle_exit(): uvicorn would re-raise the signal once it has stopped, and
            # a drained server must exit 0 (Kubernetes and supervisors read a kill as a failure)
            self.should_exit = True

        threading.Thread(target=wait_then_exit, name="quantserve-drain", daemon=True).start()


def run_server(mcfg: ModelConfig, ecfg: EngineConfig, scfg: ServerConfig) -> int:
    loaded, engine = build_engine(mcfg, ecfg)
    app = create_app(loaded, engine, scfg)
    config = uvicorn.Config(app, host=scfg.host, port=scfg.port, log_level=scfg.log_level,
                            timeout_graceful_shutdown=max(1, int(scfg.shutdown_timeout)),
                            access_log=False)
    server = DrainingServer(config, app.state.qs, scfg.shutdown_timeout)
    log.info("serving %s on http://%s:%d/v1", loaded.name, scfg.host, scfg.port)
    server.run()
    return 0
