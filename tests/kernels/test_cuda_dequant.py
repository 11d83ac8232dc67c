"""The dequantise + cuBLAS path of large-M calls (csrc/dequant.cuh, cuda_backend.dequant_matmul), on
the GPU: the widened weights bit for bit against the reference dequantisation, the products against
the float32 reference over chunkings that split layers at every kind of boundary, act-order, bias,
both dtypes, and CUDA-graph capture."""

import itertools

import pytest
import torch

from quant import kernels
from quant.backends import cuda as cuda_backend
from quant.format import FORMAT_V1, FORMAT_V2
from tests.kernels.layers import random_layer

pytestmark = pytest.mark.gpu

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
_SEED = itertools.count(1000)


def _layer(k, n, bits, group_size, sym=True, fmt=FORMAT_V1, desc_act=False, bias=False):
    layer = random_layer(k, n, bits, group_size, sym, fmt, desc_act, bias, seed=next(_SEED), device="cuda")
    assert layer.prepare("cuda") == "cuda"
    return layer


def _widen(layer, dtype, strip_begin=0, strips=None):
    """ext.dequant over strips [strip_begin, strip_begin + strips) into a NaN-poisoned buffer."""
    st = layer.kernel_state
    n_strips, k_steps = st.qweight.shape[:2]
    strips = n_strips - strip_begin if strips is None else strips
    scales, zeros, _ = st.constants[dtype]
    out = torch.full((64 * strips, 16 * k_steps), float("nan"), device="cuda", dtype=dtype)
    cuda_backend.extension().dequant(st.qweight, scales, zeros, out, strip_begin, st.bits, st.group_shift,
                                     st.zero_point)
    return out


def _reference_wt(layer, dtype):
    """W^T [N, K] in the layout's row order (act-order: columns permuted as the kernels read them)."""
    w = layer.dequantize(torch.float32)  # [N, K]
    perm = layer.kernel_state.perm
    return (w if perm is None else w[:, perm]).to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,sym,fmt,desc_act", [(32, False, FORMAT_V2, False), (64, True, FORMAT_V1, True),
                                                         (128, False, FORMAT_V1, True), (-1, True, FORMAT_V1, False)])
@pytest.mark.parametrize("k,n", [(576, 192), (608, 96), (1536, 4160)])
def test_widened_weights_are_exact(bits, group_size, sym, fmt, desc_act, k, n):
    """fp16: (code - zero) * scale rounds once, in the kernel as in the reference, so the widened
    weights match bit for bit; bf16 scales are rounded to bf16 first, so within 2^-7 relative.
    Every element of the padded tile is written (no NaN left), also from a middle strip."""
    layer = _layer(k, n, bits, group_size, sym, fmt, desc_act)
    for dtype in (torch.float16, torch.bfloat16):
        got = _widen(layer, dtype)
        assert not torch.isnan(got).any(), "part of the padded tile was not written"
        ref = _reference_wt(layer, dtype)
        if dtype == torch.float16:
            assert torch.equal(got[:n, :k], ref), f"max diff {(got[:n, :k].float() - ref.float()).abs().max()}"
        else:
            torch.testing.assert_close(got[:n, :k].float(), ref.float(), rtol=2 ** -7, atol=0)
    strips = layer.kernel_state.qweight.shape[0]
    if strips > 2:
        mid = _widen(layer, torch.float16, 1, strips - 2)
        assert torch.equal(mid, _widen(layer, torch.float16)[64:64 * (strips - 1)])


@pytest.mark.parametrize("k,n,bits,group_size,sym,desc_act,bias", [
    (576, 192, 4, 128, True, False, False), (584, 72, 8, 64, False, False, True),
    (4096, 4160, 4, 128, False, True, True), (11008, 1024, 4, -1, True, False, False),
    (1536, 576, 3, 32, False, True, False)])
