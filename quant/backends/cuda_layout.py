"""The CUDA kernels' weight layout, built once at load from a layer's GPTQ buffers.

The checkpoint stays GPTQ; this is the copy the kernels read (csrc/quantserve_cuda.h). Weights are
cut into 64-column strips and 16-row k steps; one k step of one strip is 512 bytes (4-bit), one
16-byte load per lane, already in tensor-core fragment order:

    qweight int32 [n_strips, k_steps, 32, words]   words = 4 (4-bit) or 8 (8-bit)
    lane = 4*g + t holds rows 2t, 2t+1, 2t+8, 2t+9 of columns 16j + g and 16j + g + 8 (j = 0..3).
    4-bit: word j, nibble e*4 + 2h + hk   = code of row (2t + 8hk + e), column (16j + 8h + g)
    8-bit: word 2j + h, byte e*2 + hk     = same row/column
    scales / zeros [groups, n_strips, 8, 8] in the activation dtype: [.., g, 2j + h] is column 16j + 8h + g

2- and 3-bit codes are widened to 4-bit codes here (exact: the dequantisation only subtracts the
true zero), so they run the 4-bit kernels at 4-bit bandwidth. Act-order (scattered g_idx)
checkpoints are permuted here: rows sorted by group, so groups are contiguous runs of
group_size rows; the matching permutation of the activations is `CudaLayout.perm`.
Padding (k to 16, n to 64) holds code 0 and never reaches y: padded rows meet zero activations,
padded columns are not written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from quant.format import effective_group_size, num_groups
from quant.groups import GroupOrderError, group_sort_perm
from quant.pack import unpack_qweight, unpack_qzeros

STRIP = 64  # output columns per strip
STEP = 16  # input rows per k step (one m16n8k16)
SINGLE_GROUP_SHIFT = 30


class LayoutError(ValueError):
    """The layer cannot be expressed in this layout; the message says why, with the numbers."""


@dataclass
class CudaLayout:
    """A layer repacked for the CUDA kernels (the backend's `layer.kernel_state`)."""

    qweight: torch.Tensor  # int32 [n_strips, k_steps, 32, words]
    bits: int  # repacked code width: 4 (from 2/3/4-bit) or 8
    n: int
    k: int
    groups: int
    group_shift: int  # log2(group_size / 16), SINGLE_GROUP_SHIFT for one group
    zero_point: int  # used when every zero point is this value (zeros below are then None)
    perm: torch.Tensor | None  # int64 [k] activation columns to gather (act-order), or None
    constants: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = field(
        default_factory=dict)  # dtype -> (scales, zeros or None, bias or None)
    dense: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # float32-input fallback weights
    perm32: torch.Tensor | None = field(init=False, repr=False)  # perm as int32, for the gather kernel

    def __post_init__(self) -> None:
        self.perm32 = None if self.perm is None else self.perm.to(torch.int32).contiguous()


def group_shift(in_features: int, group_size: int) -> int:
    """log2(group_size / 16) for the kernels' per-step group index; raises for other sizes."""
    gs = effective_group_size(in_features, group_size)
    if num_groups(in_features, group_size) == 1:
        return SINGLE_GROUP_SHIFT
    if gs < STEP or gs & (gs - 1):
        raise LayoutError(f"group_size={group_size} is not a power of two >= {STEP} "
                          f"(K={in_features}); the CUDA kernels index groups per 16-row step")
    return int(math.log2(gs)) - 4


def act_order_perm(g_idx: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor | None:
    """The layout's row order (quant.groups.group_sort_perm): None when g_idx is already
    k // group_size, else the stable argsort that makes it so; a LayoutError when none does."""
    try:
        return group_sort_perm(g_idx, in_features, group_size)
    except GroupOrderError as exc:
        raise LayoutError(str(exc)) from exc


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes int [K, N] (GPTQ orientation, values < 2^bits, bits 4 or 8) -> int32 [n_strips, k_steps, 32, words]."""
    k, n = codes.shape
    k_steps, n_strips = -(-k // STEP), -(-n // STRIP)
    c = torch.zeros(k_steps * STEP, n_strips * STRIP, dtype=torch.int64, device=codes.device)
    c[:k, :n] = codes
    # row = step*16 + hk*8 + t*2 + e ; column = strip*64 + j*16 + h*8 + g
    c = c.view(k_steps, 2, 4, 2, n_strips, 4, 2, 8)  # ks hk t e | ns j h g
    if bits == 4:
        c = c.permute(4, 0, 7, 2, 5, 3, 6, 1).reshape(n_strips, k_steps, 32, 4, 8)  # .. j | e h hk
        shifts = torch.arange(0, 32, 4, device=c.device)
    elif bits == 8:
        c = c.permute(4, 0, 7, 2, 5, 6, 3, 1).reshape(n_strips, k_steps, 32, 8, 4)  # .. j h | e hk
        shifts = torch.arange(0, 32, 8, device=c.device)
    else:
        raise LayoutError(f"the CUDA layout holds 4- or 8-bit codes, got {bits}")
    words = (c << shifts).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32).contiguous()


def pack_columns(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-group, per-column values [G, N] -> [G, n_strips, 8, 8] (lane group g, column 2j + h)."""
    groups, n = values.shape
    n_strips = -(-n // STRIP)
    v = torch.zeros(groups, n_strips * STRIP, dtype=torch.float32, device=values.device)
    v[:, :n] = values.float()
    v = v.view(groups, n_strips, 4, 2, 8).permute(0, 1, 4, 2, 3)  # G ns g j h
    return v.reshape(groups, n_strips, 8, 8).to(dtype).contiguous()


def build(layer, dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)) -> CudaLayout:
    """Repack a QuantLinear's GPTQ buffers (on any device) into the CUDA layout."""
    k, n, bits = layer.in_features, layer.out_features, layer.bits
    shift = group_shift(k, layer.group_size)
    perm = act_order_perm(layer.g_idx, k, layer.group_size)
    codes = unpack_qweight(layer.qweight, bits, k)
    if perm is not None:
        codes = codes.index_select(0, perm)
    zeros = unpack_qzeros(layer.qzeros, bits, n, layer.checkpoint_format)  # [G, N] true zeros
    kbits = 8 if bits == 8 else 4
    qweight = pack_codes(codes, kbits)
    uniform = bool((zeros == zeros.flatten()[0]).all())
    zero_point = int(zeros.flatten()[0]) if uniform else 0
    layout = CudaLayout(qweight=qweight, bits=kbits, n=n, k=k, groups=layer.scales.shape[0],
                        group_shift=shift, zero_point=zero_point, perm=perm)
    for dtype in dtypes:
        scales = pack_columns(layer.scales, dtype)
        zeros_k = None if uniform else pack_columns(zeros, dtype)
        bias = None if layer.bias is None else layer.bias.to(dtype).contiguous()
        layout.constants[dtype] = (scales, zeros_k, bias)
    return layout


def unpack_reference(layout: CudaLayout, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """Decode the layout element by element from the fragment convention: W [K, N] float32 in the
    (possibly permuted) row order. Used by tests to check `pack_codes` independently of its permutes."""
    qw = layout.qweight.to(torch.int64) & 0xFFFFFFFF
    n_strips, k_steps, _, words = qw.shape
    w = torch.zeros(k_steps * STEP, n_strips * STRIP, dtype=torch.float32)
    per = 8 if layout.bits == 4 else 4
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for word in range(words):
            for f in range(per):
                if layout.bits == 4:
                    j, e, p = word, f // 4, f % 4
                    h, hk = p // 2, p % 2
                else:
                    j, h, e, hk = word // 2, word % 2, f // 2, f % 2
                code = (qw[:, :, lane, word] >> (f * layout.bits)) & ((1 << layout.bits) - 1)  # [ns, ks]
                row = torch.arange(k_steps) * STEP + 2 * t + 8 * hk + e
                col = torch.arange(n_strips) * STRIP + 16 * j + 8 * h + g
                w[row[None, :], col[:, None]] = code.float()
    cols = torch.zeros(scales.shape[0], n_strips * STRIP)
    zcols = torch.zeros_like(cols)
    for j in range(4):
        for h in range(2):
            for g in range(8):
                idx = torch.arange(n_strips) * STRIP + 16 * j + 8 * h + g
                cols[:, idx] = scales[:, :, g, 2 * j + h].float()
                zcols[:, idx] = (zeros[:, :, g, 2 * j + h].float() if zeros is not None
                                 else float(layout.zero_point))
    group = torch.arange(k_steps * STEP) // STEP >> layout.group_shift
    group = group.clamp(max=scales.shape[0] - 1)
    w = (w - zcols[group]) * cols[group]
    return w[:layout.k, :layout.n]
