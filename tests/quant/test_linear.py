"""QuantLinear against the dequantised float reference, for every backend on the CPU."""

import pytest
import torch

from quant import kernels
from quant.format import FORMAT_V1, FORMAT_V2, QuantConfig
from quant.linear import QuantLinear
from quant.rtn import quantize_rtn


def _layer(k, n, bits, group_size, sym, fmt, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, checkpoint_format=fmt)
    result = quantize_rtn(w, bits, group_size, sym)
    return w, QuantLinear.from_result(result, cfg, bias=b), result, b


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym,fmt", [(True, FORMAT_V1), (False, FORMAT_V2), (False, FORMAT_V1)])
def test_dequantize_matches_codes(bits, group_size, sym, fmt):
    _, layer, result, _ = _layer(576 if bits != 3 else 576, 192, bits, group_size, sym, fmt, False)
    expected = result.dequantize().t()  # [N, K]
    scales16 = result.scales.half().float()
    assert torch.allclose(scales16, result.scales)
    assert torch.equal(layer.dequantize(), expected)


@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 64, True), (4, 128, False), (8, -1, True),
                                                 (3, 32, True), (2, 64, False)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_dequantized_matmul(backend, bits, group_size, sym, bias):
    fmt = FORMAT_V1 if sym else FORMAT_V2
    _, layer, _, b = _layer(576, 192, bits, group_size, sym, fmt, bias, seed=bits)
    assert layer.prepare(backend) == backend
    x = torch.randn(7, 576, dtype=torch.float32)
    w = layer.dequantize().double()
    want = x.double() @ w.t() + (b.half().double() if bias else 0)
    got = layer(x).double()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    # batched leading dims are kept
    assert layer(x.view(7, 1, 576)).shape == (7, 1, 192)


def test_rtn_error_is_small_and_shrinks_with_bits():
    errs = []
    for bits in (2, 3, 4, 8):
        w, layer, _, _ = _layer(256, 64, bits, 64, True, FORMAT_V1, False)
        errs.append(((layer.dequantize() - w).norm() / w.norm()).item())
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 0.01 and errs[2] < 0.15


def test_v1_v2_conversion_keeps_the_weight():
    _, layer, _, _ = _layer(128, 64, 4, 32, False, FORMAT_V2, False)
    before = layer.dequantize()
    layer.convert_format(FORMAT_V1)
    assert layer.checkpoint_format == FORMAT_V1
    assert torch.equal(layer.dequantize(), before)


def test_dispatch_records_backend_and_checks_inputs():
    _, layer, _, _ = _layer(64, 32, 4, 32, True, FORMAT_V1, False)
    model = torch.nn.Sequential(layer)
    assert kernels.backend_counts(model) == {"unprepared": 1}
    counts = kernels.prepare_model(model)
    assert counts == {kernels.available("cpu")[0]: 1}
    with pytest.raises(kernels.KernelError, match="expects K=64"):
        layer(torch.randn(2, 63))
    with pytest.raises(kernels.KernelError, match="unknown kernel backend"):
        layer.prepare("nope")
