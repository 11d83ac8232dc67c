"""Act-order (desc_act) layers on the GPU: rows permuted at load, x gathered by our gather kernel
before the GEMV / GEMM, and chains of them reading the previous output.
"""

import pytest
import torch

from quant import kernels
from quant.backends import cuda as cuda_backend
from quant.format import FORMAT_V2
from tests.kernels.cuda_checks import chain_eager_and_graph, check, cuda_layer, next_seed

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("k,n,bits,group_size,sym", [(4096, 4096, 4, 128, True), (576, 1536, 8, 64, False),
                                                     (1536, 576, 4, 32, False)])
def test_act_order(k, n, bits, group_size, sym):
    layer = cuda_layer(k, n, bits, group_size, sym, FORMAT_V2, desc_act=True, bias=True)
    assert layer.kernel_state.perm is not None and layer.kernel_state.perm32.dtype == torch.int32
    check(layer, (1, 7, 16, 64, 128), torch.float16, ops=("gemv", "gemm"))
    check(layer, (1, 64), torch.bfloat16)


@pytest.mark.parametrize("k,n,bits,group_size,sym", [(576, 1536, 4, 64, False), (1536, 576, 8, 32, True)])
def test_act_order_gemv_every_m(k, n, bits, group_size, sym):
    """Act-order layers through the GEMV at every token-block size (x gathered by our gather kernel
    first) against the float32 reference, output poisoned first."""
    layer = cuda_layer(k, n, bits, group_size, sym, FORMAT_V2, desc_act=True, bias=True)
    for dtype in (torch.float16, torch.bfloat16):
        check(layer, (1, 3, 8, 9, 16, 17, 32), dtype, ops=("gemv",), what="act-order")


@pytest.mark.parametrize("pdl", [True, False])
def test_gather_kernel_matches_index_select(pdl):
    """The act-order gather kernel against index_select: both dtypes, 1-300 rows, K from 8 to
    11008, every output written (NaN-poisoned input rows are not read), eager and graph-replayed;
    and what it refuses."""
    ext = cuda_backend.extension()
    g = torch.Generator(device="cuda").manual_seed(next_seed())
    for dtype in (torch.float16, torch.bfloat16):
        for m, k in ((1, 8), (1, 576), (3, 584), (16, 4096), (64, 11008), (300, 1536)):
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
            perm = torch.randperm(k, device="cuda", generator=g)
            p32 = perm.to(torch.int32)
            assert torch.equal(ext.gather(x, p32, pdl), x.index_select(1, perm)), f"m={m} k={k} {dtype}"
    x = torch.randn(16, 4096, device="cuda", dtype=torch.float16)
    p32 = torch.randperm(4096, device="cuda").to(torch.int32)
    graph, static = torch.cuda.CUDAGraph(), x.clone()
    with torch.cuda.graph(graph):
        y = ext.gather(static, p32, pdl)
    static.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(y, static.index_select(1, p32.long()))
    assert ext.gather(x[:0], p32, pdl).shape == (0, 4096)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ext.gather(torch.randn(2, 12, device="cuda", dtype=torch.float16),
                   torch.arange(12, device="cuda", dtype=torch.int32), pdl)
    with pytest.raises(RuntimeError, match="int32"):
        ext.gather(x, p32.long(), pdl)
    with pytest.raises(RuntimeError, match=r"perm must be \[4096\]"):
        ext.gather(x, p32[:8], pdl)


@pytest.mark.parametrize("pdl", [True, False])
def test_act_order_chain_sees_the_previous_output(pdl, monkeypatch):
    """Act-order layers back to back, each reading the previous output through the gather kernel
    (before the GEMVs at 1 and 5 tokens, the GEMMs at 16 and 64), all with programmatic dependent
    launch on sm_90 or all without; eager and graph-replayed."""
    monkeypatch.setattr(cuda_backend, "_GATHER_PDL", pdl)
    layers = [cuda_layer(4096, 4096, 4, 128, False, FORMAT_V2, desc_act=True),
              cuda_layer(4096, 11008, 4, 64, True, FORMAT_V2, desc_act=True),
              cuda_layer(11008, 4096, 8, 128, False, FORMAT_V2, desc_act=True)]
    # per-layer gains that keep the chain's values near unit size (fp16 range)
    gains = [1.0 / kernels.reference(layer, torch.randn(8, layer.in_features, device="cuda",
                                                        dtype=torch.float16)).pow(2).mean().sqrt().item()
             for layer in layers]
    with cuda_backend.gemm_launch_options(pdl=pdl), cuda_backend.gemv_launch_options(pdl=pdl):
        for m in (1, 5, 16, 64):
            chain_eager_and_graph(layers, torch.randn(m, 4096, device="cuda", dtype=torch.float16), gains=gains)
