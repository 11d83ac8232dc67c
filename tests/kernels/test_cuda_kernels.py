"""The CUDA GEMV / GEMM kernels against the float32 reference, on the GPU.

Fresh random inputs per case, outputs poisoned with NaN before every run, relative error
||y - ref|| / ||ref|| within what fp32 accumulation of 16-bit products allows (fp16 ~1e-3,
bf16 ~1e-2: the dequantised weight itself is rounded to the activation dtype).
"""

import itertools

import pytest
import torch

from quant import kernels
from quant.backends import cuda as cuda_backend
from quant.format import FORMAT_V1, FORMAT_V2
from tests.kernels.layers import eager_then_graph, random_layer

pytestmark = pytest.mark.gpu

M_ALL = (1, 2, 3, 4, 7, 8, 16, 33, 64, 128, 256)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
ZERO_MODES = ((True, FORMAT_V1), (False, FORMAT_V1), (False, FORMAT_V2))
_SEED = itertools.count(1)


def _layer(k, n, bits, group_size, sym=True, fmt=FORMAT_V1, desc_act=False, bias=False):
    layer = random_layer(k, n, bits, group_size, sym, fmt, desc_act, bias, seed=next(_SEED), device="cuda")
    assert layer.prepare("cuda") == "cuda"
    return layer


def _check(layer, ms, dtype, ops=("auto",)):
    g = torch.Generator(device="cuda").manual_seed(next(_SEED))
    for m in ms:
        x = torch.randn(m, layer.in_features, device="cuda", dtype=dtype, generator=g)
        ref = kernels.reference(layer, x)
        for op in ops:
            if op == "gemv" and m > cuda_backend.CudaBackend.gemv_max_m:
                continue
            out = torch.full((m, layer.out_features), float("nan"), device="cuda", dtype=dtype)
            y = cuda_backend.matmul(layer.kernel_state, x, out=out, op=None if op == "auto" else op)
            assert y.data_ptr() == out.data_ptr()
            assert torch.isfinite(y).all(), f"unwritten or non-finite outputs at m={m} op={op}"
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert err < TOL[dtype], (f"m={m} op={op} K={layer.in_features} N={layer.out_features} "
                                      f"bits={layer.bits} g={layer.group_size} {dtype}: rel err {err:.2e}")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym,fmt", ZERO_MODES)
def test_smollm_shape_every_format(bits, group_size, sym, fmt):
    layer = _layer(576, 192, bits, group_size, sym, fmt, bias=group_size == 64)
    for dtype in (torch.float16, torch.bfloat16):
        _check(layer, M_ALL, dtype, ops=("gemv", "gemm") if dtype == torch.float16 else ("auto",))


@pytest.mark.parametrize("k,n", [(576, 576), (576, 1536), (1536, 576), (584, 72), (96, 72)])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, True), (4, 32, False), (8, 64, False)])
def test_smollm_and_odd_shapes(k, n, bits, group_size, sym):
    layer = _layer(k, n, bits, group_size, sym, FORMAT_V2, bias=True)
    for dtype in (torch.float16, torch.bfloat16):
        _check(layer, (1, 3, 8, 16, 33, 64, 256), dtype, ops=("gemv", "gemm"))


@pytest.mark.parametrize("k,n", [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)])
def test_llama_shapes(k, n):
    layer = _layer(k, n, 4, 128, sym=True)
    ms = M_ALL if (k, n) == (4096, 4096) else (1, 4, 16, 33, 128, 256)
    _check(layer, ms, torch.float16)
    _check(layer, (1, 16, 64), torch.bfloat16)


def _gemv_kernel_names(layer, x) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cuda_backend.matmul(layer.kernel_state, x, op="gemv")
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if "gemv" in e.name}


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("k,n,bits,group_size,sym", [(576, 192, 4, 128, True), (4096, 4096, 4, -1, True),
                                                     (11008, 4096, 4, 128, True), (584, 72, 8, 64, False),
                                                     (1536, 576, 8, 128, True), (576, 1536, 4, 128, False),
                                                     (576, 1536, 4, 64, True)])
