"""Kernel backends for QuantLinear and the one place that chooses between them.

A backend turns a layer's GPTQ buffers into whatever it multiplies fastest (`prepare`, once, at
load) and computes y = x @ W + b (`apply`, every forward). Backends are tried in preference order
for the layer's device; the first that accepts the layer wins, and the choice is recorded on the
layer (`layer.backend`) so the server can export how many layers each backend got.

Shapes and dtypes are checked here once, at the boundary; backends trust their inputs.

Built-in backends:
    torch  reference: dequantise in float32 on every call (slow, exact; the self-check's yardstick)
    dense  dequantise once at load into the activation dtype and call the dense matmul
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

if TYPE_CHECKING:
    from quant.linear import QuantLinear
    from quant.sums import Sums


class KernelError(RuntimeError):
    """A backend cannot take a layer or an input; the message gives the numbers."""


class Backend(Protocol):
    name: str

    def unsupported_reason(self, layer: "QuantLinear") -> str | None:
        """None when the backend can run `layer` on its current device, else why not."""

    def prepare(self, layer: "QuantLinear") -> Any:
        """Build the backend's own state (e.g. repacked weights) from the layer's GPTQ buffers."""

    def apply(self, layer: "QuantLinear", state: Any, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (contiguous, layer's device) -> y [M, N] in x.dtype, bias included."""

    # Optional: fast_forward(layer, state) -> callable(x) -> y, or None for an x it does not
    # take (checks its own inputs; QuantLinear.forward tries it before apply). cpu_int4 has one.
    # Optional: apply_sums(layer, state, x, columns) -> quant.sums.Sums, or None for an x it leaves
    # to apply (QuantLinear.forward_sums tries it first; columns: the caller's reader takes sums in
    # the [column][token slot] layout as they are). cuda has one, for decode-sized calls.


@dataclass
class _Entry:
    backend: Backend
    device_types: tuple[str, ...]
    priority: int  # lower runs first


_REGISTRY: dict[str, _Entry] = {}
_LOADERS: list[Callable[[], None]] = []


def register(backend: Backend, device_types: tuple[str, ...], priority: int) -> None:
    _REGISTRY[backend.name] = _Entry(backend, device_types, priority)


def register_loader(loader: Callable[[], None]) -> None:
    """A function that registers optional (compiled) backends the first time dispatch needs them."""
    _LOADERS.append(loader)


def _load_optional() -> None:
    while _LOADERS:
        _LOADERS.pop(0)()


def available(device_type: str) -> list[str]:
    """Backend names usable on a device type, in preference order."""
    _load_optional()
    entries = [e for e in _REGISTRY.values() if device_type in e.device_types]
    return [e.backend.name for e in sorted(entries, key=lambda e: e.priority)]


def prepare(layer: "QuantLinear", backend: str | None = None) -> str:
    """Choose a backend for `layer` (or use the one named) and build its state. Returns the name."""
    layer.restore_packed()  # backends read the GPTQ buffers on the layer's device
    device_type = layer.qweight.device.type
    _load_optional()  # a backend named before any dispatch must be registered too
    names = [backend] if backend else available(device_type)
    reasons = []
    for name in names:
        entry = _REGISTRY.get(name)
        if entry is None:
            raise KernelError(f"unknown kernel backend {name!r}; known: {sorted(_REGISTRY)}")
        if device_type not in entry.device_types:
            reason = f"runs on {entry.device_types}, layer is on {device_type}"
        else:
            reason = entry.backend.unsupported_reason(layer)
        if reason is None:
            layer.kernel_state = entry.backend.prepare(layer)
            layer.backend = name
            # optional shortcut QuantLinear.forward tries first (returns None to come back here)
            fast = getattr(entry.backend, "fast_forward", None)
            layer.fast_forward = fast(layer, layer.kernel_state) if fast is not None else None
            return name
        reasons.append(f"{name}: {reason}")
    raise KernelError(f"no kernel backend takes layer K={layer.in_features} N={layer.out_features} "
                      f"bits={layer.bits} group_size={layer.group_size} on {device_type}: "
                      + "; ".join(reasons))


