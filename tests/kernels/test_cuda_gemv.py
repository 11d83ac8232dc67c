"""The GEMV kernels (csrc/gemv.cuh, gemv_pipe.cuh) on the GPU: with and without the pipelined kernel,
the fp32 fold of the magic offset under hard activations, and chains of GEMVs under every launch
option.
"""

import pytest
import torch

from quant import kernels
from quant.backends import cuda as cuda_backend
from quant.format import FORMAT_V2
from tests.kernels.cuda_checks import TOL, check, cuda_layer, unit_gain_layer
from tests.kernels.layers import eager_then_graph

pytestmark = pytest.mark.gpu


def _kernel_names(layer, x, op="gemv") -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cuda_backend.matmul(layer.kernel_state, x, op=op)
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if "gemv" in e.name or "gemm" in e.name}


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("k,n,bits,group_size,sym", [(576, 192, 4, 128, True), (4096, 4096, 4, -1, True),
                                                     (11008, 4096, 4, 128, True), (584, 72, 8, 64, False),
                                                     (1536, 576, 8, 128, True), (576, 1536, 4, 128, False),
                                                     (576, 1536, 4, 64, True)])
def test_gemv_with_and_without_the_pipelined_kernel(pipeline, k, n, bits, group_size, sym):
    """Up to 16 tokens both GEMV kernels (gemv_pipe.cuh where it is taken, gemv.cuh otherwise) over
    the token counts (one and two 8-token blocks, partly filled), fp16 and bf16; on sm_90 the
    profiler shows which one ran: the pipelined one exactly when the option is on and the layer fits
    it (4-bit g >= 128, 8-bit g >= 64; above 8 tokens symmetric only), and pipe_takes says the same."""
    layer = cuda_layer(k, n, bits, group_size, sym, FORMAT_V2)
    with cuda_backend.gemv_launch_options(pipeline=pipeline):
        for dtype in (torch.float16, torch.bfloat16):
            check(layer, (1, 2, 3, 4, 7, 8, 9, 12, 13, 16), dtype, ops=("gemv",))
        takes = pipeline and torch.cuda.get_device_capability()[0] >= 9 and (bits == 8 or group_size in (128, -1))
        for m in (3, 12):
            names = _kernel_names(layer, torch.randn(m, k, device="cuda", dtype=torch.float16))
            want = takes and (m <= 8 or sym)  # two token blocks: symmetric layers only
            assert any("gemv_pipe_kernel" in name for name in names) == want, (m, names)
            assert len(names) == 1, names
            assert cuda_backend.pipe_takes(layer.kernel_state, m) == want
        assert not cuda_backend.pipe_takes(layer.kernel_state, cuda_backend.PIPE_MAX_M + 1)


@pytest.mark.parametrize("k,n,bits,group_size,sym", [(4096, 4096, 4, 128, True), (584, 72, 8, 64, True),
                                                     (576, 1536, 4, 64, True), (4096, 4096, 4, 128, False)])
def test_9_to_16_tokens_take_the_pipelined_gemv_where_it_fits(k, n, bits, group_size, sym):
    """The default op at 9-16 tokens on Hopper: the pipelined GEMV for layers it takes (one pass over
    the weights for both 8-token blocks; symmetric layers only) up to PIPE_Y_MAX_M tokens when the
    call writes y and up to PIPE_MAX_M when it leaves its sums, the wgmma GEMM for the others; 17
    tokens and up the wgmma GEMM. Off Hopper (no wgmma) the GEMV takes them all."""
    layer = cuda_layer(k, n, bits, group_size, sym, FORMAT_V2)
    fits = torch.cuda.get_device_capability()[0] >= 9 and (bits == 8 or group_size in (128, -1)) and sym
    wgmma = cuda_backend.wgmma_available()
    for m in (9, cuda_backend.PIPE_Y_MAX_M, cuda_backend.PIPE_Y_MAX_M + 1, 16, 17):
        pipe = fits and m <= cuda_backend.PIPE_Y_MAX_M
        want = "gemv" if pipe or not wgmma else "gemm"
        names = _kernel_names(layer, torch.randn(m, k, device="cuda", dtype=torch.float16), op=None)
        assert len(names) == 1 and want in next(iter(names)), (m, names)
        assert ("gemv_pipe_kernel" in next(iter(names))) == pipe, (m, names)
        check(layer, (m,), torch.float16)
        leaves = "gemv" if m <= cuda_backend.SUMS_MAX_M and (fits or not wgmma) else (
            "gemm" if wgmma and cuda_backend.GEMM_SUMS else None)  # the wgmma GEMM leaves them too
        assert cuda_backend.sums_op(m, layer.kernel_state, torch.device("cuda")) == leaves, m


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, True), (4, 128, False), (4, 32, False), (8, 64, False)])
def test_gemv_fold_with_one_sided_and_extreme_activations(pipeline, bits, group_size, sym):
    """The GEMV's fragments keep the exponent magic's offset (1024 + q, 64 + q in fp16; 128 + q in
    bf16), which its fp32 fold subtracts again once a group with the zero: activations of one sign
    (sum(x) as large as it gets against the sum the layer computes), very large ones and very small
    ones must still land within the usual tolerance, over a long K of many groups."""
    layer = cuda_layer(11008, 576, bits, group_size, sym, FORMAT_V2)
    with cuda_backend.gemv_launch_options(pipeline=pipeline):
        for dtype in (torch.float16, torch.bfloat16):
            for mean, scale in ((4.0, 1.0), (4.0, 32.0), (0.0, 1e-3)):

                def make_x(m, g, mean=mean, scale=scale, dtype=dtype):
                    return ((torch.randn(m, layer.in_features, device="cuda", generator=g) + mean) * scale).to(dtype)

                check(layer, (1, 3, 8), dtype, ops=("gemv",), make_x=make_x,
                      what=f"sym={sym} pipeline={pipeline} mean={mean} scale={scale}")


@pytest.mark.parametrize("pdl,wave_div", [(True, 1), (True, 2), (False, 1), (False, 2)])
def test_gemv_chain_under_launch_options(pdl, wave_div):
    """Each GEMV reads the output of the one before it, back to back (no other kernel between them),
    and all share the split-K accumulators: with programmatic dependent launch a kernel that
    touched its inputs or the accumulators before its wait would read stale values; eager and
    graph-replayed runs both checked."""
    ext = cuda_backend.extension()
    chain = [unit_gain_layer(4096, 4096, 4, 128, sym=False), unit_gain_layer(4096, 11008, 4, 64),
             unit_gain_layer(11008, 4096, 4, 128, bias=True), unit_gain_layer(4096, 192, 8, 32, sym=False),
             unit_gain_layer(192, 4096, 4, 32)]
    with cuda_backend.gemv_launch_options(pdl, wave_div):
        assert ext.gemv_get_options() == (pdl, wave_div, True)
        for m in (1, 5, 16, 32):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)

            def run(h):
                outs = []
                for layer in chain:
                    h = cuda_backend.matmul(layer.kernel_state, h, op="gemv")
                    outs.append(h)
                return outs

            def check(xin, outs):
                h = xin
                for layer, y in zip(chain, outs):
                    ref = kernels.reference(layer, h)
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    assert err < TOL[torch.float16], (f"m={m} K={layer.in_features} N={layer.out_features}: rel "
                                                      f"err {err:.2e}, max |y| {y.float().abs().max().item():.3g}, "
                                                      f"max |ref| {ref.abs().max().item():.3g}")
                    h = y

            eager_then_graph(run, check, x, lambda: torch.randn_like(x))