def test_dequant_matmul_over_chunkings(k, n, bits, group_size, sym, desc_act, bias):
    """One chunk, a chunk of one strip, and chunks that leave a short last chunk; the output is
    poisoned first, so every column must come from some chunk."""
    layer = _layer(k, n, bits, group_size, sym, FORMAT_V2, desc_act, bias)
    st = layer.kernel_state
    strip = 64 * 16 * st.qweight.shape[1] * 2
    g = torch.Generator(device="cuda").manual_seed(next(_SEED))
    for dtype in (torch.float16, torch.bfloat16):
        for m, chunk in ((256, None), (300, strip), (513, 3 * strip), (40, 2 * strip + 1)):
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
            ref = kernels.reference(layer, x)
            xk = x if st.perm is None else x.index_select(1, st.perm)
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            y = cuda_backend.dequant_matmul(st, xk, out=out, chunk_bytes=chunk)
            assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all()
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert err < TOL[dtype], f"m={m} chunk={chunk} {dtype}: rel err {err:.2e}"


def test_large_calls_take_the_dequant_path_and_capture_in_a_graph(monkeypatch):
    """From DEQUANT_MIN_M tokens the layer's forward runs dequant + cuBLAS, eagerly and replayed
    from a graph; one token fewer runs the GEMM kernels."""
    layer = _layer(4096, 4096, 4, 128, sym=False, bias=True)
    calls = []
    real = cuda_backend.dequant_matmul
    monkeypatch.setattr(cuda_backend, "dequant_matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    m = cuda_backend.DEQUANT_MIN_M + 7
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    ref = kernels.reference(layer, x)
    y = layer(x)
    assert calls == [1]
    assert ((y.float() - ref).norm() / ref.norm()).item() < TOL[torch.float16]
    static_x = torch.zeros_like(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    static_x.copy_(x)
    graph.replay()
    torch.testing.assert_close(static_y, y, rtol=2e-3, atol=2e-3)  # cuBLAS may pick another kernel in capture
    layer(x[:cuda_backend.DEQUANT_MIN_M - 1])
    assert len(calls) == 2, "a call below DEQUANT_MIN_M took the dequant path"


def test_scratch_is_sized_at_prepare_time():
    """prepare() grows the device's scratch to the layer (capped at DEQUANT_SCRATCH_BYTES), so a
    graph captured later never allocates; a layer bigger than the cap runs in several chunks."""
    big = _layer(4096, 22016, 4, 128)
    ws = cuda_backend.workspace(torch.device("cuda"))
    assert ws.scratch.numel() >= cuda_backend.scratch_bytes(*big.kernel_state.qweight.shape[:2])
    assert cuda_backend.scratch_bytes(344, 256) == cuda_backend.DEQUANT_SCRATCH_BYTES < 344 * 64 * 4096 * 2
    assert cuda_backend.scratch_bytes(3, 36) == 3 * 64 * 576 * 2
    assert cuda_backend.scratch_bytes(1, 1 << 20) == 64 * 16 * 2 * (1 << 20)  # never below one strip
    x = torch.randn(cuda_backend.DEQUANT_MIN_M, 4096, device="cuda", dtype=torch.float16)
    ref = kernels.reference(big, x)
    y = big(x)
    assert ((y.float() - ref).norm() / ref.norm()).item() < TOL[torch.float16]


def test_dequant_bad_inputs():
    layer = _layer(576, 192, 4, 128)
    st = layer.kernel_state
    ext = cuda_backend.extension()
    scales, zeros, _ = st.constants[torch.float16]
    good = torch.empty(64, 576, device="cuda", dtype=torch.float16)
    cases = [
        (torch.empty(64, 560, device="cuda", dtype=torch.float16), 0, "out must have 576 columns"),
        (torch.empty(60, 576, device="cuda", dtype=torch.float16), 0, "positive multiple of 64, got 60"),
        (good, 3, "strips [3, 4) are outside the layer's 3"),
        (good.float(), 0, "out must be float16 or bfloat16"),
        (good.to(torch.bfloat16), 0, "scales dtype Half differs from out dtype BFloat16"),
    ]
    for out, s0, msg in cases:
        with pytest.raises(RuntimeError, match=msg.replace("[", r"\[").replace(")", r"\)")):
            ext.dequant(st.qweight, scales, zeros, out, s0, st.bits, st.group_shift, st.zero_point)
