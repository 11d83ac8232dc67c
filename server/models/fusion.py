"""Concatenating linear layers that read the same input (q/k/v, gate/up) into one along N."""

from __future__ import annotations

import torch
from torch import nn

from quant.linear import QuantLinear


def concat_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One module computing torch.cat([l(x) for l in layers], -1), or None when they differ in
    kind, precision, bias presence or (for GPTQ) group layout (act-order perms must be equal)."""
    first = layers[0]
    if all(isinstance(m, QuantLinear) for m in layers):
        keys = {(m.in_features, m.bits, m.group_size, m.checkpoint_format, m.sym,
                 m.bias is not None) for m in layers}
        if len(keys) != 1 or any(not torch.equal(m.g_idx, first.g_idx) for m in layers[1:]):
            return None
        out = QuantLinear(first.in_features, sum(m.out_features for m in layers), first.bits,
                          first.group_size, bias=first.bias is not None,
                          checkpoint_format=first.checkpoint_format, sym=first.sym,
                          desc_act=first.desc_act).to(first.qweight.device)
        with torch.no_grad():
            out.qweight.copy_(torch.cat([m.qweight for m in layers], dim=1))
            out.qzeros.copy_(torch.cat([m.qzeros for m in layers], dim=1))
            out.scales.copy_(torch.cat([m.scales for m in layers], dim=1))
            out.g_idx.copy_(first.g_idx)
            if first.bias is not None:
                out.bias.copy_(torch.cat([m.bias for m in layers]))
        return out
    if all(type(m) is nn.Linear for m in layers):
        if len({(m.in_features, m.weight.dtype, m.bias is not None) for m in layers}) != 1:
            return None
        out = nn.Linear(first.in_features, sum(m.out_features for m in layers),
                        bias=first.bias is not None, device=first.weight.device,
                        dtype=first.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(torch.cat([m.weight for m in layers], dim=0))
            if first.bias is not None:
                out.bias.copy_(torch.cat([m.bias for m in layers]))
        return out
    return None