def test_gemv_with_and_without_the_pipelined_kernel(pipeline, k, n, bits, group_size, sym):
    """Up to 8 tokens both GEMV kernels (gemv_pipe.cuh where it is taken, gemv.cuh otherwise) over
    the token counts, fp16 and bf16; on sm_90 the profiler shows which one ran: the pipelined one
    exactly when the option is on and the layer fits it (4-bit g >= 128, 8-bit g >= 64)."""
    layer = _layer(k, n, bits, group_size, sym, FORMAT_V2)
    with cuda_backend.gemv_launch_options(pipeline=pipeline):
        for dtype in (torch.float16, torch.bfloat16):
            _check(layer, (1, 2, 3, 4, 7, 8), dtype, ops=("gemv",))
        names = _gemv_kernel_names(layer, torch.randn(3, k, device="cuda", dtype=torch.float16))
    takes = pipeline and torch.cuda.get_device_capability()[0] >= 9 and (bits == 8 or group_size in (128, -1))
    assert any("gemv_pipe_kernel" in name for name in names) == takes, names
    assert len(names) == 1, names


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, True), (4, 128, False), (4, 32, False), (8, 64, False)])
def test_gemv_fold_with_one_sided_and_extreme_activations(pipeline, bits, group_size, sym):
    """The GEMV's fragments keep the exponent magic's offset (1024 + q, 64 + q in fp16; 128 + q in
    bf16), which its fp32 fold subtracts again once a group with the zero: activations of one sign
    (sum(x) as large as it gets against the sum the layer computes), very large ones and very small
    ones must still land within the usual tolerance, over a long K of many groups."""
    layer = _layer(11008, 576, bits, group_size, sym, FORMAT_V2)
    g = torch.Generator(device="cuda").manual_seed(next(_SEED))
    with cuda_backend.gemv_launch_options(pipeline=pipeline):
        for dtype in (torch.float16, torch.bfloat16):
            for m in (1, 3, 8):
                for mean, scale in ((4.0, 1.0), (4.0, 32.0), (0.0, 1e-3)):
                    x = ((torch.randn(m, layer.in_features, device="cuda", generator=g) + mean) * scale).to(dtype)
                    ref = kernels.reference(layer, x)
                    out = torch.full((m, layer.out_features), float("nan"), device="cuda", dtype=dtype)
                    y = cuda_backend.matmul(layer.kernel_state, x, out=out, op="gemv")
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    assert torch.isfinite(y).all() and err < TOL[dtype], (
                        f"m={m} bits={bits} g={group_size} sym={sym} {dtype} mean={mean} scale={scale}: rel err {err:.2e}")


@pytest.mark.parametrize("k,n,bits,group_size,sym", [(4096, 4096, 4, 128, True), (576, 1536, 8, 64, False),
                                                     (1536, 576, 4, 32, False)])
def test_act_order(k, n, bits, group_size, sym):
    layer = _layer(k, n, bits, group_size, sym, FORMAT_V2, desc_act=True, bias=True)
    assert layer.kernel_state.perm is not None and layer.kernel_state.perm32.dtype == torch.int32
    _check(layer, (1, 7, 16, 64, 128), torch.float16, ops=("gemv", "gemm"))
    _check(layer, (1, 64), torch.bfloat16)


@pytest.mark.parametrize("k,n,bits,group_size,sym", [(576, 1536, 4, 64, False), (1536, 576, 8, 32, True)])
def test_act_order_gemv_every_m(k, n, bits, group_size, sym):
    """Act-order layers through the GEMV at every token-block size (x gathered by our gather kernel
    first) against the float32 reference, output poisoned first."""
    layer = _layer(k, n, bits, group_size, sym, FORMAT_V2, desc_act=True, bias=True)
    g = torch.Generator(device="cuda").manual_seed(next(_SEED))
    for dtype in (torch.float16, torch.bfloat16):
        for m in (1, 3, 8, 9, 16, 17, 32):
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
            ref = kernels.reference(layer, x)
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            y = cuda_backend.matmul(layer.kernel_state, x, out=out, op="gemv")
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert err < TOL[dtype], f"m={m} {dtype}: rel err {err:.2e}"


