"""Quantisation groups over the input channels: the row order that makes each group contiguous.

A GPTQ layer's g_idx (int [K]) names the group of each input channel. Without act-order it is
k // group_size; with act-order (desc_act) the channels joined groups in a permuted order, and every
backend here first sorts its rows by group so each group is one run of group_size rows. The rule
lives here once: the CUDA layout, the CPU backend and the load-time act-order pass all use it.
"""

from __future__ import annotations

import torch

from quant.format import FormatError, effective_group_size


class GroupOrderError(FormatError):
    """A g_idx whose groups are not runs of group_size rows even after sorting."""


def group_sort_perm(g_idx: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor | None:
    """None when g_idx already is k // group_size; else the stable argsort of g_idx (int64 [K],
    on g_idx's device), after which it is. Raises GroupOrderError when no row order makes it so."""
    gs = effective_group_size(in_features, group_size)
    expected = torch.arange(in_features, device=g_idx.device, dtype=torch.int64) // gs
    g = g_idx.to(torch.int64)
    if torch.equal(g, expected):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], expected):
        counts = torch.bincount(g, minlength=int(expected[-1]) + 1)
        raise GroupOrderError(f"g_idx groups are not runs of group_size={group_size} rows after sorting "
                              f"(group sizes {counts[:6].tolist()}...; K={in_features})")
    return perm
