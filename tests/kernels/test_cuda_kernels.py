"""The CUDA kernels on the GPU, through the dispatch: every format and the SmolLM2 / Llama-2 shapes
against the float32 reference, graph capture, the dense fallback, weights kept once, and the C++
error path. (The GEMV, GEMM and act-order specifics: test_cuda_gemv / _gemm / _act_order; the
shared checks: cuda_checks.)
"""

import pytest
import torch

from quant import kernels
from quant.backends import cuda as cuda_backend
from quant.format import FORMAT_V2
from tests.kernels.cuda_checks import M_ALL, TOL, ZERO_MODES, check, cuda_layer
from tests.kernels.layers import random_layer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym,fmt", ZERO_MODES)
def test_smollm_shape_every_format(bits, group_size, sym, fmt):
    layer = cuda_layer(576, 192, bits, group_size, sym, fmt, bias=group_size == 64)
    for dtype in (torch.float16, torch.bfloat16):
        check(layer, M_ALL, dtype, ops=("gemv", "gemm") if dtype == torch.float16 else ("auto",))


@pytest.mark.parametrize("k,n", [(576, 576), (576, 1536), (1536, 576), (584, 72), (96, 72)])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, True), (4, 32, False), (8, 64, False)])
def test_smollm_and_odd_shapes(k, n, bits, group_size, sym):
    layer = cuda_layer(k, n, bits, group_size, sym, FORMAT_V2, bias=True)
    for dtype in (torch.float16, torch.bfloat16):
        check(layer, (1, 3, 8, 16, 33, 64, 256), dtype, ops=("gemv", "gemm"))


@pytest.mark.parametrize("k,n", [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)])
def test_llama_shapes(k, n):
    layer = cuda_layer(k, n, 4, 128, sym=True)
    ms = M_ALL if (k, n) == (4096, 4096) else (1, 4, 16, 33, 128, 256)
    check(layer, ms, torch.float16)
    check(layer, (1, 16, 64), torch.bfloat16)


def test_dispatch_graph_capture_and_repeatability():
    layer = cuda_layer(4096, 4096, 4, 128, sym=False)
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
    layer = cuda_layer(4096, 1024, 4, 128, sym=False, fmt=FORMAT_V2, desc_act=True)
    assert layer.qweight.device.type == "cpu" and layer.device.type == "cuda"
    assert layer.dequantize().device.type == "cuda"
    check(layer, (1, 64), torch.float16)
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
    lambda: ext.gemv(x[:17], st.qweight, scales, zeros, None, *bufs, 192, 4, st.group_shift, 8, sums=ws.sums.data),
    lambda: ext.gemv(x[:2], st.qweight, scales, zeros, None, *bufs, 192, 4, st.group_shift, 8,
                     sums=ws.sums.data[:100]),
    lambda: ext.gemm(x, st.qweight, scales, zeros, bias, ws.partials, ws.counters, ws.accum[:100],
                     ws.accum_counters, 192, 4, st.group_shift, 8),
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
    assert "sums: gemv of m <= 16 rows only, got m=17" in out
    assert "sums holds 100 floats, m * n = 384" in out
    assert "accum holds 100 floats" in out  # the GEMM too: no silent fallback to the mma.sync kernel
    assert "NO ERROR" not in out
