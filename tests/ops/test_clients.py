"""The client examples a user copies, run as scripts against a live server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.ops.conftest import ROOT

CLIENTS = ROOT / "clients"


def _run(ops_server, *cmd, timeout=120):
    env = {**os.environ, "QUANTSERVE_BASE_URL": ops_server.url}
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


@pytest.mark.parametrize("script", ["chat.py", "stream.py", "sse_raw.py"])
def test_python_examples(ops_server, script):
    out = _run(ops_server, sys.executable, str(CLIENTS / script), "Hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout  # the tiny random model's text may be all whitespace
    assert "tokens" in out.stderr or "finish_reason" in out.stderr


def test_curl_example(ops_server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = _run(ops_server, "bash", str(CLIENTS / "curl.sh"))
    assert out.returncode == 0, out.stderr
    assert '"object":"list"' in out.stdout.replace(" ", "") and "[DONE]" in out.stdout
    assert "quantserve_generation_tokens_total" in out.stdout


def test_loadgen_script(ops_server):
    out = _run(ops_server, sys.executable, str(CLIENTS / "loadgen.py"), "--base-url",
               ops_server.url, "-c", "3", "-n", "6", "--max-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["requests"] == 6 and summary["ok"] == 6 and summary["completion_tokens"] == 48
    assert 0 < summary["ttft_p50_s"] <= summary["ttft_p99_s"] and summary["tokens_per_s"] > 0
