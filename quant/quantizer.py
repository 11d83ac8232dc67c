"""Per-group scale / zero search and the unpacked result shared by RTN and GPTQ.

Same arithmetic as the GPTQ reference quantiser: the range always includes 0; symmetric uses
scale = 2 * max|w| / (2^b - 1) with the fixed zero 2^(b-1); asymmetric uses
scale = (max - min) / (2^b - 1) and zero = round(-min / scale). Scales are rounded to fp16 before
codes are computed, so the codes are optimal for the scale that is actually stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.format import max_code, sym_zero


@dataclass
class GroupParams:
    scale: torch.Tensor  # float32 [N] (fp16-representable)
    zero: torch.Tensor  # float32 [N], integer-valued


@dataclass
class QuantResult:
    """One quantised linear before packing (GPTQ orientation: input channels along dim 0).

    codes  int32   [K, N]  0..2^b-1, row k = input channel k (original order even with act-order)
    zeros  int32   [G, N]  TRUE zero points
    scales float32 [G, N]
    g_idx  int32   [K]     group of every input channel
    """

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        """float32 W [K, N]."""
        g = self.g_idx.long()
        return (self.codes.float() - self.zeros[g].float()) * self.scales[g]


def group_params(w: torch.Tensor, bits: int, sym: bool) -> GroupParams:
    """Scale and zero per output row of `w` (float [N, k], the k input channels of one group)."""
    w = w.float()
    maxq = max_code(bits)
    zero_t = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zero_t)
    xmax = torch.maximum(w.max(dim=1).values, zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(dead, torch.full_like(xmax, 1.0), xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16).float()
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float16).tiny), scale)
    if sym:
        zero = torch.full_like(scale, float(sym_zero(bits)))
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return GroupParams(scale=scale, zero=zero)


def quantize_codes(w: torch.Tensor, params: GroupParams, bits: int) -> torch.Tensor:
    """float w [N, k] -> float codes [N, k] (integer-valued, clamped to 0..2^b-1)."""
    s = params.scale.unsqueeze(1)
    z = params.zero.unsqueeze(1)
    return torch.clamp(torch.round(w / s) + z, 0, max_code(bits))


def dequantize_codes(q: torch.Tensor, params: GroupParams) -> torch.Tensor:
    return params.scale.unsqueeze(1) * (q - params.zero.unsqueeze(1))
