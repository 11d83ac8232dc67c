"""CPU backend "cpu_int4": GPTQ 4/8-bit weights multiplied without ever dequantising them.

At load, `prepare` repacks a QuantLinear's GPTQ buffers (left untouched) into the layout of
csrc/cpu/gptq_cpu.cpp: output columns in blocks of 16, each block's codes a contiguous stream of
64-byte rows (one 32-bit word per column), per-K-block fp16 scales and uint8 TRUE zeros (dropped
when every zero is the symmetric 2^(b-1)). Act-order layers have their rows sorted by group, so every
K-block lies inside one group; the kernel gathers x through the inverse order (`perm`) as it
quantises it, so no extra pass over the activations.

Every call quantises x to int8 per (row, K-block) with a symmetric absmax scale (as llama.cpp's
Q8 activations) and runs an integer dot product (AVX-512 VNNI / AVX2 / NEON dotprod / scalar C++,
chosen at compile time with -march=native). That adds a rounding error of about 0.5% of the
output's scale on top of the weights' own; `tests/kernels/test_cpu_int4.py` bounds it and the
bench reports its perplexity effect.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch

from quant import ext
from quant.format import effective_group_size
from quant.groups import GroupOrderError, group_sort_perm
from quant.pack import unpack_qweight, unpack_qzeros

log = logging.getLogger("quantserve.kernels")

COLS = 16  # output columns per packed block (kernel constant)
MAX_BLOCK_K = 128  # largest K-block sharing one activation scale
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512-vnni", 3: "neon-dot"}


def extension_spec() -> ext.ExtensionSpec:
    cflags = ["-O3", "-ffp-contract=off"]  # no FMA contraction: the rounding tests emulate it bit for bit
    ldflags: list[str] = []
    if sys.platform.startswith("linux"):
        # the kernel threads with OpenMP (the libgomp torch already loaded, same soname)
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    if _march_native_ok():
        cflags.append("-march=native")
    return ext.ExtensionSpec(name="quantserve_cpu", sources=("cpu/gptq_cpu.cpp", "cpu/decode_ops.cpp"),
                             cflags=tuple(cflags), ldflags=tuple(ldflags), headers=("cpu/cpu_common.h", "cpu/gemm_tiles.h"))


def _march_native_ok() -> bool:
    import platform

    # Apple clang has no -march=native on arm64 before clang 15; NEON is on by default there.
    return not (sys.platform == "darwin" and platform.machine() == "arm64")


_MODULE = None
_LOAD_ERROR: str | None = None


def module():
    """The compiled extension (built at first use), or raises ext.ExtensionError."""
    global _MODULE, _LOAD_ERROR
    if _MODULE is None:
        if _LOAD_ERROR is not None:
            raise ext.ExtensionError(_LOAD_ERROR)
        try:
            _MODULE = ext.load(extension_spec())
        except ext.ExtensionError as exc:
            _LOAD_ERROR = str(exc)
            raise
        log.info("kernels: cpu_int4 uses the %s path", ISA_NAMES.get(_MODULE.best_isa(), "?"))
    return _MODULE


def block_k_for(in_features: int, group_size: int, bits: int) -> int | None:
    """Rows per K-block: the group size (or a divisor of it up to 128); None if none fits."""
    gs = effective_group_size(in_features, group_size)
    word = 32 // bits
    if group_size == -1:
        return min(MAX_BLOCK_K, -(-in_features // word) * word)
    for b in (gs, 128, 64, 32, 16, 8):
        if b <= MAX_BLOCK_K and gs % b == 0 and b % word == 0:
            return b
    return None


@dataclass
class CpuInt4State:
    """The repacked weights (see csrc/cpu/gptq_cpu.cpp for the layout)."""

    qweight: torch.Tensor  # uint8 [n_blocks, k * bits / 8 * 16 / ... ] flat per block
    scales: torch.Tensor  # float16 [n_blocks, num_kb, 16]
    zeros: torch.Tensor | None  # uint8 [n_blocks, num_kb, 16], None when symmetric
    perm: torch.Tensor | None  # int32 [k]: kernel row i is input channel perm[i]; None if identity
    bias: torch.Tensor | None  # float32 [n]
    bits: int
    block_k: int
    isa: int
    k: int
    n: int

    def __post_init__(self) -> None:
        # The per-call constants, resolved once: decode calls this ~200 times per token.
        self.ptrs = tuple(0 if t is None else t.data_ptr()
                          for t in (self.qweight, self.scales, self.zeros, self.perm, self.bias))


def _irregular_groups(layer) -> str | None:
    try:
        group_sort_perm(layer.g_idx, layer.in_features, layer.group_size)
    except GroupOrderError as exc:
        return str(exc)
    return None


def repack(layer, isa: int) -> CpuInt4State:
    """QuantLinear (GPTQ buffers on the CPU) -> CpuInt4State. Rows sorted by group if act-order."""
    k, n, bits = layer.in_features, layer.out_features, layer.bits
    block_k = block_k_for(k, layer.group_size, bits)
    perm = group_sort_perm(layer.g_idx, k, layer.group_size)  # rows sorted by group (act-order)
    groups = torch.arange(k) // effective_group_size(k, layer.group_size)  # each row's group, after
    codes = unpack_qweight(layer.qweight, bits, k)  # [K, N]
    if perm is not None:
        codes = codes[perm]
    zeros = unpack_qzeros(layer.qzeros, bits, n, layer.checkpoint_format)  # TRUE zeros [G, N]
    n_blocks = -(-n // COLS)
    n_pad = n_blocks * COLS
    num_kb = -(-k // block_k)
    block_group = groups[torch.arange(num_kb) * block_k]  # every K-block lies in one group
    scales = torch.zeros(num_kb, n_pad, dtype=torch.float16)
    scales[:, :n] = layer.scales[block_group].to(torch.float16)
    zb = torch.zeros(num_kb, n_pad, dtype=torch.uint8)
    zb[:, :n] = zeros[block_group].to(torch.uint8)
    sym = bool((zeros == 1 << (bits - 1)).all())

    c = torch.zeros(k, n_pad, dtype=torch.uint8)
    c[:, :n] = codes.to(torch.uint8)
    c = c.view(k, n_blocks, COLS)
    if bits == 4:  # byte b of word w = code(8w+b) | code(8w+4+b) << 4
        c = c.view(k // 8, 2, 4, n_blocks, COLS)
        packed = c[:, 0] | (c[:, 1] << 4)  # [K/8, 4, n_blocks, 16]
    else:  # byte b of word w = code(4w+b)
        packed = c.view(k // 4, 4, n_blocks, COLS)
    # -> [n_blocks, words, 16 columns, 4 bytes]
    packed = packed.permute(2, 0, 3, 1).contiguous().view(n_blocks, -1)
    return CpuInt4State(
        qweight=packed,
        scales=scales.view(num_kb, n_blocks, COLS).transpose(0, 1).contiguous(),
        zeros=None if sym else zb.view(num_kb, n_blocks, COLS).transpose(0, 1).contiguous(),
        perm=None if perm is None else perm.to(torch.int32).contiguous(),
        bias=None if layer.bias is None else layer.bias.float().contiguous(),
        bits=bits, block_k=block_k, isa=isa, k=k, n=n)


def gemm(state: CpuInt4State, x: torch.Tensor, n: int, isa: int | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 or bfloat16, contiguous, CPU -> y [M, N] in x.dtype (bias included).

    `out`, if given, must be a contiguous [M, N] tensor of x's dtype; it is written and returned.
    The caller (kernels.apply) has checked K and the device; the state was built by `repack`.
    """
    if x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"cpu_int4 takes contiguous 2-D float32/bfloat16 x, got {x.dtype} "
                         f"{tuple(x.shape)} contiguous={x.is_contiguous()}")
    m, k = x.shape
    if out is None:
        y = torch.empty(m, n, dtype=x.dtype)
    elif out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous [{m}, {n}] {x.dtype}, got {out.dtype} {tuple(out.shape)}")
    else:
        y = out
    if m == 0:
        return y
    if k != state.k or n != state.n:
        raise ValueError(f"x has K={k} and n={n} is asked, the packed weight is K={state.k} N={state.n}")
    module().gemm(x.data_ptr(), y.data_ptr(), *state.ptrs, m, k, n, state.bits, state.block_k,
                  state.isa if isa is None else isa, torch.get_num_threads(), x.dtype == torch.bfloat16)
    return y


