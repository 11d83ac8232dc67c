"""server.models.cpu_ops (C++ decode-step ops) against the torch paths they replace on the CPU.

rotary_ must be bit-identical to the torch formula; rms_norm within float32 summation-order
noise of F.rms_norm; paged decode attention within float32 noise of decode_reference (gather +
SDPA), with the k/v it stores bit-identical to index_copy_. A whole decode of a tiny model with
the ops on and off gives the same greedy tokens and near-identical logits.
"""

from __future__ import annotations

import pytest
import torch

from server.models import cpu_ops
from server.models.attention import PagedAttention, PagedMetadata, decode_reference
from server.models.fused import rms_norm_torch, rotary_torch

pytestmark = pytest.mark.skipif(cpu_ops._module() is None, reason="the cpu_int4 extension cannot be built here")

_GEN = torch.Generator().manual_seed(7)


@pytest.fixture
def ops_off(monkeypatch):
    def off():
        monkeypatch.setattr(cpu_ops, "ENABLED", False)
    return off


@pytest.mark.parametrize("t,nq,nk,d", [(1, 9, 3, 64), (5, 8, 8, 128), (3, 4, 2, 32), (2, 6, 2, 80)])
def test_rotary_bit_identical_in_place_on_qkv_views(t, nq, nk, d):
    qkv = torch.randn(t, (nq + 2 * nk) * d, generator=_GEN)
    q = qkv[:, :nq * d].view(t, nq, d)
    k = qkv[:, nq * d:(nq + nk) * d].view(t, nk, d)
    ang = torch.rand(t, 1, d // 2, generator=_GEN) * 100
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    want_q, want_k = rotary_torch(q.clone(), k.clone(), cos, sin)
    v_before = qkv[:, (nq + nk) * d:].clone()
    got = cpu_ops.rotary_(q, k, cos, sin)
    assert got is not None and got[0] is q and got[1] is k
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(qkv[:, (nq + nk) * d:], v_before)  # v untouched


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("t,h", [(1, 576), (7, 576), (3, 100), (2, 4096)])
def test_rms_norm_matches_torch(t, h, residual):
    x = torch.randn(t, 2 * h, generator=_GEN)[:, :h] * 3  # strided rows
    r = torch.randn(t, h, generator=_GEN) if residual else None
    w = torch.randn(h, generator=_GEN)
    want, want_res = rms_norm_torch(x, w, 1e-5, r)
    x0 = x.clone()
    got, got_res = cpu_ops.rms_norm(x, w, 1e-5, r)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    if residual:
        assert torch.equal(got_res, want_res)  # one rounded add: exact
    else:
        assert got_res is None
    assert torch.equal(x, x0)


def test_not_applicable_returns_none():
    x = torch.randn(2, 8)
    assert cpu_ops.rms_norm(x.bfloat16(), torch.ones(8, dtype=torch.bfloat16), 1e-5) is None
    w = torch.nn.Parameter(torch.ones(8))  # requires grad, as a model's weights do
    assert cpu_ops.rms_norm(x, w, 1e-5) is None  # autograd must see the torch ops
    with torch.no_grad():
        assert cpu_ops.rms_norm(x, w, 1e-5) is not None
    with torch.inference_mode():
        assert cpu_ops.rms_norm(x, w, 1e-5) is not None
    q, k = torch.randn(1, 2, 8), torch.randn(1, 1, 8)
    cos = torch.ones(1, 1, 8)
    assert cpu_ops.rotary_(q.double(), k.double(), cos.double(), cos.double()) is None


def _paged(b, ctxs, nh, nkv, hd, block_size=16, num_blocks=40):
    """Random caches, shuffled block tables, and one decode token per sequence."""
    kc = torch.randn(num_blocks, block_size, nkv, hd, generator=_GEN)
    vc = torch.randn(num_blocks, block_size, nkv, hd, generator=_GEN)
    width = max(-(-c // block_size) for c in ctxs) + 1  # padded tables, as the engine builds them
    order = torch.randperm(num_blocks, generator=_GEN).tolist()
    tables, slots = torch.zeros(b, width, dtype=torch.int32), []
    for i, c in enumerate(ctxs):
        used = [order.pop() for _ in range(-(-c // block_size))]
        tables[i, :len(used)] = torch.tensor(used, dtype=torch.int32)
        slots.append(used[(c - 1) // block_size] * block_size + (c - 1) % block_size)
    meta = PagedMetadata(slot_mapping=torch.tensor(slots), block_tables=tables,
                         context_lens=torch.tensor(ctxs, dtype=torch.int32), query_lens=[1] * b,
                         context_lens_list=list(ctxs))
    qkv = torch.randn(b, (nh + 2 * nkv) * hd, generator=_GEN)
    q = qkv[:, :nh * hd].view(b, nh, hd)
    k = qkv[:, nh * hd:(nh + nkv) * hd].view(b, nkv, hd)
    v = qkv[:, (nh + nkv) * hd:].view(b, nkv, hd)
    return kc, vc, meta, q, k, v


@pytest.mark.parametrize("b,ctxs,nh,nkv,hd", [
    (1, [81], 9, 3, 64), (1, [1], 9, 3, 64), (1, [16], 4, 4, 32), (3, [5, 40, 17], 8, 2, 64),
    (2, [300, 129], 16, 4, 128), (4, [33, 1, 64, 90], 6, 6, 48)])
def test_decode_attention_matches_reference(b, ctxs, nh, nkv, hd, monkeypatch):
    kc, vc, meta, q, k, v = _paged(b, ctxs, nh, nkv, hd)
    kc2, vc2 = kc.clone(), vc.clone()
    attn = PagedAttention([kc], [vc], meta)
    assert attn.cpu_plan is not None
    got = attn(0, q, k, v)
    monkeypatch.setattr(cpu_ops, "ENABLED", False)
    ref = PagedAttention([kc2], [vc2], meta)
    assert ref.cpu_plan is None
    want = ref(0, q, k, v)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # the stored k/v are the same
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    direct = decode_reference(q, kc, vc, meta.block_tables, meta.context_lens)
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-5)


def test_decode_plan_rejects_out_of_range_metadata():
    kc, vc, meta, q, k, v = _paged(1, [20], 4, 2, 32, num_blocks=4)
    meta.slot_mapping = torch.tensor([4 * 16])  # one past the cache
    with pytest.raises(IndexError):
        PagedAttention([kc], [vc], meta)


def test_mixed_and_bf16_steps_keep_the_torch_path():
    kc, vc, meta, q, k, v = _paged(1, [20], 4, 2, 32)
    prefill = PagedMetadata(slot_mapping=torch.arange(3), block_tables=meta.block_tables,
                            context_lens=torch.tensor([3], dtype=torch.int32), query_lens=[3],
                            context_lens_list=[3])
    assert PagedAttention([kc], [vc], prefill).cpu_plan is None
    assert PagedAttention([kc.bfloat16()], [vc.bfloat16()], meta).cpu_plan is None


def test_tiny_model_decode_same_with_ops_on_and_off(monkeypatch):
    from server.models.config import LlamaConfig
    from server.models.llama import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 96,
                               "intermediate_size": 192, "num_hidden_layers": 3,
                               "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 300,
                               "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
                               "tie_word_embeddings": True})
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.fuse_projections()

    def run():
        blocks, bs = 8, 16
        shape = (blocks, bs, cfg.num_key_value_heads, cfg.head_dim)
        kcs = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
        vcs = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
        ids, logits_all, n = list(range(5, 25)), [], 20
        table = torch.arange(blocks, dtype=torch.int32)[None]
        with torch.inference_mode():
            for step in range(12):
                new = torch.tensor(ids[-n:]) if step == 0 else torch.tensor(ids[-1:])
                start = len(ids) - new.shape[0]
                pos = torch.arange(start, len(ids))
                meta = PagedMetadata(slot_mapping=pos, block_tables=table,
                                     context_lens=torch.tensor([len(ids)], dtype=torch.int32),
                                     query_lens=[new.shape[0]], context_lens_list=[len(ids)])
                hidden = model(new, pos, PagedAttention(kcs, vcs, meta))
                logits = model.compute_logits(hidden[-1:])
                logits_all.append(logits)
                ids.append(int(logits.argmax()))
        return ids, torch.cat(logits_all)

    calls = {"rms_norm": 0, "rotary_": 0}
    for name in calls:
        real = getattr(cpu_ops, name)

        def counted(*a, _real=real, _name=name, **kw):
            out = _real(*a, **kw)
            calls[_name] += out is not None
            return out
        monkeypatch.setattr(cpu_ops, name, counted)
    ids_on, logits_on = run()
    assert calls["rms_norm"] == 12 * (2 * cfg.num_hidden_layers + 1)  # every norm took the C++ path
    assert calls["rotary_"] == 12 * cfg.num_hidden_layers
    monkeypatch.setattr(cpu_ops, "ENABLED", False)
    ids_off, logits_off = run()
    assert ids_on == ids_off
    torch.testing.assert_close(logits_on, logits_off, rtol=1e-4, atol=1e-4)


def test_attention_skips_the_cache_write_a_kernel_before_it_did(monkeypatch):
    """kv_slots: only the Triton path hands out its cache slots (qkv_reader.qkv_rotary stores k and v
    there); a layer whose KVSlots say stored does not write them again, any other layer does."""
    from server.models.qkv_reader import KVSlots

    monkeypatch.setattr(cpu_ops, "ENABLED", False)
    kc, vc, meta, q, k, v = _paged(2, [5, 9], 4, 2, 32)
    attn = PagedAttention([kc, kc.clone()], [vc, vc.clone()], meta)
    assert attn.kv_slots(0) is None  # the torch path writes its own
    before = kc.clone()
    attn._kv_slots[0] = KVSlots(kc, vc, meta.slot_mapping, stored=True)
    attn(0, q, k, v)
    assert torch.equal(kc, before)
    attn._kv_slots[1] = KVSlots(attn.k_caches[1], attn.v_caches[1], meta.slot_mapping)  # not stored
    attn(1, q, k, v)
    assert torch.equal(attn.k_caches[1].view(-1, 2, 32)[meta.slot_mapping], k)
    assert not attn._kv_slots
