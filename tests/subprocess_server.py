"""`python -m server.cli serve` in a child process on 127.0.0.1, as an operator runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from clients.local import NotReadyError, free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_server_process(model: Path, log_path: Path, *args: str, startup_timeout: float = 180.0,
                         extra_env: dict[str, str] | None = None) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           "--served-model-name", "tiny", "--kv-cache-gb", "0.25", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    srv = ServerProcess(proc, url, log_path)
    try:
        wait_ready(url, proc, startup_timeout)
    except NotReadyError as exc:
        srv.stop()
        raise RuntimeError(f"{exc}:\n{srv.log()[-3000:]}") from None
    return srv


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
