"""Whether the decoder's Triton kernels run for a tensor, and how they are compiled.

    use_triton(x, dtype=None)   True on CUDA; on the CPU only under Triton's interpreter
    NO_FMA                      launch option of kernels that must round like torch (no FMA)

Shared by server.models.fused, column_sums and qkv_reader (their kernels and torch fallbacks).
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


# TRITON_INTERPRET=1 (read by Triton when the kernels are defined) runs them in Triton's interpreter,
# which takes CPU tensors: the CPU tests use it to check the kernels' logic without a GPU. Its numpy
# arithmetic has no bfloat16, so bfloat16 stays on the torch paths there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the Triton kernel runs for x (results in `dtype`, default x's)."""
    if not HAVE_TRITON:
        return False
    return x.is_cuda or (INTERPRET and x.is_cpu and (dtype or x.dtype) != torch.bfloat16)


# The rotary kernels compile without fusing a multiply and the add after it into one FMA: torch rounds
# x * cos and rotate_half(x) * sin before adding them, and so must they (in float32 too), or two
# launches of the same arithmetic (the rotary kernel and the q/k/v readers) may round differently.
NO_FMA = {"enable_fp_fusion": False}