class CpuInt4:
    """The packed-weight CPU backend (4- and 8-bit, any group size the format allows)."""

    name = "cpu_int4"

    def unsupported_reason(self, layer) -> str | None:
        if layer.qweight.device.type != "cpu":
            return f"runs on the CPU, layer is on {layer.qweight.device}"
        if layer.bits not in (4, 8):
            return f"bits={layer.bits} (only 4 and 8 are packed for the CPU kernel)"
        if block_k_for(layer.in_features, layer.group_size, layer.bits) is None:
            return f"group_size={layer.group_size} is not a multiple of {32 // layer.bits}"
        reason = _irregular_groups(layer)
        if reason:
            return reason
        try:
            module()
        except ext.ExtensionError as exc:
            return f"extension unavailable: {str(exc).splitlines()[0]}"
        return None

    def prepare(self, layer) -> CpuInt4State:
        return repack(layer, module().best_isa())

    def fast_forward(self, layer, state: CpuInt4State):
        """QuantLinear.forward's shortcut for the common call (x a contiguous float32/bfloat16
        [M, K] CPU tensor): the kernel without kernels.apply's dispatch, ~4 us a call less (120+
        calls a decode step). Returns None for any other x, which then takes kernels.apply."""
        gemm = module().gemm
        ptrs, k, n, bits, block_k, isa = state.ptrs, state.k, state.n, state.bits, state.block_k, state.isa
        f32, bf16, empty, threads = torch.float32, torch.bfloat16, torch.empty, torch.get_num_threads

        def forward(x: torch.Tensor, _keep=state) -> torch.Tensor | None:  # _keep: the packed tensors
            dtype = x.dtype
            if (not x.is_cpu or x.dim() != 2 or x.shape[1] != k or not x.is_contiguous()
                    or (dtype is not f32 and dtype is not bf16)):
                return None
            m = x.shape[0]
            y = empty(m, n, dtype=dtype)
            if m:
                gemm(x.data_ptr(), y.data_ptr(), *ptrs, m, k, n, bits, block_k, isa, threads(), dtype is bf16)
            return y

        return forward

    def apply(self, layer, state: CpuInt4State, x: torch.Tensor) -> torch.Tensor:
        # kernels.apply has checked K and the device and made x a contiguous [M, K]: the lean path.
        dtype = x.dtype
        if dtype is not torch.float32 and dtype is not torch.bfloat16:  # e.g. float16: via float32
            return gemm(state, x.float(), state.n).to(dtype)
        m = x.shape[0]
        y = torch.empty(m, state.n, dtype=dtype)
        if m:
            _MODULE.gemm(x.data_ptr(), y.data_ptr(), *state.ptrs, m, state.k, state.n, state.bits,
                         state.block_k, state.isa, torch.get_num_threads(), dtype is torch.bfloat16)
        return y
