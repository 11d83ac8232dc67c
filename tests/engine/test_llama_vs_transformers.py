"""Our Llama model against transformers' LlamaForCausalLM on the same random weights (fp32)."""

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from server.models.attention import CausalAttention, PagedAttention, PagedMetadata
from server.models.config import LlamaConfig
from server.models.llama import LlamaForCausalLM
from tests.conftest import tiny_hf_config


def _pair(**overrides):
    cfg = tiny_hf_config(**overrides)
    torch.manual_seed(0)
    hf = HFLlama(HFLlamaConfig(**cfg)).eval()
    ours = LlamaForCausalLM(LlamaConfig.from_hf(cfg)).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return hf, ours


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": False, "num_key_value_heads": 4},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    {"attention_bias": True},
])
@torch.no_grad()
def test_full_sequence_logits_match(overrides):
    hf, ours = _pair(**overrides)
    ids = torch.randint(0, 49152, (2, 23), generator=torch.Generator().manual_seed(1))
    want = hf(ids).logits
    flat = ids.reshape(-1)
    pos = torch.arange(23).repeat(2)
    got = ours.compute_logits(ours(flat, pos, CausalAttention([23, 23]))).view(2, 23, -1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_paged_cache_decode_matches_full_forward():
    """Prefill in two chunks plus token-by-token decode through the paged cache, two sequences at
    different lengths in the same steps, equals the no-cache logits."""
    hf, ours = _pair()
    cfg = ours.config
    block_size, num_blocks = 4, 32
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    kc = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    vc = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    seqs = [torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(n)) for n in (13, 6)]
    tables = [list(range(0, 8)), list(range(8, 16))]
    want = [hf(s.unsqueeze(0)).logits[0] for s in seqs]

    def step(chunks):  # chunks: list of (seq index, start, end)
        ids, pos, slots, qlens, clens = [], [], [], [], []
        for i, a, b in chunks:
            ids.append(seqs[i][a:b])
            pos.append(torch.arange(a, b))
            slots += [tables[i][p // block_size] * block_size + p % block_size for p in range(a, b)]
            qlens.append(b - a)
            clens.append(b)
        meta = PagedMetadata(
            slot_mapping=torch.tensor(slots), context_lens=torch.tensor(clens, dtype=torch.int32),
            block_tables=torch.tensor([tables[i] for i, _, _ in chunks], dtype=torch.int32),
            query_lens=qlens, context_lens_list=clens)
        hidden = ours(torch.cat(ids), torch.cat(pos), PagedAttention(kc, vc, meta))
        ends = torch.tensor(qlens).cumsum(0) - 1
        return ours.compute_logits(hidden[ends])

    got0 = step([(0, 0, 7), (1, 0, 5)])  # chunked prefill of seq 0, whole prefill of seq 1
    torch.testing.assert_close(got0[0], want[0][6], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got0[1], want[1][4], rtol=1e-4, atol=1e-4)
    got1 = step([(0, 7, 12), (1, 5, 6)])  # second prefill chunk beside a decode
    torch.testing.assert_close(got1[0], want[0][11], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got1[1], want[1][5], rtol=1e-4, atol=1e-4)
    got2 = step([(0, 12, 13)])  # pure decode
    torch.testing.assert_close(got2[0], want[0][12], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_fused_projections_give_the_same_logits():
    """q/k/v and gate/up merged into single matmuls, dense and GPTQ-packed."""
    from server.first_boot import QuantizeSpec, quantize_float_model

    hf, ours = _pair()
    ids = torch.randint(0, 49152, (17,), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(17)
    want = ours.compute_logits(ours(ids, pos, CausalAttention([17])))
    assert ours.fuse_projections() == 4
    got = ours.compute_logits(ours(ids, pos, CausalAttention([17])))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    _, q = _pair()
    quantize_float_model(q, QuantizeSpec(method="rtn", bits=4, group_size=32), progress=False)
    want = q.compute_logits(q(ids, pos, CausalAttention([17])))
    assert q.fuse_projections() == 4
    assert q.model.layers[0].self_attn.qkv_proj.out_features == 64 + 2 * 32
    got = q.compute_logits(q(ids, pos, CausalAttention([17])))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
