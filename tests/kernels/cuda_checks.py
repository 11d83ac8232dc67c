"""Shared helpers of the CUDA kernel tests (test_cuda_kernels / _gemv / _gemm / _act_order): random
layers prepared for the CUDA backend, the check of a call against the float32 reference, and a chain
of layers each reading the previous output.

The check: fresh random inputs per case, outputs poisoned with NaN before every run, relative error
||y - ref|| / ||ref|| within what fp32 accumulation of 16-bit products allows (fp16 ~1e-3, bf16
~1e-2: the dequantised weight itself is rounded to the activation dtype).
"""

import itertools

import torch

from quant import kernels
from quant.backends import cuda as cuda_backend
from quant.format import FORMAT_V1, FORMAT_V2
from tests.kernels.layers import random_layer

M_ALL = (1, 2, 3, 4, 7, 8, 16, 33, 64, 128, 256)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
ZERO_MODES = ((True, FORMAT_V1), (False, FORMAT_V1), (False, FORMAT_V2))
_SEED = itertools.count(1)


def next_seed() -> int:
    """A seed no other case of the session has used."""
    return next(_SEED)


def cuda_layer(k, n, bits, group_size, sym=True, fmt=FORMAT_V1, desc_act=False, bias=False):
    """A random GPTQ layer prepared for the CUDA backend (its own seed)."""
    layer = random_layer(k, n, bits, group_size, sym, fmt, desc_act, bias, seed=next_seed(), device="cuda")
    assert layer.prepare("cuda") == "cuda"
    return layer


def check(layer, ms, dtype, ops=("auto",), make_x=None, what=""):
    """Each m of ms through each op ("auto", "gemv", "gemm"; gemv only up to its m) against the float32
    reference, in dtype, into a NaN-poisoned output. make_x(m, generator) -> x [m, in_features] of
    dtype draws the activations (default: standard normal); `what` names the case in a failure."""
    g = torch.Generator(device="cuda").manual_seed(next_seed())
    for m in ms:
        if make_x is None:
            x = torch.randn(m, layer.in_features, device="cuda", dtype=dtype, generator=g)
        else:
            x = make_x(m, g)
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
                                      f"bits={layer.bits} g={layer.group_size} {dtype} {what}: rel err {err:.2e}")


def chain_eager_and_graph(layers, x0, op=None, gains=None):
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


def unit_gain_layer(k, n, bits, group_size, sym=True, bias=False):
    """A random layer whose scales are shrunk so that y = x @ W keeps x's magnitude (a chain of
    them neither overflows fp16 nor vanishes)."""
    layer = random_layer(k, n, bits, group_size, sym, FORMAT_V2, False, bias, seed=next_seed(), device="cuda")
    w = layer.dequantize(torch.float32)
    with torch.no_grad():
        layer.scales.mul_(1.0 / (k ** 0.5 * w.pow(2).mean().sqrt().item()))
        if bias:
            layer.bias.mul_(0.1)
    assert layer.prepare("cuda") == "cuda"
    return layer