def _chain_eager_and_graph(layers, x0, op=None, gains=None):
    """Runs `layers` back to back on x0, each reading the previous output (written into
    NaN-poisoned buffers, then scaled by its gain), eagerly and twice replayed from a CUDA graph,
    and checks every output against gain * layer(previous output): a kernel that read its input
    or touched the shared accumulators before the previous kernel finished shows as NaN or a
    wrong result."""
    m = x0.shape[0]
    gains = gains or [None] * len(layers)
    outs = [torch.empty(m, layer.out_features, device="cuda", dtype=torch.float16) for layer in layers]

    def chain():
        h = x0
        for layer, out, gain in zip(layers, outs, gains):
            h = cuda_backend.matmul(layer.kernel_state, h, out=out, op=op)
            if gain is not None:
                h.mul_(gain)

    def check(how):
        torch.cuda.synchronize()
        h = x0
        for i, (layer, out, gain) in enumerate(zip(layers, outs, gains)):
            assert torch.isfinite(out).all(), f"{how} m={m}: layer {i} left unwritten or read NaN"
            ref = kernels.reference(layer, h) * (1.0 if gain is None else gain)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < TOL[torch.float16], f"{how} m={m}: layer {i} is not layer(previous): {err:.2e}"
            h = out

    for out in outs:
        out.fill_(float("nan"))
    chain()
    check("eager")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    for _ in range(2):
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        check("graph")


@pytest.mark.parametrize("pdl", [True, False])
def test_gather_kernel_matches_index_select(pdl):
    """The act-order gather kernel against index_select: both dtypes, 1-300 rows, K from 8 to
    11008, every output written (NaN-poisoned input rows are not read), eager and graph-replayed;
    and what it refuses."""
    ext = cuda_backend.extension()
    g = torch.Generator(device="cuda").manual_seed(next(_SEED))
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
    layers = [_layer(4096, 4096, 4, 128, False, FORMAT_V2, desc_act=True),
              _layer(4096, 11008, 4, 64, True, FORMAT_V2, desc_act=True),
              _layer(11008, 4096, 8, 128, False, FORMAT_V2, desc_act=True)]
    # per-layer gains that keep the chain's values near unit size (fp16 range)
    gains = [1.0 / kernels.reference(layer, torch.randn(8, layer.in_features, device="cuda",
                                                        dtype=torch.float16)).pow(2).mean().sqrt().item()
             for layer in layers]
    with cuda_backend.gemm_launch_options(pdl=pdl), cuda_backend.gemv_launch_options(pdl=pdl):
        for m in (1, 5, 16, 64):
            _chain_eager_and_graph(layers, torch.randn(m, 4096, device="cuda", dtype=torch.float16), gains=gains)


@pytest.mark.parametrize("wgmma", [True, False])
@pytest.mark.parametrize("k,n,bits,group_size,sym", [(576, 192, 4, 128, True), (584, 72, 8, 64, False),
                                                     (4096, 4096, 4, 32, False), (11008, 1024, 4, -1, True),
                                                     (1536, 576, 8, 128, True), (4128, 1280, 4, 32, True),
                                                     (2112, 640, 8, 64, False), (1040, 704, 4, 16, False),
                                                     (1040, 8256, 4, 32, False)])
def test_gemm_kernels_over_token_counts(wgmma, k, n, bits, group_size, sym):
    """Both GEMM kernels over every tile size of the Hopper wgmma kernel (16/32/64/128/256-token
    tiles, partly filled, and 256-token slices above), split and whole tiles, partial strips, both
    dtypes. K = 4128 / 2112 end inside a stage, after stages that take the wgmma kernel's unbounded
    copies (whole tiles of 1280 / 640 columns), with groups shorter than a stage; 16-k groups
    (1040 x 704), which the 4-bit wgmma kernel takes in 128-token slices; a layer wider than 8192
    columns (65-128 tokens: two strips per warpgroup, 128-k stages). On an sm_90 GPU
    the sm_90a code must be the one loaded, so wgmma=True really runs wgmma."""
    if wgmma and torch.cuda.get_device_capability() == (9, 0):
        assert cuda_backend.wgmma_available(), "H100/H200 without the sm_90a wgmma kernel"
    layer = _layer(k, n, bits, group_size, sym=sym, bias=bits == 8)
    with cuda_backend.gemm_launch_options(wgmma):
        # with the wgmma kernel off, up to gemv_max_m tokens take the GEMV, as off Hopper
        want = "gemm" if wgmma and cuda_backend.wgmma_available() else "gemv"
        assert cuda_backend.pick_op(16, cuda_backend.wgmma_available) == want
        for dtype in (torch.float16, torch.bfloat16):
            _check(layer, (5, 16, 17, 32, 33, 48, 64, 65, 100, 128, 130, 256, 257, 513), dtype, ops=("gemm",))


