"""Fused elementwise kernels for the decoder (Triton on CUDA, torch elsewhere).

A decode step at small batch is bound by how many kernels it launches, not by their work: the
torch formulation of RMSNorm, rotary and SwiGLU is ~25 launches per layer. These three kernels
(and server.models.qkv_reader's q/k/v reader, which rotates like rotary_) replace them with 4 per
layer:

    rms_norm(x, weight, eps, residual=None)   [T, H] -> [T, H] (and the updated residual stream)
    rotary_(q, k, cos, sin)                   rotate q [T, nh, D] and k [T, nkv, D] in place
    silu_mul(gate_up)                         [T, 2I] -> [T, I] = silu(gate) * up

rms_norm and silu_mul also take a quantized matmul's unconverted output (quant.sums.Sums, fp32):
they round it as the matmul would have and zero it in the same pass, so the GEMV before them skips
its own fix-up (reading its sums back to write y). The Hopper GEMM's sums ([column][token slot])
go to server.models.column_sums: silu_mul to its column kernel, rms_norm to sums_rows' rows first.

On sm_90+ every kernel here takes part in programmatic dependent launch (server.models.pdl); the
norm's gain and the rotary cos/sin are loaded before the wait (inputs that no kernel of the step's
chain writes).

Every function computes exactly what its torch fallback computes (fp32 math, the model dtype at
the same rounding points as Hugging Face's Llama), so CPU and GPU paths agree. On the CPU in
float32, rms_norm and rotary_ run one C++ call each (server.models.cpu_ops): rotary bit-identical
and in place (as on CUDA), rms_norm within ~1 ulp of F.rms_norm (another summation order).
"""

from __future__ import annotations

import torch

from quant.sums import Sums
from server.models import column_sums, cpu_ops
from server.models.pdl import launch_kwargs, pdl_enter, pdl_launch, pdl_wait, triton_pdl
from server.models.triton_env import NO_FMA, use_triton

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


# ---------------------------------------------------------------------------------- torch paths

def rms_norm_torch(x, weight, eps, residual=None):
    if residual is not None:
        x = x + residual
        residual = x
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # one op, same arithmetic
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps), residual
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * y, residual


