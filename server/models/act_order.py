"""Load-time: an act-order down_proj's input permutation moves into the gate/up projections.

An act-order (desc_act) GPTQ layer stores its rows in input-channel order with a scattered g_idx;
the kernels sort the rows by group and gather x[:, perm] before every call (quant/backends/
cuda_layout.py, csrc/gather.cu). For down_proj that gather is avoidable: its input is
silu(gate(x)) * up(x), elementwise in the intermediate channels, so permuting the output columns
of gate and up by P permutes the intermediate activation by P, and permuting down_proj's rows by
the same P leaves the MLP's output unchanged. With P the stable argsort of down_proj's g_idx, the
permuted g_idx is k // group_size: down_proj becomes a plain layer (no gather per call), while
gate/up keep their own input order (their act-order, if any, is untouched).

o_proj cannot take the same treatment: its input is the attention output, whose channels are tied
to heads (and, with grouped-query attention, to shared value heads).
"""

from __future__ import annotations

import torch
from torch import nn

from quant.groups import GroupOrderError, group_sort_perm
from quant.linear import QuantLinear
from quant.pack import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros


def grouping_perm(layer: QuantLinear) -> torch.Tensor | None:
    """The row permutation (int64 [K]) that makes an act-order layer's g_idx k // group_size, or None
    when g_idx already is (or when no permutation makes it so: groups that are not runs of
    group_size rows, which no kernel here takes without act-order handling). The backends' own
    rule, quant.groups.group_sort_perm."""
    try:
        return group_sort_perm(layer.g_idx, layer.in_features, layer.group_size)
    except GroupOrderError:
        return None


def permute_rows(layer: QuantLinear, perm: torch.Tensor) -> None:
    """Reorder a QuantLinear's input channels in place: new row r is old row perm[r] (codes and
    g_idx; scales and zeros are per group, which g_idx names)."""
    codes = unpack_qweight(layer.qweight, layer.bits, layer.in_features)
    with torch.no_grad():
        layer.qweight.copy_(pack_qweight(codes.index_select(0, perm.to(codes.device)), layer.bits))
        layer.g_idx.copy_(layer.g_idx.index_select(0, perm.to(layer.g_idx.device)))


def permute_columns(layer: nn.Module, cols: torch.Tensor) -> bool:
    """Reorder the output channels of a QuantLinear or nn.Linear in place (new column c is old
    column cols[c]); False (nothing changed) for other modules."""
    with torch.no_grad():
        if isinstance(layer, QuantLinear):
            c = cols.to(layer.qweight.device)
            zeros = unpack_qzeros(layer.qzeros, layer.bits, layer.out_features, layer.checkpoint_format)
            layer.qweight.copy_(layer.qweight.index_select(1, c))
            layer.scales.copy_(layer.scales.index_select(1, c))
            layer.qzeros.copy_(pack_qzeros(zeros.index_select(1, c), layer.bits, layer.checkpoint_format))
        elif type(layer) is nn.Linear:
            c = cols.to(layer.weight.device)
            layer.weight.copy_(layer.weight.index_select(0, c))
        else:
            return False
        if layer.bias is not None:
            layer.bias.copy_(layer.bias.index_select(0, c))
    return True


def absorb_down_perm(mlp: nn.Module) -> bool:
    """Move an act-order down_proj's permutation into gate/up (fused or not) of one Llama MLP
    (`gate_up_proj` or `gate_proj` + `up_proj`, then `down_proj`); True when it did."""
    down = mlp.down_proj
    if not isinstance(down, QuantLinear) or down.kernel_state is not None:
        return False  # dense, or already prepared for a backend (its repacked copy would go stale)
    perm = grouping_perm(down)
    if perm is None:
        return False
    fused = getattr(mlp, "gate_up_proj", None)
    producers = [fused] if fused is not None else [mlp.gate_proj, mlp.up_proj]
    if any(isinstance(m, QuantLinear) and m.kernel_state is not None for m in producers):
        return False
    if not all(isinstance(m, QuantLinear) or type(m) is nn.Linear for m in producers):
        return False
    inter = down.in_features
    if [m.out_features for m in producers] != ([2 * inter] if fused is not None else [inter, inter]):
        return False
    cols = torch.cat([perm, perm + inter]) if fused is not None else perm
    for m in producers:
        permute_columns(m, cols)
    permute_rows(down, perm)
    return True
