"""Sums: a quantized matmul's output left as fp32 sums for the kernel that reads it to convert.

At decode batch sizes the GEMV's split-K fix-up (the warp that completes a 64-column strip reads
the strip's fp32 accumulator back, writes y and zeroes the accumulator) is ~10% of the linears'
time, and the Hopper GEMM's at 9-128 tokens ~20% (bench/NOTES.md). A backend may instead add the
products into a zeroed fp32 buffer and return `Sums`: the next kernel reads them, rounds them to
`dtype` as y would have been rounded (so the results are the same), and writes zeros back in the
same pass. The engine's consumers do that (server.models.fused: RMSNorm with residual, SwiGLU;
server.models.qkv_reader: the q/k/v rotary; the GEMM's [column][slot] sums through
server.models.column_sums); any other reader calls `materialize()`, which gives the tensor y would
have been.

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

    def claim(self, m: int, n: int, slots: int | None = None) -> torch.Tensor:
        """The zeroed [m, n] prefix for the next matmul; it stays pending until a reader releases it.
        slots: the matmul leaves [column][slot] sums (the Hopper GEMM: `slots` >= m token slots a
        column, those of tokens >= m left zero), and the view has strides (1, slots); else [m, n]
        rows."""
        need = n * (m if slots is None else slots)
        if need > self.data.numel() or (slots is not None and slots < m):
            raise ValueError(f"sums buffer holds {self.data.numel()} floats, [{m}, {n}]"
                             f"{'' if slots is None else f' in {slots} slots a column'} needs {need}")
        if self.pending:  # the last Sums was never read: its values are still in the buffer
            self.data.zero_()
        self.pending = True
        if slots is None:
            return self.data[:need].view(m, n)
        return self.data.as_strided((m, n), (1, slots))


@dataclass(eq=False)
class Sums:
    """y of a matmul before its conversion: data float32 [M, N] (bias not added, a view of the
    device's SumsBuffer: rows, or [column][slot] with strides (1, slots)); y = data.to(dtype). A
    reader converts it and zeroes data, then calls release()."""

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
        y = torch.empty(self.data.shape, dtype=self.dtype, device=self.data.device)  # rows, whatever data's strides
        y.copy_(self.data)
        self.data.zero_()
        self.release()
        return y


def as_tensor(y: "torch.Tensor | Sums") -> torch.Tensor:
    """y itself, or a Sums converted to the tensor it stands for."""
    return y.materialize() if isinstance(y, Sums) else y
