"""schemathesis against our own /openapi.json on a live server: at least 1,000 generated requests
(schema-valid and schema-violating: boundary values, wrong types, huge numbers, odd strings,
wrong methods), zero 5xx, every schema-violating request refused with a 4xx, every status and
content type documented, and the engine still serving and holding nothing afterwards.

--max-model-len 64 bounds every generation, so the run stays fast. The seed is fixed so a CI run
is reproducible; set QUANTSERVE_FUZZ_SEED to explore other cases.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest

from server.config import EngineConfig
from tests.api.conftest import wait_idle
from tests.live_server import start_server

MIN_CASES = 1000
CHECKS = "not_a_server_error,negative_data_rejection,status_code_conformance,content_type_conformance"


@pytest.fixture(scope="module")
def small(tiny_checkpoint):
    srv = start_server(str(tiny_checkpoint), served_model_name="tiny",
                       engine_config=EngineConfig(kv_cache_gb=0.05, max_model_len=64))
    yield srv
    srv.stop()


def test_schemathesis_finds_no_server_error(small, tmp_path):
    seed = os.environ.get("QUANTSERVE_FUZZ_SEED", "20240611")
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", small.url + "/openapi.json",
           "--checks", CHECKS, "--max-examples", "60", "--workers", "1", "--seed", seed,
           "--phases", "examples,coverage,fuzzing,stateful", "--request-timeout", "30",
           "--suppress-health-check", "all", "--no-color"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    m = re.search(r"(\d+) generated", out)
    assert m, out[-3000:]
    print(f"\nschemathesis: {m.group(1)} generated cases")
    assert int(m.group(1)) >= MIN_CASES, out[-3000:]
    assert "failure" not in out.split("Test cases:")[-1].lower(), out[-3000:]
    # the engine is still serving, and the fuzzing left nothing behind
    r = httpx.post(small.url + "/v1/completions", timeout=30,
                   json={"model": "tiny", "prompt": "still here", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert not any(wait_idle(small).values())
    assert small.state.engine.is_running


def test_openapi_describes_the_real_request_models(small):
    spec = httpx.get(small.url + "/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    comp = schemas["CompletionRequest"]["properties"]
    for name in ("prompt", "max_tokens", "n", "logprobs", "echo", "stop", "seed", "presence_penalty",
                 "frequency_penalty", "logit_bias", "user", "stream_options", "top_k", "min_p",
                 "repetition_penalty", "ignore_eos", "best_of"):
        assert name in comp, name
    chat = schemas["ChatCompletionRequest"]["properties"]
    for name in ("messages", "max_completion_tokens", "logprobs", "top_logprobs"):
        assert name in chat, name
    assert comp["n"]["anyOf"][0]["maximum"] == 16 and comp["temperature"]["anyOf"][0]["maximum"] == 2
    assert {"type": "null"} in comp["n"]["anyOf"]  # explicit nulls are accepted, and documented
    post = spec["paths"]["/v1/completions"]["post"]
    assert {"400", "401", "404", "413", "429", "503"} <= set(post["responses"])
    assert "text/event-stream" in post["responses"]["200"]["content"]
