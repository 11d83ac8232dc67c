"""The engine on a tiny fp32 model: batched greedy output equals one-at-a-time output, token for
token, through chunked prefill and preemption; seeds reproduce; abort frees blocks."""

import pytest
import torch

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.kv_cache import KVCacheSpec
from server.engine.sequence import FinishReason, SamplingParams
from server.models.config import LlamaConfig
from server.models.llama import LlamaForCausalLM
from tests.conftest import tiny_hf_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig.from_hf(tiny_hf_config())).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight.normal_(0, 0.5)
    return m


def engine_with(model, num_blocks=None, **kw) -> LLMEngine:
    cfg = model.config
    gb = None
    if num_blocks is not None:
        per = KVCacheSpec(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                          kw.get("block_size", 16), torch.float32).bytes_per_block()
        gb = num_blocks * per / 1024**3
    return LLMEngine(model, EngineConfig(kv_cache_gb=gb if gb else 0.01, **kw), eos_token_ids=[])


def prompts(n=16):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(5, 49000, (int(torch.randint(3, 70, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_batched_greedy_equals_one_at_a_time(model):
    ps = prompts()
    params = SamplingParams(max_tokens=12, temperature=0)
    solo = [engine_with(model).generate([p], params)[0] for p in ps]
    batched = engine_with(model, max_num_batched_tokens=64).generate(ps, params)
    assert batched == solo


def test_preemption_keeps_outputs_identical(model):
    ps = prompts(8)
    params = SamplingParams(max_tokens=20, temperature=0)
    solo = [engine_with(model).generate([p], params)[0] for p in ps]
    eng = engine_with(model, num_blocks=24, block_size=8, max_num_batched_tokens=48)
    assert eng.generate(ps, params) == solo
    assert eng.scheduler.num_preemptions > 0
    assert eng.allocator.num_free == eng.allocator.num_blocks


def test_same_seed_same_sample_different_seed_differs(model):
    p = prompts(1)[0]
    a = engine_with(model).generate([p], SamplingParams(max_tokens=16, temperature=3.0, seed=11))
    b = engine_with(model).generate([p] * 3, SamplingParams(max_tokens=16, temperature=3.0, seed=11))
    c = engine_with(model).generate([p], SamplingParams(max_tokens=16, temperature=3.0, seed=12))
    assert b == a * 3  # batch-independent
    assert c != a


def test_abort_mid_generation_frees_blocks_within_a_step(model):
    eng = engine_with(model)
    eng.add_request("x", prompts(1)[0], SamplingParams(max_tokens=100, temperature=0))
    eng.add_request("y", prompts(2)[1], SamplingParams(max_tokens=5, temperature=0))
    for _ in range(3):
        eng.step()
    assert eng.abort_request("x")
    used_by_y = len(eng.requests["y"].block_table)
    assert eng.allocator.num_used == used_by_y
    outs = []
    while eng.has_unfinished():
        o, _ = eng.step()
        outs += o
    assert outs[-1].finished and outs[-1].finish_reason == FinishReason.LENGTH
    assert eng.allocator.num_free == eng.allocator.num_blocks


def test_prompt_too_long_is_refused_with_both_numbers(model):
    eng = engine_with(model, max_model_len=32)
    with pytest.raises(ValueError, match="maximum context length is 32 tokens.*30 prompt tokens"):
        eng.add_request("big", list(range(30)), SamplingParams(max_tokens=8))


def test_logprobs_match_log_softmax_of_full_forward(model):
    from server.models.attention import CausalAttention

    p = prompts(1)[0]
    eng = engine_with(model)
    seq = eng.add_request("lp", p, SamplingParams(max_tokens=1, temperature=0, logprobs=3))
    while eng.has_unfinished():
        eng.step()
    with torch.no_grad():
        hidden = model(torch.tensor(p), torch.arange(len(p)), CausalAttention([len(p)]))
        want = torch.log_softmax(model.compute_logits(hidden[-1:]), -1)[0]
    rec = seq.output_logprobs[0]
    assert rec.token_id == int(want.argmax())
    assert abs(rec.logprob - float(want.max())) < 1e-4
    assert [t for t, _ in rec.top] == want.topk(3).indices.tolist()
