"""The one definition of the GPTQ packed layout.

Everything that makes, stores, reads or multiplies packed weights imports from here: the quantizer,
the checkpoint reader/writer, `QuantLinear` and the kernels. Notation: K = in_features,
N = out_features, b = bits, pf = 32 // b values per int32 word (3-bit: 32 values per 3 words),
G = number of groups along K.

Per quantized linear `P` a checkpoint holds (GPTQ, transposed relative to nn.Linear.weight):

    P.qweight  int32   [K * b / 32, N]   codes packed along K, lowest channel in the lowest bits
    P.qzeros   int32   [G, N * b / 32]   zero points packed along N
    P.scales   float16 [G, N]
    P.g_idx    int32   [K]               group of every input channel
    P.bias     float16 [N]               only when the layer has a bias

Dequantisation: w[k, n] = scales[g, n] * (q[k, n] - z[g, n]) with g = g_idx[k] and z the TRUE zero.
checkpoint_format "gptq" (v1) stores z - 1 (masked to b bits); "gptq_v2" stores z itself.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_BITS = (2, 3, 4, 8)
FORMAT_V1 = "gptq"
FORMAT_V2 = "gptq_v2"
SUPPORTED_FORMATS = (FORMAT_V1, FORMAT_V2)
TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")

# Linear layers inside a Llama-family decoder block, in true-sequential order (GPTQ_FORMAT.md §6).
LLAMA_SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
    ("self_attn.o_proj",),
    ("mlp.up_proj", "mlp.gate_proj"),
    ("mlp.down_proj",),
)
LLAMA_LINEAR_NAMES: tuple[str, ...] = tuple(n for group in LLAMA_SEQUENTIAL_GROUPS for n in group)


class FormatError(ValueError):
    """A checkpoint or layer that this layout cannot represent; the message names the numbers."""


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"bits={bits} is not supported; supported: {SUPPORTED_BITS}")


def pack_factor(bits: int) -> int:
    """Values per int32 word for 2/4/8 bits. 3-bit packs 32 values per 3 words (see `packed_rows`)."""
    check_bits(bits)
    if bits == 3:
        raise FormatError("3-bit packs 32 values into 3 words; use packed_rows/pack_unit")
    return 32 // bits


def pack_unit(bits: int) -> tuple[int, int]:
    """(values, words): the smallest run of values that fills whole int32 words."""
    check_bits(bits)
    return (32, 3) if bits == 3 else (32 // bits, 1)


def packed_rows(num_values: int, bits: int) -> int:
    """Number of int32 words that hold `num_values` b-bit codes along one axis."""
    values, words = pack_unit(bits)
    if num_values % values:
        raise FormatError(f"{num_values} values cannot be packed at {bits} bits: "
                          f"needs a multiple of {values}")
    return num_values // values * words


def num_groups(in_features: int, group_size: int) -> int:
    """G = ceil(K / group_size); group_size -1 means one group over the whole of K."""
    if group_size == -1:
        return 1
    if group_size <= 0:
        raise FormatError(f"group_size must be -1 or positive, got {group_size}")
    return math.ceil(in_features / group_size)


def effective_group_size(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def sym_zero(bits: int) -> int:
    """The fixed zero point of symmetric quantisation: 2^(b-1)."""
    return 1 << (bits - 1)


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def zero_offset(checkpoint_format: str) -> int:
    """What the stored zero differs from the true zero by: v1 stores z - 1, v2 stores z."""
    if checkpoint_format == FORMAT_V1:
        return 1
    if checkpoint_format == FORMAT_V2:
        return 0
    raise FormatError(f"checkpoint_format {checkpoint_format!r} is not readable; "
                      f"supported: {SUPPORTED_FORMATS}")


@dataclass(frozen=True)
class LayerShape:
    """Shapes of one packed linear: the single source for allocating and checking buffers."""

    in_features: int  # K
    out_features: int  # N
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        check_bits(self.bits)
        packed_rows(self.in_features, self.bits)  # raises with the numbers when K is not packable
        packed_rows(self.out_features, self.bits)

    @property
    def num_groups(self) -> int:
        return num_groups(self.in_features, self.group_size)

    @property
    def qweight(self) -> tuple[int, int]:
        return (packed_rows(self.in_features, self.bits), self.out_features)

    @property
    def qzeros(self) -> tuple[int, int]:
        return (self.num_groups, packed_rows(self.out_features, self.bits))

    @property
    def scales(self) -> tuple[int, int]:
        return (self.num_groups, self.out_features)

    @property
    def g_idx(self) -> tuple[int]:
        return (self.in_features,)


@dataclass(frozen=True)
class QuantConfig:
    """GPTQ quantisation settings as stored in quantize_config.json / config.json.

    Every key is written explicitly on save (tools disagree on defaults for missing keys).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    damp_percent: float = 0.01
    checkpoint_format: str = FORMAT_V1
    lm_head: bool = False
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        num_groups(1, self.group_size)
        zero_offset(self.checkpoint_format)
        if not 0.0 < self.damp_percent < 1.0:
            raise FormatError(f"damp_percent must be in (0, 1), got {self.damp_percent}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "damp_percent": self.damp_percent,
            "lm_head": self.lm_head,
            "quant_method": "gptq",
            "checkpoint_format": self.checkpoint_format,
            "pack_dtype": "int32",
            "model_name_or_path": None,
            "model_file_base_name": "model",
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """Reads any of AutoGPTQ / GPTQModel / optimum / transformers' spellings.

        Missing `sym` / `desc_act` follow AutoGPTQ (sym=True, desc_act=False when absent in files that
        carry a g_idx; the loader checks g_idx itself). Unreadable formats raise FormatError.
        """
        method = d.get("quant_method", d.get("method", "gptq"))
        if str(method).lower() != "gptq":
            raise FormatError(f"quant_method {method!r} is not GPTQ; only GPTQ checkpoints are read")
        fmt = d.get("checkpoint_format", d.get("format", FORMAT_V1)) or FORMAT_V1
        fmt = str(fmt).lower()
        if d.get("is_marlin_format") or fmt in ("marlin", "marlin_24", "bitblas", "qqq", "gptq_marlin"):
            raise FormatError(f"checkpoint_format {fmt!r} is a kernel-specific layout; only 'gptq' and "
                              f"'gptq_v2' checkpoints are read (re-save it as GPTQ)")
        pack_dtype = str(d.get("pack_dtype", "int32")).replace("torch.", "")
        if pack_dtype != "int32":
            raise FormatError(f"pack_dtype {pack_dtype!r} is not supported; only int32 packing is read")
        if d.get("dynamic"):
            raise FormatError("per-module 'dynamic' quantization overrides are not supported")
        meta = d.get("meta") or {}
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in names if k in d and k not in ("checkpoint_format", "meta")}
        if kwargs.get("damp_percent") is None:
            kwargs.pop("damp_percent", None)
        if "group_size" in kwargs:
            kwargs["group_size"] = int(kwargs["group_size"])
        return cls(checkpoint_format=fmt, meta=dict(meta) if isinstance(meta, dict) else {}, **kwargs)

    def layer_shape(self, in_features: int, out_features: int) -> LayerShape:
        return LayerShape(in_features, out_features, self.bits, self.group_size)
