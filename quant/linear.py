"""QuantLinear: a GPTQ-packed linear layer whose forward is one call into `quant.kernels`.

The buffers are exactly the checkpoint's tensors (layout in `quant.format`), so a state dict loads
and saves unchanged. At load time `prepare()` asks `quant.kernels` for a backend, which may build a
repacked copy of the weights in its own layout (kept outside the state dict); the GPTQ buffers stay
as the source of truth for the self-check and for saving.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quant import kernels
from quant.format import FORMAT_V1, FORMAT_V2, LayerShape, QuantConfig
from quant.pack import dequantize, pack_qweight, pack_qzeros
from quant.quantizer import QuantResult

if TYPE_CHECKING:
    from quant.sums import Sums


class QuantLinear(nn.Module):
    """y = x @ W + b with W [K, N] stored as GPTQ int32 codes, fp16 scales and zeros.

    Input  x: [..., K] float16 / bfloat16 / float32.
    Output y: [..., N] in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, checkpoint_format: str = FORMAT_V1, sym: bool = True,
                 desc_act: bool = False) -> None:
        super().__init__()
        self.shape = LayerShape(in_features, out_features, bits, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.checkpoint_format = checkpoint_format
        self.sym = sym
        self.desc_act = desc_act
        self.register_buffer("qweight", torch.zeros(self.shape.qweight, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(self.shape.qzeros, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(self.shape.scales, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(self.shape.g_idx, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16))
        else:
            self.bias = None
        self.backend: str | None = None  # name of the kernel backend chosen by prepare()
        self.kernel_state: Any = None  # the backend's own (repacked) tensors
        # set while the GPTQ buffers sit in host memory because a backend keeps its own full copy
        # on this device (offload_packed); the layer still computes there
        self.compute_device: torch.device | None = None

    @classmethod
    def from_config(cls, in_features: int, out_features: int, config: QuantConfig,
                    bias: bool = False) -> "QuantLinear":
        return cls(in_features, out_features, config.bits, config.group_size, bias,
                   config.checkpoint_format, config.sym, config.desc_act)

    @classmethod
    def from_result(cls, result: QuantResult, config: QuantConfig,
                    bias: torch.Tensor | None = None) -> "QuantLinear":
        """Pack an unquantised-to-codes result into a layer (format from `config`)."""
        in_features, out_features = result.codes.shape
        layer = cls.from_config(in_features, out_features, config, bias=bias is not None)
        # pack where the codes are (a GPU packs a 7B model's layers in a blink), store on the CPU
        layer.qweight.copy_(pack_qweight(result.codes, config.bits).cpu())
        layer.qzeros.copy_(pack_qzeros(result.zeros, config.bits, config.checkpoint_format).cpu())
        layer.scales.copy_(result.scales.cpu().to(torch.float16))
        layer.g_idx.copy_(result.g_idx.cpu().to(torch.int32))
        if bias is not None:
            layer.bias.copy_(bias.detach().cpu().to(torch.float16))
        return layer

    @property
    def device(self) -> torch.device:
        """Where the layer computes: its buffers' device, or where they were before offloading."""
        return self.compute_device or self.qweight.device

    _PACKED = ("qweight", "qzeros", "scales", "g_idx")

    def offload_packed(self) -> None:
        """Move the GPTQ buffers to host memory: for backends whose device state is a complete
        repacked copy (the CUDA layout), so the GPU holds the weights once, not twice. A 70B
        model's 4-bit weights are 35 GB; twice that does not fit an 80 GB GPU."""
        if self.compute_device is not None or self.qweight.device.type == "cpu":
            return
        self.compute_device = self.qweight.device
        for name in self._PACKED:
            self._buffers[name] = self._buffers[name].cpu()

    def restore_packed(self) -> None:
        """Undo offload_packed (before a backend that reads the GPTQ buffers is prepared)."""
        if self.compute_device is None:
            return
        for name in self._PACKED:
            self._buffers[name] = self._buffers[name].to(self.compute_device)
        self.compute_device = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W in nn.Linear orientation [N, K], `dtype`, on the layer's device (offloaded buffers
        are copied there for the call)."""
        dev = self.device
        return dequantize(self.qweight.to(dev), self.qzeros.to(dev), self.scales.to(dev),
                          self.g_idx.to(dev), self.bits, self.checkpoint_format,
                          dtype=dtype).t().contiguous()

    def convert_format(self, checkpoint_format: str) -> None:
        """Rewrite qzeros in another zero convention (v1 <-> v2) in place."""
        from quant.pack import unpack_qzeros

        if checkpoint_format not in (FORMAT_V1, FORMAT_V2):
            raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}")
        zeros = unpack_qzeros(self.qzeros, self.bits, self.out_features, self.checkpoint_format)
        self.qzeros.copy_(pack_qzeros(zeros, self.bits, checkpoint_format))
        self.checkpoint_format = checkpoint_format

    def prepare(self, backend: str | None = None) -> str:
        """Pick and set up a kernel backend for this layer's device; returns its name."""
        return kernels.prepare(self, backend)

    # set by kernels.prepare when the backend has a shortcut for the common call (cpu_int4):
    # callable(x) -> y, or None for inputs it leaves to kernels.apply
    fast_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.fast_forward
        if fast is not None:
            y = fast(x)
            if y is not None:
                return y
        return kernels.apply(self, x)

    def forward_sums(self, x: torch.Tensor, columns: bool = False) -> "torch.Tensor | Sums":
        """y for x [M, K], or (a decode-sized call on a backend that can) y's fp32 sums left for the
        caller's next kernel to convert: quant.sums.Sums, whose reader must convert and zero it
        (columns: the reader takes the [column][token slot] layout as it is, kernels.apply_sums).
        A layer whose forward is replaced (the self-check's reference pass) or hooked goes through
        the module call, as plain forward does."""
        if (self.fast_forward is not None or x.dim() != 2 or "forward" in self.__dict__
                or self._forward_hooks or self._forward_pre_hooks):
            return self(x)
        return kernels.apply_sums(self, x, columns)

    def _apply(self, fn, recurse=True):
        # a move or cast (.to, .cuda, .float, ...): the shortcut was built for the old tensors
        self.fast_forward = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, desc_act={self.desc_act}, "
                f"format={self.checkpoint_format}, backend={self.backend}")
