"""Programmatic dependent launch (PDL) for the decode step's Triton kernels.

On sm_90+ every Triton kernel of the step (server.models.fused, qkv_reader, triton_attention) is
launched with Triton's `launch_pdl`, so it may start while the kernel before it is still running,
and it signals `griddepcontrol.launch_dependents` as it starts, so the kernel after it (a
PDL-launched GEMV/GEMM loads its weights before its own wait) starts early too. Before it reads
anything an earlier kernel may still be writing, it runs `griddepcontrol.wait`, which returns once
the kernel before it has finished and its writes are visible. QUANTSERVE_TRITON_PDL=0 turns both off.

What a kernel may read before its wait. The wait orders it after the kernel just before it only,
and that one may itself have started early: kernel i + 1 can run while kernel i - 1 is still
running. So data written by any kernel of the current chain of PDL launches is off limits. What is
safe is what was complete before the chain began: a plain (non-PDL) launch, a torch kernel or a
copy, starts only after everything before it in the stream has finished, and every PDL kernel
after it starts after it has. In a decode step that is
  - the step's metadata (positions, slot mapping, block tables, context lengths: copied from the
    host before the first layer) and the rotary cos/sin (torch ops before the first layer);
  - the paged KV cache's rows from earlier steps (only this step's new tokens' slots are written
    during the step, by the q/k/v reader or the cache write of the same layer);
  - weights (norm gains).
The step's activations, sums, q/k/v and this step's cache slots are read after the wait.
`pdl_enter` is both calls at the top of a kernel; kernels with something safe to load early call
`pdl_launch`, load it, then `pdl_wait`.
"""

from __future__ import annotations

import os

import torch

try:
    import triton.language as tl
    from triton import jit

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

_PDL: dict[int, bool] = {}


def triton_pdl(x: torch.Tensor) -> bool:
    """Whether the Triton kernels on x's (CUDA) device launch with PDL, wait and signal (module
    docstring): sm_90+, a Triton with the griddepcontrol ops, and QUANTSERVE_TRITON_PDL not 0."""
    if not x.is_cuda:  # the interpreter on the CPU
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    found = _PDL.get(index)
    if found is None:
        cuda_ext = getattr(getattr(tl, "extra", None), "cuda", None) if HAVE_TRITON else None
        found = _PDL[index] = (hasattr(cuda_ext, "gdc_launch_dependents") and hasattr(cuda_ext, "gdc_wait")
                               and torch.cuda.get_device_capability(index)[0] >= 9
                               and os.environ.get("QUANTSERVE_TRITON_PDL", "1") != "0")
    return found


def launch_kwargs(pdl: bool) -> dict:
    """The Triton launch option for PDL; passed only when on, so Tritons without it never see it."""
    return {"launch_pdl": True} if pdl else {}


if HAVE_TRITON:

    @jit
    def pdl_launch(PDL: tl.constexpr):
        """Let the next kernel launch (`griddepcontrol.launch_dependents`)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @jit
    def pdl_wait(PDL: tl.constexpr):
        """Wait until the kernel before this one has finished and its writes are visible. Loads
        issued before it stay in flight across it; only what the module docstring lists as safe
        may be loaded before it."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @jit
    def pdl_enter(PDL: tl.constexpr):
        """First thing in a kernel launched with `launch_pdl=PDL` that loads nothing early: let the
        next kernel launch, then wait for the one before."""
        pdl_launch(PDL)
        pdl_wait(PDL)
else:
    pdl_launch = pdl_wait = pdl_enter = None
