"""The Triton paged decode attention and KV-cache write (server.models.triton_attention) against
torch: on a GPU, and on the CPU through Triton's interpreter (TRITON_INTERPRET=1, run by
test_triton_interpreter), which checks their logic (block tables, splits, the combine step), not
their speed or bfloat16."""

import pytest
import torch

from server.models.attention import decode_reference
from server.models.triton_attention import max_partitions, paged_decode_attention, write_kv
from tests.kernels.triton_devices import DEVICES, triton_or_skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 32, 128), (2, 2, 64), (9, 3, 64), (64, 8, 128),
                                                       (4, 1, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_decode_attention_matches_reference(heads, kv_heads, head_dim, dtype, device):
    triton_or_skip(device, dtype)
    if device == "cpu" and kv_heads == 32:
        pytest.skip("a minute in the interpreter; the GPU runs this shape")
    g = torch.Generator(device=device).manual_seed(heads * head_dim)
    block = 16
    ctxs = [1, 15, 16, 17, 255, 256, 257, 1000]
    width = max(-(-c // block) for c in ctxs)
    num_blocks = len(ctxs) * width + 3
    kc = torch.randn(num_blocks, block, kv_heads, head_dim, device=device, generator=g).to(dtype)
    vc = torch.randn(num_blocks, block, kv_heads, head_dim, device=device, generator=g).to(dtype)
    tables = torch.randperm(num_blocks - 3, device=device, generator=g)[: len(ctxs) * width]
    tables = tables.view(len(ctxs), width).to(torch.int32)
    q = torch.randn(len(ctxs), heads, head_dim, device=device, generator=g).to(dtype)
    ctx = torch.tensor(ctxs, dtype=torch.int32, device=device)
    want = decode_reference(q.double(), kc.double(), vc.double(), tables, ctx)
    # the split count the batch gets, one split (no combine step), some, the cap
    for splits in (None, 1, 3, max_partitions(2048)):
        out = torch.full_like(q, float("nan"))
        got = paged_decode_attention(q, kc, vc, tables, ctx, max_partitions(2048), out=out, splits=splits)
        err = (got.double() - want).norm() / want.norm()
        assert torch.isfinite(got).all() and err < (2e-3 if dtype == torch.float16 else 1e-2), (splits, err)


@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_fills_exactly_the_slots(device):
    triton_or_skip(device, torch.float16)
    g = torch.Generator(device=device).manual_seed(2)
    t, nkv, d = 5, 4, 64
    qkv = torch.randn(t, 3 * nkv * d, device=device, generator=g).half()
    _, k, v = (x.view(t, nkv, d) for x in qkv.split([nkv * d] * 3, dim=-1))  # strided rows, as in a step
    kc = torch.zeros(8, 16, nkv, d, device=device, dtype=torch.float16)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([3, 17, 40, 41, 127], device=device)
    write_kv(k, v, kc, vc, slots)
    want_k, want_v = torch.zeros_like(kc).view(-1, nkv, d), torch.zeros_like(vc).view(-1, nkv, d)
    want_k[slots], want_v[slots] = k, v
    assert torch.equal(kc.view(-1, nkv, d), want_k) and torch.equal(vc.view(-1, nkv, d), want_v)
