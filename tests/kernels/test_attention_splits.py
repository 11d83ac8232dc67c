"""How the decode attention splits a sequence's context (server.models.triton_attention.decode_splits):
a function of the shapes only, enough stage-1 programs to fill the GPU, never more splits than the
engine's max length allows. No GPU needed: the SM count is set by hand."""

import torch

from server.models import triton_attention as ta


def test_splits_fill_the_gpu_within_the_cap(monkeypatch):
    monkeypatch.setitem(ta._SMS, 0, 132)  # an H100
    dev = torch.device("cuda", 0)
    want = ta.PROGRAMS_PER_SM * 132
    # batch 1 of a 7B (32 kv heads) at a 4096-token max length: every partition a split
    assert ta.decode_splits(1, 32, 16, dev) == 16
    # a short max length caps the splits: one split, so no combine step
    assert ta.decode_splits(1, 32, 1, dev) == 1
    # larger batches need fewer splits to fill the GPU, and none once the sequences do
    assert ta.decode_splits(16, 32, 16, dev) == 2
    assert ta.decode_splits(64, 32, 16, dev) == 1
    assert ta.decode_splits(256, 32, 16, dev) == 1
    for batch in range(1, 300):
        for kv in (1, 3, 8, 32):
            n = ta.decode_splits(batch, kv, 32, dev)
            assert 1 <= n <= 32
            assert batch * kv * n >= want or n == 32  # fills the GPU unless capped
            assert n == 1 or batch * kv * (n - 1) < want  # and no more splits than that takes