def apply(layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> y [..., N] in x.dtype, through the layer's backend (prepared on first use)."""
    if x.shape[-1] != layer.in_features:
        raise KernelError(f"input has {x.shape[-1]} features, layer expects K={layer.in_features}")
    if x.device != layer.device:
        raise KernelError(f"input on {x.device}, layer on {layer.device}")
    if layer.backend is None or layer.kernel_state is None:
        prepare(layer)
    if x.dim() == 2 and x.is_contiguous():  # the decode/prefill shape: no reshapes (~3 us a call)
        return _REGISTRY[layer.backend].backend.apply(layer, layer.kernel_state, x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = _REGISTRY[layer.backend].backend.apply(layer, layer.kernel_state, x2)
    return y.reshape(*lead, layer.out_features)


def apply_sums(layer: "QuantLinear", x: torch.Tensor, columns: bool = False) -> "torch.Tensor | Sums":
    """As apply, but the backend may leave y unconverted (quant.sums.Sums: fp32 [M, N], no bias) for
    the caller's next kernel to convert; x [M, K] 2-D. columns: that kernel takes sums in the
    [column][token slot] layout as they are (server.models.column_sums.is_columns), so the backend
    may prefer a kernel that leaves them so. Backends without apply_sums, and inputs a backend's
    apply_sums does not take, return y as apply does."""
    if layer.backend is None or layer.kernel_state is None:
        prepare(layer)
    fn = getattr(_REGISTRY[layer.backend].backend, "apply_sums", None)
    if (fn is not None and x.dim() == 2 and x.is_contiguous() and x.shape[1] == layer.in_features
            and x.device == layer.device):
        sums = fn(layer, layer.kernel_state, x, columns)
        if sums is not None:
            return sums
    return apply(layer, x)


def reference(layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
    """The float32 torch reference, whatever backend the layer uses: y [..., N] in float32."""
    w = layer.dequantize(torch.float32)  # [N, K]
    y = x.float() @ w.t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y


def backend_counts(model: torch.nn.Module) -> dict[str, int]:
    """How many QuantLinear layers each backend got (None -> 'unprepared')."""
    from quant.linear import QuantLinear

    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            key = m.backend or "unprepared"
            counts[key] = counts.get(key, 0) + 1
    return counts


def prepare_model(model: torch.nn.Module, backend: str | None = None) -> dict[str, int]:
    """Prepare every QuantLinear in `model` (already on its device); returns backend_counts."""
    from quant.linear import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            prepare(m, backend)
    return backend_counts(model)


class TorchReference:
    """Dequantise in float32 on every call. Exact and slow: the yardstick, and the last resort."""

    name = "torch"

    def unsupported_reason(self, layer: "QuantLinear") -> str | None:
        return None

    def prepare(self, layer: "QuantLinear") -> Any:
        return True

    def apply(self, layer: "QuantLinear", state: Any, x: torch.Tensor) -> torch.Tensor:
        return reference(layer, x).to(x.dtype)


class Dense:
    """Dequantise once per activation dtype, then a dense matmul. Fast, but the weights lose their
    compression in memory: the fallback where no packed kernel exists for the device."""

    name = "dense"

    def unsupported_reason(self, layer: "QuantLinear") -> str | None:
        return None

    def prepare(self, layer: "QuantLinear") -> dict[torch.dtype, torch.Tensor]:
        return {}

    def apply(self, layer: "QuantLinear", state: dict[torch.dtype, torch.Tensor],
              x: torch.Tensor) -> torch.Tensor:
        w = state.get(x.dtype)
        if w is None:
            w = state[x.dtype] = layer.dequantize(torch.float32).to(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return torch.nn.functional.linear(x, w, bias)


register(Dense(), ("cpu", "cuda"), priority=50)
register(TorchReference(), ("cpu", "cuda"), priority=100)


def _load_cpu_int4() -> None:
    """The packed CPU kernel; its extension builds the first time a CPU layer is prepared."""
    from quant.cpu_int4 import CpuInt4

    register(CpuInt4(), ("cpu",), priority=20)


register_loader(_load_cpu_int4)

# Compiled backends register loaders on import; nothing is built until a layer needs them.
from quant.backends import cuda as _cuda_backend  # noqa: E402,F401
