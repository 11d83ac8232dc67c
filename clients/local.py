"""Helpers for a server started on this machine: a free port, and waiting until it is ready.

Shared by the tests (tests/subprocess_server.py, tests/live_server.py) and the benchmarks
(bench/serving.py), which all start `quantserve serve` and must not send work before /ready.
"""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotReadyError(RuntimeError):
    """The server exited, or did not answer /ready with 200 in time."""


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0,
               interval: float = 0.1) -> None:
    """Poll `url`/ready until it answers 200. Raises NotReadyError when `proc` exits first (its
    return code in the message) or after `timeout` seconds; the caller stops the process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise NotReadyError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=max(1.0, interval * 4)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise NotReadyError(f"server not ready after {timeout:.0f}s")