@pytest.mark.parametrize("k,n,bits", [(4096, 4096, 4), (4096, 11008, 8), (2112, 8256, 4), (11008, 4160, 4)])
def test_wgmma_split_tiles_leave_the_workspace_zero(k, n, bits):
    """Every call whose tiles are split between blocks must leave the split-K accumulators and the
    tiles' counters zero, since the next call (of any layer) adds into them. Token counts over
    every tile size, with partly filled token quads (odd m); layers whose tiles split in two, and
    in many; also each call's result against the reference (_check)."""
    if not cuda_backend.wgmma_available():
        pytest.skip("needs the sm_90a wgmma kernel")
    layer = _layer(k, n, bits, 128, sym=False)
    ws = cuda_backend.workspace(torch.device("cuda"))
    for m in (13, 16, 31, 57, 64, 97, 128, 131, 255):
        _check(layer, (m,), torch.float16, ops=("gemm",))
        assert int(ws.accum_counters.abs().sum()) == 0, f"m={m}: tile counters left non-zero"
        assert float(ws.accum.abs().max()) == 0.0, f"m={m}: split-K accumulator left non-zero"


@pytest.mark.parametrize("pdl", [True, False])
def test_chained_gemms_see_the_previous_output(pdl):
    """Back-to-back GEMM calls on one stream, each reading the previous call's output (written into
    NaN-poisoned buffers) and sharing the split-K accumulators, eagerly and in a CUDA graph. With
    programmatic dependent launch a kernel copies its weights before the previous one has
    finished but must not read x or touch the accumulators until it has: a misplaced wait shows as
    NaN or a result that is not layer(previous output)."""
    layers = [_layer(4096, 4096, 4, 128, sym=False), _layer(4096, 11008, 4, 128),
              _layer(11008, 4096, 4, 32, sym=False), _layer(4096, 4096, 8, 64)]
    with cuda_backend.gemm_launch_options(pdl=pdl):
        for m in (24, 64, 100):
            x0 = torch.randn(m, 4096, device="cuda", dtype=torch.float16) * 0.01  # ~5x growth per layer
            _chain_eager_and_graph(layers, x0, op="gemm")


def test_dispatch_graph_capture_and_repeatability():
    layer = _layer(4096, 4096, 4, 128, sym=False)
    model = torch.nn.Sequential(layer)
    assert kernels.backend_counts(model) == {"cuda": 1}
    for m in (1, 16, 32, 64, 200):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        y1 = layer(x)
        y2 = layer(x)
        assert torch.allclose(y1.float(), y2.float(), rtol=1e-3, atol=1e-4), "results move between runs"
        graph = torch.cuda.CUDAGraph()
        static_x = x.clone()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        static_x.copy_(torch.randn_like(x))
        graph.replay()
        ref = kernels.reference(layer, static_x)
        assert ((static_y.float() - ref).norm() / ref.norm()).item() < TOL[torch.float16]
    # float32 input takes the dense path and is still right
    x = torch.randn(3, 4096, device="cuda")
    assert torch.allclose(layer(x), kernels.reference(layer, x), rtol=1e-3, atol=1e-3)


def test_unsupported_group_size_falls_back_to_dense():
    layer = random_layer(576, 192, 4, 96, seed=5, device="cuda")
    assert "group_size=96" in cuda_backend.CudaBackend().unsupported_reason(layer)
    assert layer.prepare() == "dense"


def test_prepared_layer_keeps_its_weights_once_on_the_gpu():
    """The CUDA layout is a full copy: the GPTQ buffers go to host memory, the layer still
    computes on the GPU, its reference/dequantize run there, and re-preparing on a backend that
    reads the buffers brings them back."""
    layer = _layer(4096, 1024, 4, 128, sym=False, fmt=FORMAT_V2, desc_act=True)
    assert layer.qweight.device.type == "cpu" and layer.device.type == "cuda"
    assert layer.dequantize().device.type == "cuda"
    _check(layer, (1, 64), torch.float16)
    x = torch.randn(5, 4096, device="cuda", dtype=torch.float16)
    want = kernels.reference(layer, x)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = layer(x)
    assert torch.cuda.memory_allocated() - before <= y.numel() * y.element_size() + (1 << 20)
    assert layer.prepare("torch") == "torch"
    assert layer.qweight.device.type == "cuda" and layer.compute_device is None
    torch.testing.assert_close(layer(x).float(), want, rtol=2e-3, atol=2e-3)
    with pytest.raises(kernels.KernelError, match="input on cpu"):
        layer(x.cpu())


