"""What quantize_model reports: per-layer GPTQ loss and dampening, and time per stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from quant.format import QuantConfig


@dataclass
class LayerReport:
    """One quantised linear, in the order it was quantised."""

    name: str  # e.g. "model.layers.3.self_attn.q_proj"
    loss: float | None  # GPTQ's H-weighted error sum (w - q)^2 / Hinv_ii^2 / 2; None for RTN
    damp_percent: float | None  # dampening actually used (after retries); None for RTN
    seconds: float  # solve time (a stacked solve's time is shared out by output rows)


@dataclass
class StageTimes:
    """Wall seconds per stage, summed over layers."""

    capture: float = 0.0  # embeddings of the calibration samples (layer 0's inputs)
    forward: float = 0.0  # block forwards: to reach each group's inputs, and to propagate outputs
    hessians: float = 0.0  # Hessian accumulation inside the hooks (not counted in forward)
    solve: float = 0.0  # Cholesky factorisation + GPTQ column loop (or RTN)
    pack: float = 0.0  # codes -> QuantLinear buffers, module swap

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.__dict__.items()}


@dataclass
class QuantizeReport:
    method: str
    config: QuantConfig
    device: str
    num_samples: int
    seq_len: int
    order: str = "natural"  # GPTQ processing order: "natural", "act" or "group_act" (quant/gptq.py)
    layers: list[LayerReport] = field(default_factory=list)
    times: StageTimes = field(default_factory=StageTimes)
    seconds: float = 0.0

    def layer_loss(self, layer_idx: int) -> float:
        prefix = f"model.layers.{layer_idx}."
        return sum(r.loss or 0.0 for r in self.layers if r.name.startswith(prefix))
