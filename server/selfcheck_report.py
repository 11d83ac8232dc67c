"""What the start-up self-check reports (server.selfcheck runs it): per-layer kernel runs against
the float32 reference, the golden greedy decode, and the summary shown in /v1/models."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

COLUMN_FACTOR = 10.0  # worst column may be this many times the relative-error threshold


class SelfCheckError(RuntimeError):
    """The served model disagrees with the reference; the message names the layer and numbers."""


@dataclass(frozen=True)
class SelfCheckConfig:
    enabled: bool = True
    allow_fallback: bool = False
    ms: tuple[int, ...] = (1, 16)  # random-input batch sizes per layer
    golden_tokens: int = 8
    seed: int = 0


@dataclass
class LayerRun:
    """One layer, one input: how far its backend's output is from the float32 reference."""

    layer: str
    backend: str
    m: int
    source: str  # "random" | "prompt" (the golden prompt's real activations)
    rel_error: float
    column_error: float
    threshold: float
    error: str | None = None  # the backend raised

    @property
    def ok(self) -> bool:
        return (self.error is None and self.rel_error <= self.threshold
                and self.column_error <= self.threshold * COLUMN_FACTOR)

    def describe(self) -> str:
        if self.error is not None:
            return (f"layer {self.layer} on backend '{self.backend}' raised at M={self.m} "
                    f"({self.source} input): {self.error}")
        return (f"layer {self.layer} on backend '{self.backend}': relative error "
                f"{self.rel_error:.3g} (worst column {self.column_error:.3g}) at M={self.m} "
                f"({self.source} input), threshold {self.threshold:.3g} "
                f"(column {self.threshold * COLUMN_FACTOR:.3g})")


@dataclass
class GoldenResult:
    prompt_tokens: int
    generated_tokens: int
    positions: int  # positions compared (prompt targets + generated tokens)
    max_logprob_diff: float  # max |served - reference| over the served top tokens, nats
    max_greedy_gap: float  # max (reference best - reference of the picked token), nats
    argmax_agreement: float  # fraction of generated tokens equal to the reference's argmax
    tolerance: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.max_logprob_diff <= self.tolerance
                and self.max_greedy_gap <= self.tolerance)

    def describe(self) -> str:
        if self.error is not None:
            return f"golden greedy decode failed: {self.error}"
        return (f"golden greedy decode of {self.generated_tokens} tokens after a "
                f"{self.prompt_tokens}-token prompt: max |served - reference| logprob "
                f"{self.max_logprob_diff:.3g} nats, worst picked token {self.max_greedy_gap:.3g} "
                f"nats below the reference's best, tolerance {self.tolerance:.3g}; "
                f"{self.argmax_agreement:.0%} of tokens equal the reference's argmax")


@dataclass
class SelfCheckReport:
    status: str  # passed | fallback | skipped
    seconds: float = 0.0
    dtype: str = ""
    layers_checked: int = 0
    ms: tuple[int, ...] = ()
    max_rel_error: dict[str, float] = field(default_factory=dict)  # backend -> worst over layers
    failures: list[LayerRun] = field(default_factory=list)
    golden: GoldenResult | None = None
    fallbacks: dict[str, int] = field(default_factory=dict)  # failing backend -> layers moved

    def to_dict(self) -> dict:
        """The JSON shown under /v1/models' quantization.self_check."""
        out = {"status": self.status, "seconds": round(self.seconds, 3), "dtype": self.dtype,
               "layers_checked": self.layers_checked, "m_values": list(self.ms),
               "max_relative_error": {k: float(f"{v:.3g}") for k, v in self.max_rel_error.items()},
               "fallbacks": dict(self.fallbacks),
               "failures": [r.describe() for r in self.failures[:20]]}
        if self.golden is not None:
            g = asdict(self.golden)
            out["golden"] = {k: (float(f"{v:.3g}") if isinstance(v, float) else v)
                             for k, v in g.items()}
        return out