def rotary_torch(q, k, cos, sin):
    def rot(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    return rot(q), rot(k)


def silu_mul_torch(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ---------------------------------------------------------------------------------- Triton

if HAVE_TRITON:

    # sums_zeroing_barrier: a reader of quant.sums loads the fp32 sums and stores zeros over them.
    # Triton may give the load and the store different thread layouts (the loaded tensor is
    # converted for the math), so without a barrier one thread can zero an element before the
    # thread that loads it has read it (seen on H200 in the q/k/v kernel: k and v columns lost).

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o,
                         H, eps, HAS_RES: tl.constexpr, FROM_SUMS: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
        pdl_launch(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: loaded before the wait (pdl)
        pdl_wait(PDL)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if FROM_SUMS:  # x is a matmul's fp32 sums (quant.sums): round as its y, zero them for the next
            tl.debug_barrier()  # every thread's loads before any zero store (sums_zeroing_barrier)
            tl.store(x_ptr + row * stride_x + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)
            x = x.to(out_ptr.dtype.element_ty)
        if HAS_RES:
            x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            tl.store(res_out_ptr + row * stride_r + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / H
        y = (xf * tl.rsqrt(var + eps)).to(x.dtype)
        tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def load_cos_sin(cos_ptr, sin_ptr, row, HALF: tl.constexpr):
        """The two halves of one token's cos and sin rows (at offset `row`): c1, s1, c2, s2 [1, HALF]."""
        d = tl.arange(0, HALF)[None, :]
        return (tl.load(cos_ptr + row + d), tl.load(sin_ptr + row + d),
                tl.load(cos_ptr + row + HALF + d), tl.load(sin_ptr + row + HALF + d))

    @triton.jit
    def rotate_halves(x1, x2, c1, s1, c2, s2):
        """x = [x1, x2] ([rows, HALF] each: heads of a token, or tokens of a head) rotated with the
        same rounding as torch (x * cos and rotate_half(x) * sin in the model dtype, then added):
        y1, y2. c1, s1, c2, s2: the halves of cos and sin, broadcast against x1 ([1, HALF] for one
        token's heads, [rows, HALF] for a head's tokens)."""
        y1 = (x1 * c1).to(x1.dtype) + (-x2 * s1).to(x1.dtype)
        y2 = (x2 * c2).to(x1.dtype) + (x1 * s2).to(x1.dtype)
        return y1, y2

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                       stride_ct, n_q, n_k, HALF: tl.constexpr, HEADS: tl.constexpr,
                       PDL: tl.constexpr):
        pdl_launch(PDL)
        t = tl.program_id(0)
        d = tl.arange(0, HALF)
        h = tl.arange(0, HEADS)
        c1, s1, c2, s2 = load_cos_sin(cos_ptr, sin_ptr, t * stride_ct, HALF)  # before the wait (pdl)
        pdl_wait(PDL)
        for which in tl.static_range(2):
            if which == 0:
                base = q_ptr + t * stride_qt
                stride_h = stride_qh
                n = n_q
            else:
                base = k_ptr + t * stride_kt
                stride_h = stride_kh
                n = n_k
            hm = (h < n)[:, None]
            p1 = base + h[:, None] * stride_h + d[None, :]
            x1 = tl.load(p1, mask=hm, other=0.0)
            x2 = tl.load(p1 + HALF, mask=hm, other=0.0)
            y1, y2 = rotate_halves(x1, x2, c1, s1, c2, s2)
            tl.store(p1, y1, mask=hm)
            tl.store(p1 + HALF, y2, mask=hm)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, FROM_SUMS: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_enter(PDL)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        u = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
        if FROM_SUMS:  # fp32 sums (quant.sums): round as the matmul's y, zero them for the next
            tl.debug_barrier()  # every thread's loads before any zero store (sums_zeroing_barrier)
            zero = tl.zeros([BLOCK], dtype=tl.float32)
            tl.store(x_ptr + row * stride_x + cols, zero, mask=mask)
            tl.store(x_ptr + row * stride_x + inter + cols, zero, mask=mask)
            g = g.to(out_ptr.dtype.element_ty)
            u = u.to(out_ptr.dtype.element_ty)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(out_ptr + row * stride_o + cols, s * u, mask=mask)


# ---------------------------------------------------------------------------------- entry points

def rms_norm(x: torch.Tensor | Sums, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [T, H] (+ residual [T, H]) -> (weight * norm(x + residual), x + residual).
    x may be a matmul's unconverted Sums: converted (and zeroed) here."""
    sums = x if isinstance(x, Sums) else None
    if sums is not None and column_sums.is_columns(sums):  # the Hopper GEMM's [column][slot] sums
        # rows first: a norm needs a token's whole row. Read from the column layout, one program per
        # row touches a sector per value, and one program per block of tokens walks all the columns
        # serially (both measured slower: server.models.column_sums)
        x, sums = column_sums.sums_rows(sums), None
    if sums is not None and (not use_triton(sums.data, sums.dtype) or sums.dtype != weight.dtype):
        x, sums = sums.materialize(), None
    if sums is not None:
        return _rms_norm_triton(sums.data, weight, eps, residual, sums)
    if not use_triton(x) or x.dtype != weight.dtype or x.stride(-1) != 1:
        if x.is_cpu:  # float32 on the CPU: one C++ call (None: not applicable)
            out = cpu_ops.rms_norm(x, weight, eps, residual)
            if out is not None:
                return out
        return rms_norm_torch(x, weight, eps, residual)
    return _rms_norm_triton(x, weight, eps, residual, None)


def _rms_norm_triton(x, weight, eps, residual, sums: Sums | None):
    t, h = x.shape
    out = torch.empty(t, h, dtype=weight.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else None
    pdl = triton_pdl(x)
    _rms_norm_kernel[(t,)](x, residual if residual is not None else x, weight, out,
                           res_out if res_out is not None else out, x.stride(0),
                           residual.stride(0) if residual is not None else 0, out.stride(0), h, eps,
                           HAS_RES=residual is not None, FROM_SUMS=sums is not None,
                           BLOCK=triton.next_power_of_2(h), PDL=pdl, num_warps=4 if h <= 4096 else 8,
                           **launch_kwargs(pdl))
    if sums is not None:
        sums.release()
    return out, res_out


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, nh, D] and k [T, nkv, D] by cos/sin [T, 1, D] (rotate-half layout).
    In place on CUDA and on the CPU in float32 (q and k may be strided views of one qkv output);
    returns (q, k). cos/sin are read before the PDL wait: no PDL kernel of the current chain may
    write them (server.models.pdl; the model computes them with torch ops before its first layer)."""
    d = q.shape[-1]
    if not use_triton(q) or d & (d - 1) or q.stride(-1) != 1 or k.stride(-1) != 1:
        if q.is_cpu:  # float32 on the CPU: in place, bit-identical (None: not applicable)
            out = cpu_ops.rotary_(q, k, cos, sin)
            if out is not None:
                return out
        return rotary_torch(q, k, cos, sin)
    t, nq, _ = q.shape
    nk = k.shape[1]
    cos2, sin2 = cos.reshape(t, d), sin.reshape(t, d)
    pdl = triton_pdl(q)
    _rotary_kernel[(t,)](q, k, cos2, sin2, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         cos2.stride(0), nq, nk, HALF=d // 2,
                         HEADS=triton.next_power_of_2(max(nq, nk)), PDL=pdl, num_warps=4, **NO_FMA,
                         **launch_kwargs(pdl))
    return q, k


def silu_mul(gate_up: torch.Tensor | Sums) -> torch.Tensor:
    """[T, 2I] (gate then up) -> [T, I]. gate_up may be a matmul's unconverted Sums: converted (and
    zeroed) here."""
    sums = gate_up if isinstance(gate_up, Sums) else None
    if sums is not None and column_sums.is_columns(sums):  # the Hopper GEMM's [column][slot] sums
        out = column_sums.silu_mul_cols(sums)
        if out is not None:
            return out
        gate_up, sums = sums.materialize(), None
    if sums is not None:
        if not use_triton(sums.data, sums.dtype):
            return silu_mul_torch(sums.materialize())
        gate_up, dtype = sums.data, sums.dtype
    elif not use_triton(gate_up) or gate_up.stride(-1) != 1:
        return silu_mul_torch(gate_up)
    else:
        dtype = gate_up.dtype
    t, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(t, inter, dtype=dtype, device=gate_up.device)
    block = 1024
    pdl = triton_pdl(gate_up)
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0),
                                                    inter, FROM_SUMS=sums is not None, BLOCK=block,
                                                    PDL=pdl, num_warps=4, **launch_kwargs(pdl))
    if sums is not None:
        sums.release()
    return out
