"""`quantserve serve`: load the model, start the engine thread, run uvicorn, drain on SIGTERM.

Draining: the first SIGTERM/SIGINT turns /ready to 503 and makes new generation requests get 503
while the requests in flight finish, streams included (counted per HTTP request until its last
byte is sent, not per engine request). Once none is left uvicorn stops and the process exits 0.
If --shutdown-timeout passes first, the requests still running are failed (a stream gets an error
event and [DONE], a plain request a 503), and the process still exits 0. A second signal stops at
once (and the process ends by that signal, as uvicorn does).

sse-starlette cancels its streams as soon as uvicorn's `should_exit` is set (it polls the server
found through the SIGTERM handler, and patches `Server.handle_exit`); DrainingServer therefore
overrides `handle_exit` and sets `should_exit` only when the drain is over, so in-flight streams
are never cut by the library.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from server.api.app import create_app
from server.config import EngineConfig, ModelConfig, ServerConfig
from server.engine.async_engine import AsyncEngine, EngineDeadError
from server.engine.engine import LLMEngine
from quant.kernels import backend_counts
from server.first_boot import QuantizeSpec
from server.loader import LoadedModel, load_model, read_generation_eos
from server.selfcheck import SelfCheckConfig, run_self_check

log = logging.getLogger("quantserve")


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    ids = set(loaded.model.config.eos_token_id)
    tok_eos = getattr(loaded.tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    ids.update(read_generation_eos(loaded.path))
    return sorted(ids)


def quantize_spec(mcfg: ModelConfig) -> QuantizeSpec:
    """How a plain model named by `mcfg` is quantised on first boot."""
    return QuantizeSpec(method=mcfg.quantize_method, bits=mcfg.quantize_bits,
                        group_size=mcfg.quantize_group_size, calibration=mcfg.quantize_calibration,
                        device=mcfg.device)


def build_engine(mcfg: ModelConfig, ecfg: EngineConfig) -> tuple[LoadedModel, AsyncEngine]:
    spec = quantize_spec(mcfg)
    loaded = load_model(mcfg.model, device=mcfg.device, dtype=mcfg.dtype, cache_dir=mcfg.cache_dir,
                        spec=spec, kernel=mcfg.kernel, served_name=mcfg.served_model_name,
                        load_format=mcfg.load_format, tokenizer=mcfg.tokenizer,
                        lm_head=mcfg.lm_head)
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
    # after the drain, what is left (idle keep-alive connections) gets this long to close
    FINAL_GRACE_SECONDS = 2.0

    def __init__(self, config: uvicorn.Config, app_state, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.app_state = app_state
        self.shutdown_timeout = shutdown_timeout
        self._draining_since: float | None = None

    def busy(self) -> int:
        """API requests still being served (HTTP level), or engine requests still queued."""
        return max(self.app_state.requests_in_flight, self.app_state.engine.num_in_flight)

    def handle_exit(self, sig, frame) -> None:
        if self._draining_since is not None:  # second signal: stop now
            super().handle_exit(sig, frame)
            return
        self._draining_since = time.monotonic()
        self.app_state.draining = True
        log.info("draining: %d requests in flight, up to %.0fs", self.busy(), self.shutdown_timeout)
        threading.Thread(target=self._drain, name="quantserve-drain", daemon=True).start()

    def _wait_idle(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.busy() and time.monotonic() < deadline and not self.should_exit:
            time.sleep(0.02)
        return not self.busy()

    def _drain(self) -> None:
        if not self._wait_idle(self.shutdown_timeout) and not self.should_exit:
            log.warning("shutdown timeout: failing %d requests still in flight", self.busy())
            self.app_state.engine.fail_all(EngineDeadError("the server is shutting down"))
            self._wait_idle(self.FINAL_GRACE_SECONDS)
        self.config.timeout_graceful_shutdown = self.FINAL_GRACE_SECONDS
        # not super().handle_exit(): uvicorn would re-raise the signal after serving, and a drained
        # server should exit 0 rather than die by SIGTERM
        self.should_exit = True


def run_server(mcfg: ModelConfig, ecfg: EngineConfig, scfg: ServerConfig) -> int:
    loaded, engine = build_engine(mcfg, ecfg)
    app = create_app(loaded, engine, scfg)
    config = uvicorn.Config(app, host=scfg.host, port=scfg.port, log_level=scfg.log_level,
                            timeout_graceful_shutdown=DrainingServer.FINAL_GRACE_SECONDS,
                            access_log=False)
    server = DrainingServer(config, app.state.qs, scfg.shutdown_timeout)
    log.info("serving %s on http://%s:%d/v1", loaded.name, scfg.host, scfg.port)
    server.run()
    return 0
