"""Random GPTQ layers for kernel tests: any bits, group size, zero convention, act-order and bias."""

from __future__ import annotations

import torch

from quant.format import FORMAT_V1, QuantConfig, effective_group_size, max_code, num_groups, sym_zero
from quant.linear import QuantLinear
from quant.pack import pack_qweight, pack_qzeros


def random_layer(k: int, n: int, bits: int, group_size: int, sym: bool = True, fmt: str = FORMAT_V1,
                 desc_act: bool = False, bias: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu") -> QuantLinear:
    """Uniform random codes (0 and 2^b-1 included), random zeros (asym, 0 included) and scales;
    act-order layers get g_idx = invperm // group_size for a random permutation."""
    g = torch.Generator().manual_seed(seed)
    groups = num_groups(k, group_size)
    codes = torch.randint(0, max_code(bits) + 1, (k, n), generator=g, dtype=torch.int32)
    codes[0, :] = max_code(bits)
    codes[-1, :] = 0
    if sym:
        zeros = torch.full((groups, n), sym_zero(bits), dtype=torch.int32)
    else:
        zeros = torch.randint(0, max_code(bits) + 1, (groups, n), generator=g, dtype=torch.int32)
        zeros[0, 0] = 0
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.002) / (1 << (bits - 4)) if bits > 4 else \
        torch.rand(groups, n, generator=g) * 0.02 + 0.002
    gs = effective_group_size(k, group_size)
    if desc_act:
        perm = torch.randperm(k, generator=g)
        invperm = torch.argsort(perm)
        g_idx = (invperm // gs).to(torch.int32)
    else:
        g_idx = (torch.arange(k) // gs).to(torch.int32)
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, checkpoint_format=fmt)
    b = torch.randn(n, generator=g) if bias else None
    layer = QuantLinear.from_config(k, n, cfg, bias=bias).to(device)
    codes, zeros = codes.to(device), zeros.to(device)  # pack where the layer lives (fast on a GPU)
    layer.qweight.copy_(pack_qweight(codes, bits))
    layer.qzeros.copy_(pack_qzeros(zeros, bits, fmt))
    layer.scales.copy_(scales.half())
    layer.g_idx.copy_(g_idx)
    if bias:
        layer.bias.copy_(b.half())
    return layer


def eager_then_graph(run, check, x: torch.Tensor, fresh, replays: int = 3) -> None:
    """check(x, run(x)) eagerly; then capture run on a static copy of x in a CUDA graph and, `replays`
    times, refill that copy with fresh() and check what the replay wrote into the captured outputs."""
    check(x, run(x))
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run(static_x)
    for _ in range(replays):
        static_x.copy_(fresh())
        graph.replay()
        check(static_x, outs)
