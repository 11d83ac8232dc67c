"""Sums: a quantized matmul's output left as fp32 sums for the kernel that reads it to convert.

At decode batch sizes the GEMV's split-K fix-up (the warp that completes a 64-column strip reads
the strip's fp32 accumulator back, writes y and zeroes the accumulator) is ~10% of the linears'
time (bench/NOTES.md). A backend may instead add the products into a zeroed fp32 buffer and return
`Sums`: the next kernel reads them, rounds them to `dtype` as y would have been rounded (so the
results are the same), and writes zeros back in the same pass. The engine's consumers do that
(server.models.fused: RMSNorm with residual, SwiGLU, the q/k/v rotary); any other reader calls
`materialize()`, which gives the tensor y would have been.

One buffer per device serves every layer, so at most one Sums is pending at a time: a matmul
that leaves sums while another Sums is still unread finds the buffer dirty and zeroes it first
(`SumsBuffer.claim`), which only happens when a reader never ran (an error between the two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False)
class SumsBuffer:
    """The device's fp32 buffer: all zero, except the [M, N] prefix of a pending Sums."""

    data: torch.Tensor  # float32 [floats], contiguous
    pending: bool = False

    def claim(self, m: int, n: int) -> torch.Tensor:
        """The zeroed [m, n] prefix for the next matmul; it stays pending until a reader releases it."""
        if m * n > self.data.numel():
            raise ValueError(f"sums buffer holds {self.data.numel()} floats, [{m}, {n}] needs {m * n}")
        if self.pending:  # the last Sums was never read: its values are still in the buffer
            self.data.zero_()
        self.pending = True
        return self.data[:m * n].view(m, n)


@dataclass(eq=False)
class Sums:
    """y of a matmul before its conversion: data float32 [M, N] (contiguous, bias not added, a view
    of the device's SumsBuffer); y = data.to(dtype). A reader converts it and zeroes data, then
    calls release()."""

    data: torch.Tensor
    dtype: torch.dtype
    buffer: SumsBuffer

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def release(self) -> None:
        """Called by the reader once its kernel (which zeroes data) is launched."""
        self.buffer.pending = False

    def materialize(self) -> torch.Tensor:
        """y [M, N] in dtype, exactly as the matmul would have returned it; zeroes the sums."""
        y = self.data.to(self.dtype, copy=True)  # a copy also when dtype is float32
        self.data.zero_()
        self.release()
        return y


def as_tensor(y: "torch.Tensor | Sums") -> torch.Tensor:
    """y itself, or a Sums converted to the tensor it stands for."""
    return y.materialize() if isinstance(y, Sums) else y
