"""The start-up self-check: catches a corrupted layer and a wrong decode path, refuses to serve
(non-zero exit, a log line naming layer and backend), or falls back and says so everywhere."""

from __future__ import annotations

import logging
import math

import httpx
import pytest
import torch

from quant import kernels
from server import cli
from server.config import EngineConfig, ModelConfig
from server.engine.engine import LLMEngine
from server.loader import load_model
from server.selfcheck import RTOL, relative_errors, run_self_check
from server.selfcheck_report import COLUMN_FACTOR, SelfCheckConfig, SelfCheckError
from server.serve import build_engine, eos_token_ids
from tests.live_server import free_port, start_server

ENGINE = EngineConfig(kv_cache_gb=0.02)

# the tiny model served: 2 layers x (fused qkv, o, fused gate_up, down) packed layers
QUANT_LAYERS = 8


class GarbageAtSmallM:
    """A kernel with vLLM #10656's failure mode: right for M >= 16 rows, garbage for M <= 8
    (output columns permuted: the right magnitude, the wrong numbers)."""

    name = "test_garbage_small_m"

    def unsupported_reason(self, layer):
        return None

    def prepare(self, layer):
        return True

    def apply(self, layer, state, x):
        y = kernels.reference(layer, x).to(x.dtype)
        return y.flip(-1) if x.shape[0] <= 8 else y


@pytest.fixture()
def garbage_backend():
    kernels.register(GarbageAtSmallM(), ("cpu",), priority=1000)  # only when named
    yield GarbageAtSmallM.name
    kernels._REGISTRY.pop(GarbageAtSmallM.name, None)


def _engine(path, dtype="auto", kernel=None):
    loaded = load_model(str(path), device="cpu", dtype=dtype, kernel=kernel)
    return loaded, LLMEngine(loaded.model, ENGINE, eos_token_ids(loaded))


def test_relative_errors_flag_nan_and_a_single_bad_column():
    ref = torch.randn(16, 1024, generator=torch.Generator().manual_seed(0))
    assert relative_errors(ref.clone(), ref) == (0.0, 0.0)
    bad = ref.clone()
    bad[0, 3] = float("nan")
    assert relative_errors(bad, ref) == (math.inf, math.inf)
    one_col = ref.clone()
    one_col[:, 7] *= 1.5  # one column of 1024 off by half: small overall, loud per column
    rel, col = relative_errors(one_col, ref)
    assert rel < RTOL[torch.float32] < RTOL[torch.float32] * COLUMN_FACTOR < col, (rel, col)


def test_healthy_model_passes_in_every_dtype(tiny_checkpoint):
    """No false alarm from fp16 / bf16 rounding: same kernels, lower precision, still passes."""
    for dtype in ("float32", "float16", "bfloat16"):
        loaded, engine = _engine(tiny_checkpoint, dtype=dtype)
        report = run_self_check(engine, loaded.tokenizer)
        assert report.status == "passed", (dtype, report.to_dict())
        # the default CPU path also packs lm_head (8-bit), one more layer to check
        assert report.layers_checked == QUANT_LAYERS + 1 and report.golden.generated_tokens == 8
        assert report.golden.positions == report.golden.prompt_tokens - 1 + 8
        assert report.golden.max_logprob_diff < report.golden.tolerance / 4, dtype
        assert engine.allocator.cached == {}  # nothing of the check left in the prefix cache


