"""The real default model (SmolLM2-135M-Instruct, GPTQ 4-bit g64 on first boot)."""

import openai
import pytest

from tests.live_server import start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(cache_root):
    srv = start_server("default", cache_dir=cache_root)
    yield srv
    srv.stop()


def test_capital_of_france_is_paris(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0]
    assert model.id == "SmolLM2-135M-Instruct"
    reply = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert "Paris" in reply.choices[0].message.content


def test_second_boot_uses_the_cache(cache_root, live):
    from server.first_boot import DEFAULT_MODEL_NAME, QuantizeSpec, quantized_cache_path

    cached = [quantized_cache_path(cache_root, DEFAULT_MODEL_NAME, QuantizeSpec())]  # today's default
    assert (cached[0] / "quantize_config.json").exists()
    assert live.state.loaded.path == cached[0]
    # every decoder linear is quantised (30 layers x 7 projections in the checkpoint), and served
    # fused: q/k/v and gate/up as single matmuls, so 30 x 4 packed layers, plus the lm_head that
    # the CPU path packs to 8 bits
    from quant.checkpoint import open_checkpoint

    assert len(open_checkpoint(cached[0]).quantized_modules()) == 210
    assert sum(live.state.loaded.backends.values()) == 120 + 1
    assert live.state.loaded.model.lm_head.bits == 8
