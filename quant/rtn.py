"""Round-to-nearest quantisation: the baseline, in the same format as GPTQ, with no Hessian."""

from __future__ import annotations

import torch

from quant.format import effective_group_size, num_groups
from quant.quantizer import QuantResult, group_params, quantize_codes


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantResult:
    """weight float [N, K] (nn.Linear orientation) -> QuantResult (GPTQ orientation).

    Groups are contiguous runs of `group_size` input channels; the last group may be partial.
    """
    out_features, in_features = weight.shape
    gs = effective_group_size(in_features, group_size)
    groups = num_groups(in_features, group_size)
    w = weight.float()
    codes = torch.empty(out_features, in_features, dtype=torch.int32, device=w.device)
    scales = torch.empty(groups, out_features, dtype=torch.float32, device=w.device)
    zeros = torch.empty(groups, out_features, dtype=torch.int32, device=w.device)
    for g in range(groups):
        cols = slice(g * gs, min((g + 1) * gs, in_features))
        params = group_params(w[:, cols], bits, sym)
        codes[:, cols] = quantize_codes(w[:, cols], params, bits).to(torch.int32)
        scales[g] = params.scale
        zeros[g] = params.zero.to(torch.int32)
    g_idx = (torch.arange(in_features, device=w.device) // gs).to(torch.int32)
    return QuantResult(codes=codes.t().contiguous(), zeros=zeros, scales=scales, g_idx=g_idx, bits=bits)
