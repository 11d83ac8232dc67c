"""The CUDA weight layout on the CPU: repacked codes decode (element by element, from the fragment
convention) to the layer's dequantised weight, for every bit width, group size and zero convention."""

import pytest
import torch

from quant.backends import cuda_layout
from quant.backends.cuda_layout import LayoutError
from quant.format import FORMAT_V1, FORMAT_V2
from tests.kernels.layers import random_layer

CASES = [
    # k, n, bits, group_size, sym, fmt, desc_act
    (576, 192, 4, 128, True, FORMAT_V1, False),   # SmolLM2 shape, partial last group (576 = 4.5 * 128)
    (576, 192, 4, 32, False, FORMAT_V2, False),
    (96, 72, 4, -1, False, FORMAT_V1, False),     # n not a multiple of 64, k not a multiple of 16*8
    (584, 64, 4, 64, True, FORMAT_V1, False),      # k not a multiple of 16
    (256, 128, 8, 64, False, FORMAT_V2, False),
    (128, 64, 8, -1, True, FORMAT_V1, False),
    (256, 64, 2, 32, False, FORMAT_V1, False),
    (256, 96, 3, 64, True, FORMAT_V1, False),
    (512, 128, 4, 128, True, FORMAT_V1, True),     # act-order
    (256, 64, 8, 32, False, FORMAT_V2, True),
]


@pytest.mark.parametrize("k,n,bits,group_size,sym,fmt,desc_act", CASES)
def test_layout_decodes_to_the_dequantised_weight(k, n, bits, group_size, sym, fmt, desc_act):
    layer = random_layer(k, n, bits, group_size, sym, fmt, desc_act, seed=k + n + bits)
    layout = cuda_layout.build(layer, dtypes=(torch.float32,))
    assert layout.bits == (8 if bits == 8 else 4)
    assert (layout.perm is not None) == desc_act
    assert layout.qweight.shape == (-(-n // 64), -(-k // 16), 32, 4 if layout.bits == 4 else 8)
    scales, zeros, _ = layout.constants[torch.float32]
    assert (zeros is None) == sym
    got = cuda_layout.unpack_reference(layout, scales, zeros)  # [K, N], rows in kernel order
    want = layer.dequantize(torch.float32).t()  # [K, N], original row order
    if layout.perm is not None:
        want = want[layout.perm]
    assert torch.equal(got, want)


def test_group_shift_and_refusals():
    assert cuda_layout.group_shift(4096, 128) == 3
    assert cuda_layout.group_shift(4096, 32) == 1
    assert cuda_layout.group_shift(4096, -1) == cuda_layout.SINGLE_GROUP_SHIFT
    assert cuda_layout.group_shift(64, 128) == cuda_layout.SINGLE_GROUP_SHIFT  # one group
    with pytest.raises(LayoutError, match="group_size=96"):
        cuda_layout.group_shift(4096, 96)
    g_idx = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1], dtype=torch.int32)  # groups of 3 and 5 rows
    with pytest.raises(LayoutError, match="group_size=4"):
        cuda_layout.act_order_perm(g_idx, 8, 4)


def test_act_order_perm_sorts_groups_stably():
    g_idx = torch.tensor([1, 0, 1, 0, 2, 2], dtype=torch.int32)
    perm = cuda_layout.act_order_perm(g_idx, 6, 2)
    assert perm.tolist() == [1, 3, 0, 2, 4, 5]
    assert cuda_layout.act_order_perm(torch.tensor([0, 0, 1, 1], dtype=torch.int32), 4, 2) is None


def test_cuda_backend_refuses_cpu_layers_and_registers_for_cuda():
    from quant import kernels

    assert "cuda" in kernels.available("cuda")
    assert kernels.available("cuda").index("cuda") < kernels.available("cuda").index("dense")
    assert "cuda" not in kernels.available("cpu")
    layer = random_layer(64, 64, 4, 32)
    with pytest.raises(kernels.KernelError, match="cuda"):
        layer.prepare("cuda")