def test_corrupted_layer_refuses_then_falls_back(tiny_checkpoint, caplog):
    loaded, engine = _engine(tiny_checkpoint, kernel="dense")
    layer = loaded.model.model.layers[1].mlp.down_proj
    assert layer.backend == "dense"
    w = layer.dequantize(torch.float32)
    w[:16] *= 1.5  # one tile of output rows of the kernel's own copy scaled, GPTQ buffers intact
    layer.kernel_state[torch.float32] = w
    with caplog.at_level(logging.ERROR, logger="quantserve.selfcheck"):
        with pytest.raises(SelfCheckError, match=r"model\.layers\.1\.mlp\.down_proj.*'dense'"):
            run_self_check(engine, loaded.tokenizer)
    assert any("model.layers.1.mlp.down_proj" in r.message and "dense" in r.message
               for r in caplog.records)

    report = run_self_check(engine, loaded.tokenizer, SelfCheckConfig(allow_fallback=True))
    assert report.status == "fallback" and report.fallbacks == {"dense": 1}
    assert {r.layer for r in report.failures} == {"model.layers.1.mlp.down_proj"}
    assert layer.backend == "torch" and report.golden.ok
    assert kernels.backend_counts(loaded.model) == {"dense": QUANT_LAYERS - 1, "torch": 1}


def test_wrong_decode_path_is_caught_outside_the_kernels(tiny_checkpoint):
    """Kernels fine, served logits wrong (as a broken attention or graph path would make them):
    the golden decode catches it, and falling back to the reference kernels cannot help."""
    loaded, engine = _engine(tiny_checkpoint)
    execute = engine.runner.execute

    def wrong_logits(batch):
        logits, seqs = execute(batch)
        return (None if logits is None else logits.roll(1, dims=-1)), seqs

    engine.runner.execute = wrong_logits
    with pytest.raises(SelfCheckError, match="golden"):
        run_self_check(engine, loaded.tokenizer)
    with pytest.raises(SelfCheckError, match="outside the quantized kernels"):
        run_self_check(engine, loaded.tokenizer, SelfCheckConfig(allow_fallback=True))


def test_cli_refuses_to_serve_a_garbage_kernel(tiny_checkpoint, garbage_backend, caplog, capsys):
    argv = ["serve", "--model", str(tiny_checkpoint), "--device", "cpu", "--kv-cache-gb", "0.02",
            "--port", str(free_port()), "--kernel", garbage_backend]
    with caplog.at_level(logging.ERROR, logger="quantserve.selfcheck"):
        assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"self-check failed ({QUANT_LAYERS} of {QUANT_LAYERS} layers" in err[0]
    assert "refusing to serve" in err[0] and garbage_backend in err[0]
    lines = [r.message for r in caplog.records]
    assert any("model.layers.0.self_attn.qkv_proj" in m and garbage_backend in m and "M=1" in m
               for m in lines)
    assert not any("M=16 (random" in m for m in lines)  # the GEMM-sized path is right


def test_allow_fallback_serves_and_reports_it(tiny_checkpoint, garbage_backend):
    reference = start_server(str(tiny_checkpoint), ENGINE, served_model_name="tiny", kernel="dense")
    srv = start_server(str(tiny_checkpoint), ENGINE, served_model_name="tiny",
                       kernel=garbage_backend, allow_fallback=True)
    try:
        card = httpx.get(srv.url + "/v1/models", timeout=10).json()["data"][0]["quantization"]
        assert card["kernel_backends"] == {"torch": QUANT_LAYERS}
        assert card["self_check"]["status"] == "fallback"
        assert card["self_check"]["fallbacks"] == {garbage_backend: QUANT_LAYERS}
        text = httpx.get(srv.url + "/metrics", timeout=10).text
        assert f'quantserve_kernel_fallback_layers{{backend="{garbage_backend}"}} {QUANT_LAYERS}.0' in text
        assert 'quantserve_self_check_status{state="fallback"} 1.0' in text
        assert httpx.get(srv.url + "/health", timeout=10).json()["fallbacks"] == {garbage_backend: QUANT_LAYERS}
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
        got = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()
        want = httpx.post(reference.url + "/v1/completions", json=body, timeout=60).json()
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
    finally:
        srv.stop()
        reference.stop()


def test_skip_self_check(tiny_checkpoint):
    loaded, _ = build_engine(ModelConfig(model=str(tiny_checkpoint), device="cpu",
                                         self_check=False), ENGINE)
    assert loaded.self_check.status == "skipped"
