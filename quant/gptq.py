"""GPTQ for one linear layer (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"), in the paper's names: H, Hinv, W, Q, Err.

Two steps, so that layers fed by the same input (q/k/v, gate/up) share one Hessian and one inverse:

    acc = HessianAccumulator(K, device); acc.add_batch(x) ...      H = 2/n * sum_x x x^T   [K, K]
    factor = factor_hessian(acc.H, damp_percent, order, group_size) dead channels, damping, the
                                                                   processing order, Hinv = chol(H^-1)^T
    result, stats = quantize_weight(W, factor, bits, group_size, sym, static_groups)

Processing orders (`order`):
    "natural"    input channels 0..K-1; groups are consecutive channels (g_idx[k] = k // group_size)
    "act"        act-order (desc_act): decreasing diag H; a group is group_size consecutive columns
                 of THAT order, so g_idx is scattered (g_idx[k] = position of k // group_size)
    "group_act"  group-aware act-order (GPTQModel's "act_group_aware"): groups stay the contiguous
                 channel blocks of "natural", but are visited in decreasing order of their largest
                 diag H, and the channels inside a group in decreasing diag H. Most of act-order's
                 gain with the plain g_idx = k // group_size layout (no runtime permutation).

The column loop quantises one input channel at a time and spreads its error over the channels not
yet quantised (W[:, j] -= Err[:, i] * Hinv[i, j] / Hinv[i, i]), lazily: inside a block of 128
columns immediately, to the rest of W once per block with one matmul. Group scales/zeros come from
`quant.quantizer.group_params` (the rule RTN uses) on the error-updated weights of the group at the
moment its first column is reached (or, with static groups, on the original weights, up front).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from quant.format import check_bits, effective_group_size, num_groups
from quant.quantizer import GroupParams, QuantResult, dequantize_codes, group_params, quantize_codes

DAMP_STEP = 0.01  # added to damp_percent each time the Cholesky factorisation fails
MAX_DAMP_TRIES = 50  # so damping never exceeds damp_percent + 0.5 * mean(diag H)
BLOCK_SIZE = 128
PARALLEL_MACS = 1 << 30  # below this, a CPU solve runs on one thread (see _cpu_threads)


class GPTQError(RuntimeError):
    """A Hessian or weight GPTQ cannot work with; the message gives the numbers."""


class HessianAccumulator:
    """H = 2/n * sum over the n input rows x of x x^T, float32 [K, K] on `device`.

    A running average: batches of any size arrive one at a time (`add_batch`), and H is always the
    mean over all rows seen so far, so its scale does not grow with the amount of calibration data.
    """

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_rows = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """x [..., K] in any float dtype; every leading index is one input row (one token)."""
        if x.shape[-1] != self.in_features:
            raise GPTQError(f"Hessian input has {x.shape[-1]} features, layer has K={self.in_features}")
        x = x.reshape(-1, self.in_features).to(device=self.H.device, dtype=torch.float32)
        rows = x.shape[0]
        if rows == 0:
            return
        self.H.mul_(self.num_rows / (self.num_rows + rows))
        self.num_rows += rows
        x = x * math.sqrt(2.0 / self.num_rows)
        self.H.addmm_(x.t(), x)


@dataclass
class HessianFactor:
    """What the column loop needs from H; shared by every layer fed by the same input.

    Hinv  float32 [K, K]  upper Cholesky factor of (H + damp I)^-1, rows/cols in processing order
    perm  int64 [K] | None  processing order: perm[j] = input channel processed j-th; None = identity
    dead  bool [K]        input channels that never carried a non-zero value (their weights are zeroed)
    damp_percent float    the dampening that was actually used (after retries), relative to mean diag H
    order str             "natural", "act" or "group_act" (module docstring)
    group_size int        the group size "group_act" ordered by (-1 otherwise)
    """

    Hinv: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor
    damp_percent: float
    order: str = "natural"
    group_size: int = -1


@dataclass
class GPTQStats:
    loss: float  # sum over weights of (w - q)^2 / Hinv_ii^2 / 2: the paper's error, H-weighted
    seconds: float
    damp_percent: float
    row_loss: torch.Tensor | None = None  # float32 [N]: the loss of each output row (CPU)


ORDERS = ("natural", "act", "group_act")


def factor_hessian(H: torch.Tensor, damp_percent: float, order: str = "natural",
                   group_size: int = -1) -> HessianFactor:
    """H float [K, K] (not modified) -> HessianFactor.

    Dead channels (H_ii == 0) get H_ii = 1. Dampening adds damp * mean(diag H) to the diagonal; when
    the Cholesky factorisation fails (H indefinite through rounding), damp grows by DAMP_STEP until it
    succeeds, at most MAX_DAMP_TRIES times. `group_size` matters only for order="group_act".
    """
    if order not in ORDERS:
        raise GPTQError(f"order {order!r} is not one of {ORDERS}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise GPTQError(f"Hessian must be square [K, K], got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        bad = (~torch.isfinite(H)).sum().item()
        raise GPTQError(f"Hessian [{H.shape[0]}, {H.shape[1]}] has {bad} non-finite entries "
                        f"(inf/nan activations reached this layer)")
    with cpu_threads_for(H.device, H.shape[0] ** 3):
        return _factor_hessian(H, damp_percent, order, group_size)


def processing_order(diag: torch.Tensor, order: str, group_size: int) -> torch.Tensor | None:
    """diag H [K] -> perm int64 [K] (perm[j] = channel processed j-th), None for "natural"."""
    k = diag.numel()
    if order == "act":
        return torch.argsort(diag, descending=True, stable=True)
    if order == "natural" or group_size == -1 or group_size >= k:
        return None if order != "group_act" else torch.argsort(diag, descending=True, stable=True)
    starts = list(range(0, k, group_size))
    blocks = [torch.arange(s, min(s + group_size, k), device=diag.device) for s in starts]
    blocks = [b[torch.argsort(diag[b], descending=True, stable=True)] for b in blocks]
    peak = torch.stack([diag[b[0]] for b in blocks])  # each block's largest diag H
    visit = torch.argsort(peak, descending=True, stable=True).tolist()
    return torch.cat([blocks[g] for g in visit])


def _factor_hessian(H: torch.Tensor, damp_percent: float, order: str,
                    group_size: int) -> HessianFactor:
    H = H.to(torch.float32).clone()
    k = H.shape[0]
    diag = torch.arange(k, device=H.device)
    dead = H[diag, diag] == 0
    H[dead, dead] = 1.0
    perm = processing_order(H[diag, diag], order, group_size)
    if perm is not None:
        H = H[perm][:, perm]
    mean_diag = H[diag, diag].mean().item()
    damp = damp_percent
    for _ in range(MAX_DAMP_TRIES):
        Hd = H.clone()
        Hd[diag, diag] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return HessianFactor(Hinv=U, perm=perm, dead=dead, damp_percent=damp, order=order,
                                     group_size=group_size if order == "group_act" else -1)
        damp = round(damp + DAMP_STEP, 6)
    raise GPTQError(f"Cholesky of the [{k}, {k}] Hessian failed even with damp_percent={damp:.2f} "
                    f"(started at {damp_percent}); the calibration activations are degenerate")


@contextmanager
def cpu_threads_for(device: torch.device, macs: int):
    """Run CPU work of about `macs` multiply-adds on one thread unless it is big enough to share.

    Quantisation is mostly small ops (the column loop's [N, <= 128] updates, a small Cholesky, RTN
    rounding, packing); waking a thread pool for each costs more than it saves, badly so on a
    machine whose cores other jobs also use (measured on a busy 2-core box: K=576 factorisation
    2.2 s on two threads vs 0.03 s on one, N=960 solve 0.6 s vs 0.12 s, RTN of SmolLM2 90 s vs 2 s)."""
    if device.type != "cpu" or macs >= PARALLEL_MACS:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _group_slice(W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor,
                 i1: int, i2: int, col: int, end: int) -> torch.Tensor:
    """Current (error-updated) weights of processing-order columns col..end-1, [N, end - col].

    Columns inside the block come from W1; columns past the block get the block's pending lazy
    update applied first, so a group that straddles blocks sees exactly what the loop will see."""
    inside = W1[:, col - i1:min(end, i2) - i1]
    if end <= i2:
        return inside
    done = col - i1  # block columns already quantised; their errors are still pending for W[:, i2:]
    outside = W[:, i2:end] - Err1[:, :done] @ Hinv[i1:col, i2:end]
    return torch.cat([inside, outside], dim=1)


def quantize_weight(weight: torch.Tensor, factor: HessianFactor, bits: int, group_size: int,
                    sym: bool, static_groups: bool = False,
                    block_size: int = BLOCK_SIZE) -> tuple[QuantResult, GPTQStats]:
    """GPTQ one weight matrix.

    weight  float [N, K] (nn.Linear orientation), any float dtype, on Hinv's device (not modified)
    factor  from `factor_hessian` of this layer's input Hessian [K, K]
    returns QuantResult (codes [K, N] in ORIGINAL channel order, true zeros / scales [G, N],
            g_idx [K]) and GPTQStats (loss, seconds, damp_percent, row_loss).

    Groups (the last one may be partial): with order "act" and dynamic groups a group is
    `group_size` consecutive columns of the processing order, so g_idx[k] = (position of k in that
    order) // group_size; otherwise groups are contiguous channel blocks, g_idx[k] = k // group_size.
    Static groups fix every group's scale/zero on the original weights before any update.
    """
    check_bits(bits)
    n, k = weight.shape
    if factor.order == "group_act" and factor.group_size != group_size and not static_groups:
        raise GPTQError(f"the Hessian factor was ordered for group_size={factor.group_size}, "
                        f"quantising with group_size={group_size}")
    with cpu_threads_for(factor.Hinv.device, n * k * k // 2):
        return _quantize_weight(weight, factor, bits, group_size, sym, static_groups, block_size)


def _segments(factor: HessianFactor, k: int, gs: int, orig: list[int]) -> dict[int, tuple[int, int]]:
    """Dynamic groups: {first processing column: (end column, group id)}; each group is a run of
    consecutive processing columns."""
    if factor.order == "act":  # groups are cut from the processing order itself
        return {c: (min(c + gs, k), c // gs) for c in range(0, k, gs)}
    out, c = {}, 0
    while c < k:  # natural / group_act: a contiguous channel block, visited as one run
        g = orig[c] // gs
        end = c + min(gs, k - g * gs)
        out[c] = (end, g)
        c = end
    return out


def _quantize_weight(weight: torch.Tensor, factor: HessianFactor, bits: int, group_size: int,
                     sym: bool, static_groups: bool, block_size: int) -> tuple[QuantResult, GPTQStats]:
    start = time.perf_counter()
    W = weight.detach().to(device=factor.Hinv.device, dtype=torch.float32).clone()
    n, k = W.shape
    if factor.Hinv.shape != (k, k):
        raise GPTQError(f"weight has K={k} input channels, Hessian factor is {tuple(factor.Hinv.shape)}")
    if not torch.isfinite(W).all():
        raise GPTQError(f"weight [{n}, {k}] has non-finite values")
    gs = effective_group_size(k, group_size)
    G = num_groups(k, group_size)
    W[:, factor.dead] = 0
    scales = torch.empty(G, n, dtype=torch.float32, device=W.device)
    zeros = torch.empty(G, n, dtype=torch.float32, device=W.device)
    static = None  # static groups: params fixed on contiguous original-order groups, before updates
    if static_groups:
        static = [group_params(W[:, g * gs:(g + 1) * gs], bits, sym) for g in range(G)]
        for g, p in enumerate(static):
            scales[g], zeros[g] = p.scale, p.zero
    perm = factor.perm
    if perm is not None:
        W = W[:, perm]
    orig = perm.tolist() if perm is not None else list(range(k))
    segments = {} if static is not None else _segments(factor, k, gs, orig)
    Hinv = factor.Hinv
    Q = torch.empty_like(W)  # integer codes, processing order
    losses = torch.zeros(n, dtype=torch.float32, device=W.device)
    params: GroupParams | None = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.empty_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                params = static[orig[col] // gs]
            elif col in segments:  # first column of a group: its params from the updated weights
                end, g = segments[col]
                params = group_params(_group_slice(W, W1, Err1, Hinv, i1, i2, col, end), bits, sym)
                scales[g], zeros[g] = params.scale, params.zero
            w = W1[:, i:i + 1]
            q = quantize_codes(w, params, bits)
            err = (w - dequantize_codes(q, params)) / Hinv1[i, i]  # [N, 1]
            Q1[:, i:i + 1] = q
            losses += err[:, 0].square() / 2
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    g_idx = torch.arange(k, device=W.device) // gs
    if perm is not None:
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]  # code row k is input channel k again
        if factor.order == "act" and static is None:
            g_idx = invperm // gs  # channel k was processed at position invperm[k]
    result = QuantResult(codes=Q.t().to(torch.int32).contiguous(),
                         zeros=zeros.to(torch.int32), scales=scales,
                         g_idx=g_idx.to(torch.int32), bits=bits)
    if W.device.type == "cuda":
        torch.cuda.synchronize(W.device)
    stats = GPTQStats(loss=losses.sum().item(), seconds=time.perf_counter() - start,
                      damp_percent=factor.damp_percent, row_loss=losses.cpu())
    return result, stats


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool,
                  desc_act: bool = False, static_groups: bool = False, damp_percent: float = 0.01,
                  act_group_aware: bool = False) -> tuple[QuantResult, GPTQStats]:
    """One layer end to end: weight float [N, K], H float32 [K, K] -> (QuantResult, GPTQStats)."""
    factor = factor_hessian(H, damp_percent, select_order(desc_act, act_group_aware), group_size)
    return quantize_weight(weight, factor, bits, group_size, sym, static_groups)


def select_order(desc_act: bool, act_group_aware: bool) -> str:
    """act-order wins when both are asked for (its groups are what desc_act promises readers)."""
    return "act" if desc_act else ("group_act" if act_group_aware else "natural")
