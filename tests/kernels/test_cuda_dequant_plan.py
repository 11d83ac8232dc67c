"""dequant_matmul's chunking without a GPU: strip ranges, the padded rows and columns of the scratch
sliced off, bias per chunk, and each chunk landing in its columns of y. The CUDA kernel is replaced
by a stand-in that copies strips out of the layout's reference decode, with NaN in every padding
element, so any padding that reached the product would show. (The kernel itself is compared with
the reference on the GPU in test_cuda_dequant.py.)"""

import pytest
import torch

from quant.backends import cuda as cuda_backend
from quant.backends import cuda_layout
from quant.format import FORMAT_V2
from quant.sums import SumsBuffer
from tests.kernels.layers import random_layer


class _StandIn:
    """The extension's `dequant`: rows [64 * s0, 64 * s0 + out.shape[0]) of the padded W^T."""

    def __init__(self, full: torch.Tensor):
        self.full = full
        self.calls = []

    def dequant(self, qweight, scales, zeros, out, strip_begin, bits, group_shift, zero_point):
        self.calls.append((strip_begin, out.shape[0] // 64))
        out.copy_(self.full[64 * strip_begin:64 * strip_begin + out.shape[0]])
        return out


def _padded_wt(st, dtype):
    scales, zeros, _ = st.constants[dtype]
    w = cuda_layout.unpack_reference(st, scales, zeros)  # [K, N] float32, layout row order
    n_strips, k_steps = st.qweight.shape[:2]
    full = torch.full((64 * n_strips, 16 * k_steps), float("nan"))
    full[:st.n, :st.k] = w.t()
    return full.to(dtype), w


@pytest.mark.parametrize("k,n,bits,group_size,desc_act,bias", [(584, 200, 4, 64, False, True),
                                                               (576, 192, 8, 32, True, False),
                                                               (1536, 72, 4, -1, False, True)])
def test_chunks_cover_every_column_once_and_skip_the_padding(monkeypatch, k, n, bits, group_size, desc_act, bias):
    layer = random_layer(k, n, bits, group_size, False, FORMAT_V2, desc_act, bias, seed=k + n)
    st = cuda_layout.build(layer, dtypes=(torch.bfloat16,))
    dtype = torch.bfloat16
    full, w = _padded_wt(st, dtype)
    ext = _StandIn(full)
    n_strips, k_steps = st.qweight.shape[:2]
    strip = 64 * 16 * k_steps * 2
    ws = cuda_backend.Workspace(*(torch.empty(0) for _ in range(4)), torch.empty(n_strips * strip, dtype=torch.uint8),
                                SumsBuffer(torch.empty(0)))
    monkeypatch.setattr(cuda_backend, "extension", lambda: ext)
    monkeypatch.setattr(cuda_backend, "workspace", lambda *a, **kw: ws)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, k, generator=g).to(dtype)  # already in the layout's row order
    want = x.float() @ w.to(dtype).float()
    if bias:
        want += st.constants[dtype][2].float()
    for chunk_bytes, chunks in ((strip, n_strips), (2 * strip + 1, -(-n_strips // 2)), (None, 1)):
        ext.calls.clear()
        out = torch.full((5, n), float("nan"), dtype=dtype)
        y = cuda_backend.dequant_matmul(st, x, out=out, chunk_bytes=chunk_bytes)
        assert y.data_ptr() == out.data_ptr()
        assert len(ext.calls) == chunks and sum(c for _, c in ext.calls) == n_strips
        assert [s for s, _ in ext.calls] == sorted({s for s, _ in ext.calls})  # each strip range once, in order
        assert torch.isfinite(y).all(), f"chunk_bytes={chunk_bytes}: a column was left unwritten or read padding"
        torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
