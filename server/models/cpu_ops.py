"""CPU float32 versions of the small per-layer ops of a decode step (csrc/cpu/decode_ops.cpp).

At batch 1 a decode step on the CPU is bound by torch dispatch, not arithmetic: RMSNorm is ~8
torch ops (~12 us), rotary ~14 (~25 us), and paged decode attention gathers the context's blocks
(advanced indexing, ~12 us per cache) before SDPA (~15 us), for a few microseconds of work each.
These run the same formulas in one call each, in the cpu_int4 extension (no extra build):

    rotary_(q, k, cos, sin)                 in place, bit-identical to the torch formula
    rms_norm(x, weight, eps, residual)      float32 sums in another order: ~1 ulp from torch
    decode_attention(q, k, v, kc, vc, ...)  stores k/v at their slots, attends through the block
                                            table without gathering; softmax in float32

Each function returns None when it does not apply (not float32 / CPU, a tensor that needs grad,
an unusual layout, the extension unavailable, or QUANTSERVE_CPU_OPS=0): the caller then runs
its torch path, which stays the reference (tests/kernels/test_cpu_ops.py compares the two).
"""

from __future__ import annotations

import math
import os

import torch

ENABLED = os.environ.get("QUANTSERVE_CPU_OPS", "1") != "0"  # tests and A/B benches flip this
_MODULE = None
_FAILED = False


def _module():
    """The compiled extension, or None when it cannot be built here (then torch paths run)."""
    global _MODULE, _FAILED
    if _MODULE is None and not _FAILED:
        try:
            from quant import cpu_int4

            _MODULE = cpu_int4.module()
        except Exception:  # noqa: BLE001 - no compiler, no OpenMP...: the torch paths still work
            _FAILED = True
    return _MODULE


_F32 = torch.float32


def _ok(*tensors: torch.Tensor) -> bool:
    """All float32 on the CPU, and no autograd to record: grad mode off (inference_mode /
    no_grad, where the model's parameters still say requires_grad) or no tensor needing grad.
    Strides are the caller's to check. Attribute checks only: at ~120 calls a token, 0.1 us shows."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.dtype is not _F32 or not t.is_cpu or (grad and t.requires_grad):
            return False
    return True


def usable(*tensors: torch.Tensor) -> bool:
    return ENABLED and _ok(*tensors) and (_MODULE is not None or _module() is not None)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """q [T, nh, D], k [T, nkv, D] (heads contiguous; may be views of one qkv row) rotated in
    place by cos/sin [T, 1, D]; None when not applicable."""
    if not usable(q, k, cos, sin) or q.dim() != 3 or k.dim() != 3:
        return None
    t, nq, d = q.shape
    _, nk, dk = k.shape
    qs, ks = q.stride(), k.stride()
    if (d % 2 or dk != d or k.shape[0] != t or qs[2] != 1 or qs[1] != d or ks[2] != 1 or ks[1] != d
            or cos.shape != (t, 1, d) or sin.shape != cos.shape or not cos.is_contiguous()
            or not sin.is_contiguous()):
        return None
    _MODULE.rotary(q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), t, nq, nk, d, qs[0], ks[0], d)
    return q, k


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """x [T, H] (+ residual [T, H]) -> (weight * norm(x + residual), x + residual); None when not
    applicable. Outputs are new contiguous tensors (inputs untouched)."""
    if residual is None:
        if not usable(x, weight):
            return None
    elif not usable(x, weight, residual) or residual.shape != x.shape:
        return None
    if x.dim() != 2 or weight.dim() != 1 or not weight.is_contiguous():
        return None
    t, h = x.shape
    xs = x.stride()
    if weight.shape[0] != h or xs[1] != 1:
        return None
    out = torch.empty(t, h)
    if residual is None:
        _MODULE.rms_norm(x.data_ptr(), 0, weight.data_ptr(), out.data_ptr(), 0, t, h, xs[0], 0, eps)
        return out, None
    rs = residual.stride()
    if rs[1] != 1:
        return None
    res_out = torch.empty(t, h)
    _MODULE.rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(), res_out.data_ptr(),
                     t, h, xs[0], rs[0], eps)
    return out, res_out


class DecodePlan:
    """One decode-only step's metadata, checked once and shared by every layer: the block tables,
    context lengths and slots as the kernel reads them (int32 / int32 / int64, contiguous)."""

    def __init__(self, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        self.block_tables = block_tables.to(torch.int32).contiguous()
        self.context_lens = context_lens.to(torch.int32).contiguous()
        self.slots = slot_mapping.to(torch.int64).contiguous()
        self.batch = self.block_tables.shape[0]
        self.max_blocks = self.block_tables.shape[1]

    @staticmethod
    def build(block_tables: torch.Tensor, context_lens: torch.Tensor, slot_mapping: torch.Tensor,
              cache: torch.Tensor) -> "DecodePlan | None":
        """A plan when the fast path can serve this step's decode over `cache`, else None."""
        if (not ENABLED or cache.dtype is not torch.float32 or not cache.is_cpu
                or not cache.is_contiguous() or _module() is None
                or slot_mapping.shape[0] != block_tables.shape[0]):
            return None
        plan = DecodePlan(block_tables, context_lens, slot_mapping)
        # raw pointers: indices out of the cache must fail here as torch indexing would fail
        num_blocks, block_size = cache.shape[0], cache.shape[1]
        if plan.batch and (int(plan.slots.min()) < 0 or int(plan.slots.max()) >= num_blocks * block_size
                           or int(plan.block_tables.min()) < 0 or int(plan.block_tables.max()) >= num_blocks
                           or int(plan.context_lens.min()) < 1
                           or int(plan.context_lens.max()) > plan.max_blocks * block_size):
            raise IndexError("paged decode metadata points outside the KV cache")
        return plan

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor,
                 vc: torch.Tensor) -> torch.Tensor | None:
        """q [B, nh, hd], k/v [B, nkv, hd] -> o [B, nh, hd] (k/v stored in kc/vc first); None
        when the inputs do not fit the kernel (the caller's torch path runs instead)."""
        b, nh, hd = q.shape
        nkv = k.shape[1]
        qs, ks, vs = q.stride(), k.stride(), v.stride()
        if (b != self.batch or not _ok(q, k, v) or qs[1:] != (hd, 1) or ks[1:] != (hd, 1)
                or vs[1:] != (hd, 1) or v.shape != k.shape or k.shape[0] != b or k.shape[2] != hd
                or nh % nkv or kc.shape[2:] != (nkv, hd) or vc.shape != kc.shape
                or not kc.is_contiguous() or not vc.is_contiguous()):
            return None
        out = torch.empty(b, nh, hd)
        _MODULE.decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), kc.data_ptr(), vc.data_ptr(),
                                 self.block_tables.data_ptr(), self.context_lens.data_ptr(),
                                 self.slots.data_ptr(), out.data_ptr(), b, nh, nkv, hd, kc.shape[1],
                                 self.max_blocks, qs[0], ks[0], vs[0],
                                 torch.get_num_threads(), 1.0 / math.sqrt(hd))
        return out