BAD_INPUTS = """
import torch
from quant.backends import cuda as cb
from tests.kernels.layers import eager_then_graph, random_layer
layer = random_layer(576, 192, 4, 128, device="cuda")
assert layer.prepare("cuda") == "cuda"
ext, st = cb.extension(), layer.kernel_state
scales, zeros, bias = st.constants[torch.float16]
ws = cb.workspace(torch.device("cuda"))
bufs = (ws.partials, ws.counters, ws.accum, ws.accum_counters)
x = torch.randn(40, 576, device="cuda", dtype=torch.float16)
calls = [
    lambda: ext.gemv(x, st.qweight, scales, zeros, bias, *bufs, 192, 4, st.group_shift, 8, None),
    lambda: ext.gemm(x[:, :560].contiguous(), st.qweight, scales, zeros, bias, *bufs, 192, 4, st.group_shift, 8),
    lambda: ext.gemm(x.float(), st.qweight, scales, zeros, bias, *bufs, 192, 4, st.group_shift, 8),
    lambda: ext.gemv(x[:9], st.qweight, scales, zeros, None, *bufs, 192, 4, st.group_shift, 8, sums=ws.sums.data),
    lambda: ext.gemv(x[:2], st.qweight, scales, zeros, None, *bufs, 192, 4, st.group_shift, 8,
                     sums=ws.sums.data[:100]),
]
for call in calls:
    try:
        call()
        print("NO ERROR")
    except RuntimeError as exc:
        print(str(exc).splitlines()[0])
"""


def test_bad_inputs_report_numbers():
    """In a subprocess: a crash on the C++ error path must fail this test, not the whole run."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", BAD_INPUTS], capture_output=True, text=True, cwd=root,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"error path crashed (rc={proc.returncode}):\n{out[-2000:]}"
    assert "m <= 32 rows, got m=40" in out
    assert "qweight has shape [3, 36, 32, 4], expected [3, 35, 32, 4]" in out
    assert "x must be float16 or bfloat16, got Float" in out
    assert "sums: gemv of m <= 8 rows only, got m=9" in out
    assert "sums holds 100 floats, m * n = 384" in out
    assert "NO ERROR" not in out


def _unit_gain_layer(k, n, bits, group_size, sym=True, bias=False):
    """A random layer whose scales are shrunk so that y = x @ W keeps x's magnitude (a chain of
    them neither overflows fp16 nor vanishes)."""
    layer = random_layer(k, n, bits, group_size, sym, FORMAT_V2, False, bias, seed=next(_SEED), device="cuda")
    w = layer.dequantize(torch.float32)
    with torch.no_grad():
        layer.scales.mul_(1.0 / (k ** 0.5 * w.pow(2).mean().sqrt().item()))
        if bias:
            layer.bias.mul_(0.1)
    assert layer.prepare("cuda") == "cuda"
    return layer


@pytest.mark.parametrize("pdl,wave_div", [(True, 1), (True, 2), (False, 1), (False, 2)])
def test_gemv_chain_under_launch_options(pdl, wave_div):
    """Each GEMV reads the output of the one before it, back to back (no other kernel between them),
    and all share the split-K accumulators: with programmatic dependent launch a kernel that
    touched its inputs or the accumulators before its wait would read stale values; eager and
    graph-replayed runs both checked."""
    ext = cuda_backend.extension()
    chain = [_unit_gain_layer(4096, 4096, 4, 128, sym=False), _unit_gain_layer(4096, 11008, 4, 64),
             _unit_gain_layer(11008, 4096, 4, 128, bias=True), _unit_gain_layer(4096, 192, 8, 32, sym=False),
             _unit_gain_layer(192, 4096, 4, 32)]
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
