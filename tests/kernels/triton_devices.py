"""Where the Triton kernel tests run: on a GPU, and on the CPU under Triton's interpreter
(TRITON_INTERPRET=1: test_triton_interpreter runs them that way), which checks logic, not speed,
races or bfloat16."""

import pytest
import torch

from server.models import fused

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def triton_or_skip(device: str, dtype: torch.dtype) -> None:
    """Skip unless server.models.fused runs its Triton kernels for `dtype` results on `device`."""
    if not fused.use_triton(torch.empty(0, device=device), dtype):
        pytest.skip("no Triton kernel here (on the CPU: TRITON_INTERPRET=1, not bfloat16)")
