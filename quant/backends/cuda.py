"""The "cuda" kernel backend: fused int4/int8 dequant GEMV (M <= 32), tensor-core GEMM (M > 32;
on Hopper the wgmma kernel from WGMMA_MIN_M tokens, the mma.sync one elsewhere), and from DEQUANT_MIN_M
tokens (prefill) dequantise-to-scratch + cuBLAS.

Registered for device type "cuda" with priority 10 (ahead of `dense`, 50) through a loader, so the
extension `quantserve_cuda` (csrc/, JIT-built by quant/ext.py) is compiled only when the first CUDA
layer is prepared. A layer it cannot take (compute capability < 8.0, a group size that is not a power
of two >= 16, an act-order g_idx whose groups are not runs of group_size rows, a failed build) is
refused by `unsupported_reason` and falls to `dense`, which kernels.backend_counts records.

Per call: x [M, K] fp16/bf16 -> y [M, N] in x.dtype, bias included. Act-order layers: x[:, perm]
is gathered first by our gather kernel (cheaper than the GEMV reading x through the permutation
as it loads it, which v3-v9 could do and v10 removed). float32
inputs take a dense path (dequantised once, cached), since the kernels multiply in 16-bit. M > 32
calls on GPUs whose shared memory fits no GEMM tile (sm_86/sm_89: 99 KB per block) take the
dequantise + cuBLAS path (no cached dense copy). On sm_90 the GEMV launches with
programmatic dependent launch (its weights stream into L2 during the previous kernel's tail), and
so does the act-order gather (the kernel after it starts copying its weights during it);
QUANTSERVE_GEMV_PDL=0 turns both off; QUANTSERVE_GEMM_WGMMA=0 keeps Hopper on the mma.sync GEMM.
On sm_90, calls of up to PIPE_MAX_M tokens whose layer fits it (4-bit with groups of >= 128, 8-bit
with groups of >= 64; symmetric or not up to 8 tokens, symmetric only at 9-16) take the GEMV that
keeps each warp's next chunk in flight (csrc/gemv_pipe.cuh), where at 9-16 tokens the wgmma GEMM
would otherwise run;
QUANTSERVE_GEMV_PIPELINE=0 keeps them on the register GEMV (and 9-16 tokens on the wgmma GEMM).
`apply_sums` (QuantLinear.forward_sums) lets a GEMV call of up to SUMS_MAX_M tokens leave its fp32
sums for the caller's next kernel to convert (quant/sums.py), skipping the split-K fix-up;
QUANTSERVE_GEMV_SUMS=0 turns that off. A Hopper wgmma call of 17-128 tokens that writes y, on a
layer whose tiles the grid splits over 4 blocks or more, is the GEMM leaving its sums in the strip
accumulators and a second kernel writing y from them (csrc/sums_to_y.cuh) instead of the GEMM's
split-K fix-up; QUANTSERVE_GEMM_Y_SUMS=0 or gemm_launch_options(y_sums=False) keep the fix-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from quant import kernels
from quant.backends import cuda_build, cuda_dequant, cuda_layout, cuda_route
from quant.backends.cuda_dequant import DEQUANT_MIN_M, DEQUANT_SCRATCH_BYTES, scratch_bytes, strip_bytes
from quant.backends.cuda_layout import CudaLayout, LayoutError
# Re-exported for readers of the backend; the switches (COLUMN_SUMS, GEMV_SUMS, GEMM_SUMS) are read
# from cuda_route itself, so that pick_op and sums_op see one setting.
from quant.backends.cuda_route import (  # noqa: F401
    COLUMN_SUMS, GEMM_SUMS, GEMM_SUMS_MAX_M, GEMV_MAX_M, GEMV_SUMS, PIPE_MAX_M, PIPE_Y_MAX_M, SUMS_MAX_M,
    WGMMA_MIN_M, pick_op)
from quant.ext import ExtensionError, load
from quant.sums import Sums, SumsBuffer

if TYPE_CHECKING:
    from quant.linear import QuantLinear


PRIORITY = 10
ACCUM_MIN_N = 32768  # strip accumulators sized for at least this many output columns (32 MB)
# Act-order layers: every call gathers x[:, perm] with our gather kernel first (gather_cols), which
# launches with programmatic dependent launch on sm_90. v3-v9 also had the GEMV read x through the
# permutation itself (the "fused" gather; removed in v10, with its GEMV instantiations). H100, extra us
# per call over the same layer without act-order, gather kernel / fused / torch index_select
# (results/act-order-gather-*.json): 4096x4096 M=1 1.49 / 2.16 / 6.52, M=8 1.38 / 3.85 / 6.69, M=64
# 1.61 / - / 7.32; 11008x4096 M=1 2.07 / 6.14 / 6.90, M=64 5.54 / - / 10.14; 4096x12288 M=1
# 1.75 / 6.30 / 6.90. Without PDL (the GPUs before sm_90): ~2.1 / 3.1-6.1 / ~4.7 at M=1.
_EXT = None
_EXT_ERROR: str | None = None
_LOCK = threading.Lock()
_WORKSPACE: dict[int, "Workspace"] = {}
_RETIRED: list["Workspace"] = []  # outgrown accumulators stay alive: a captured graph may hold them


def extension():
    """The built extension module (built on first use), or raises ExtensionError."""
    global _EXT, _EXT_ERROR
    with _LOCK:
        if _EXT is not None:
            return _EXT
        if _EXT_ERROR is not None:
            raise ExtensionError(_EXT_ERROR)
        try:
            ext = load(cuda_build.extension_spec())
            if os.environ.get("QUANTSERVE_GEMV_PDL", "1") == "0":  # escape hatch: no PDL launches
                ext.gemv_set_options(False, *ext.gemv_get_options()[1:])
            if os.environ.get("QUANTSERVE_GEMV_PIPELINE", "1") == "0":  # escape hatch: register GEMV only
                ext.gemv_set_options(*ext.gemv_get_options()[:2], False)
            if os.environ.get("QUANTSERVE_GEMM_WGMMA", "1") == "0":  # escape hatch: no wgmma GEMM
                ext.gemm_set_options(False, *ext.gemm_get_options()[1:])
            if os.environ.get("QUANTSERVE_GEMM_Y_SUMS", "1") == "0":  # y through the GEMM's own fix-up
                ext.gemm_set_options(*ext.gemm_get_options()[:2], False)
            _EXT = ext
        except Exception as exc:  # noqa: BLE001 - the reason is reported per layer
            _EXT_ERROR = str(exc)
            raise ExtensionError(_EXT_ERROR) from exc
        return _EXT


@dataclass
class Workspace:
    """Split-K state of one device: mma.sync GEMM partial tiles (float32, any content) with arrival
    counters (`partials` also holds the Hopper wgmma GEMM's per-block split-K slots, about 35 MB on
    an H200, counted in `accum_counters`), the strip accumulators of the GEMV and the Hopper wgmma
    GEMM (float32, 64 columns x up to 256 tokens per strip) with counters, and the buffer of the
    GEMV calls that leave their fp32 sums to the reader (apply_sums). Counters and accumulators are
    zero and the kernels leave them zero, so one set serves every layer of a stream (concurrent
    streams on one device would need one each). `scratch` (uint8, any content) holds the
    dequantised 16-bit chunk of a large-M call. Sized at prepare time, so a CUDA graph captured
    later keeps valid pointers; outgrown buffers are retired, not freed."""

    partials: torch.Tensor
    counters: torch.Tensor
    accum: torch.Tensor
    accum_counters: torch.Tensor
    scratch: torch.Tensor
    sums: SumsBuffer  # float32, SUMS_MAX_M x the widest layer: the GEMV calls that leave their sums


def _device_index(device: torch.device | int | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    d = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return d.index if d.index is not None else torch.cuda.current_device()


def _strips(n: int) -> int:
    return (max(n, ACCUM_MIN_N) + 63) // 64


def workspace(device: torch.device, n: int = 0, scratch: int = 0) -> Workspace:
    """The device's Workspace, grown to take GEMV layers with n output columns and dequant_matmul
    chunks of `scratch` bytes."""
    index = _device_index(device)
    ext = extension()
    ws = _WORKSPACE.get(index)
    dev = f"cuda:{index}"
    need_accum = ext.gemv_accum_floats(max(n, ACCUM_MIN_N))
    need_sums = max(SUMS_MAX_M, GEMM_SUMS_MAX_M) * 64 * _strips(n)
    if ws is None:
        floats, counters = ext.workspace_need(index)
        ws = Workspace(torch.empty(floats, dtype=torch.float32, device=dev),
                       torch.zeros(counters, dtype=torch.int32, device=dev),
                       torch.zeros(need_accum, dtype=torch.float32, device=dev),
                       torch.zeros(_strips(n), dtype=torch.int32, device=dev),
                       torch.empty(scratch, dtype=torch.uint8, device=dev),
                       SumsBuffer(torch.zeros(need_sums, dtype=torch.float32, device=dev)))
        _WORKSPACE[index] = ws
        return ws
    if ws.accum.numel() < need_accum or ws.scratch.numel() < scratch:
        _RETIRED.append(dataclasses.replace(ws))
    if ws.accum.numel() < need_accum:
        ws.accum = torch.zeros(need_accum, dtype=torch.float32, device=dev)
        ws.accum_counters = torch.zeros(_strips(n), dtype=torch.int32, device=dev)
        ws.sums = SumsBuffer(torch.zeros(need_sums, dtype=torch.float32, device=dev))
    if ws.scratch.numel() < scratch:
        ws.scratch = torch.empty(scratch, dtype=torch.uint8, device=dev)
    return ws


class CudaBackend:
    """GEMV for M <= gemv_max_m, GEMM above (on Hopper from WGMMA_MIN_M tokens, where the wgmma GEMM
    is faster than the GEMV); both read the CudaLayout built by `prepare`."""

    name = "cuda"
    gemv_max_m = GEMV_MAX_M

    def unsupported_reason(self, layer: "QuantLinear") -> str | None:
        if not torch.cuda.is_available():
            return "CUDA is not available"
        device = layer.qweight.device
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"needs compute capability >= 8.0 (tensor-core bf16/fp16 mma), device has {major}.x"
        if layer.bits == 8 and layer.in_features % 8:
            return f"8-bit needs K % 8 == 0 (16-byte activation rows), got K={layer.in_features}"
        try:
            cuda_layout.group_shift(layer.in_features, layer.group_size)
            cuda_layout.act_order_perm(layer.g_idx, layer.in_features, layer.group_size)
        except LayoutError as exc:
            return str(exc)
        try:
            extension()
        except ExtensionError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
            return f"extension quantserve_cuda unavailable: {first}"
        return None

    def prepare(self, layer: "QuantLinear") -> CudaLayout:
        with torch.cuda.device(layer.qweight.device):
            state = cuda_layout.build(layer)
            workspace(layer.qweight.device, layer.out_features,
                      scratch_bytes(*state.qweight.shape[:2]))
        layer.offload_packed()  # the layout is a complete copy: keep the weights once on the GPU
        return state

    def apply(self, layer: "QuantLinear", state: CudaLayout, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in state.constants:
            return self._dense(layer, state, x)
        if x.shape[0] > self.gemv_max_m and workspace(x.device).partials.numel() == 0:
            return matmul(state, x, op="dequant")  # no GEMM tile fits this GPU's shared memory
        return matmul(state, x)

    def apply_sums(self, layer: "QuantLinear", state: CudaLayout, x: torch.Tensor,
                   columns: bool = False) -> Sums | None:
        """y's fp32 sums (quant.sums.Sums) for a call that sums_op says leaves them (the GEMV up to
        SUMS_MAX_M tokens, the Hopper wgmma GEMM up to GEMM_SUMS_MAX_M; columns: the reader takes
        the GEMM's layout as it is): x fp16/bf16 [M, K], no bias. None for any other call (apply
        takes it)."""
        op = None
        if x.shape[0] > 0 and layer.bias is None and x.dtype in state.constants:
            op = sums_op(x.shape[0], state, x.device, columns)
        if op is None:
            return None
        return matmul_sums(state, x, op)

    @staticmethod
    def _dense(layer: "QuantLinear", state: CudaLayout, x: torch.Tensor) -> torch.Tensor:
        w = state.dense.get(x.dtype)
        if w is None:
            w = state.dense[x.dtype] = layer.dequantize(torch.float32).to(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return torch.nn.functional.linear(x, w, bias)


@contextlib.contextmanager
def _scoped_options(get: Callable[[], tuple], set_: Callable[..., None], new: tuple):
    """Set process-wide extension options for the duration: `new` holds one value per option, None
    keeping that option as it is; the previous options come back on exit, also on an error."""
    saved = get()
    set_(*(old if value is None else value for old, value in zip(saved, new)))
    try:
        yield
    finally:
        set_(*saved)


def gemm_launch_options(wgmma: bool | None = None, pdl: bool | None = None, y_sums: bool | None = None):
    """For the duration (process-wide, so before capturing a graph): wgmma lets Hopper GEMM calls
    use the wgmma kernel (True, the default) or sends every GEMM call to the
    mma.sync kernel (False); pdl launches the wgmma kernel with programmatic dependent launch (True,
    the default: its first weight stages are copied while the kernel before it finishes) or
    without; y_sums (True, the default) runs a wgmma call of 17-GEMM_SUMS_MAX_M tokens that
    writes y (n a multiple of 8, tiles split over 4 blocks or more) as the GEMM leaving its sums in the strip accumulators and a
    second kernel writing y from them, False as the GEMM with its own split-K fix-up. None keeps
    an option as it is; the previous options come back on exit."""
    ext = extension()
    return _scoped_options(ext.gemm_get_options, ext.gemm_set_options, (wgmma, pdl, y_sums))


_WGMMA: dict[int, bool] = {}


def wgmma_available(device: torch.device | int | None = None) -> bool:
    """Whether GEMM calls on this device run the sm_90a wgmma kernel: the device has it (asked of
    the extension once per device) and the launch option allows it (QUANTSERVE_GEMM_WGMMA=0 or
    gemm_launch_options(wgmma=False) turn it off, and then 9-32-token calls take the GEMV, not the
    mma.sync GEMM)."""
    index = _device_index(device)
    found = _WGMMA.get(index)
    if found is None:
        found = _WGMMA[index] = bool(extension().wgmma_available(index))
    return found and bool(extension().gemm_get_options()[0])


def gemv_launch_options(pdl: bool | None = None, wave_div: int | None = None, pipeline: bool | None = None):
    """Set the GEMV launch options for the duration (process-wide, so before capturing a graph);
    None keeps an option as it is. The previous options come back on exit. pipeline: whether calls
    of up to 16 tokens on sm_90+ that fit it take the kernel with a warp's next chunk in flight."""
    ext = extension()

    def set_(*options) -> None:
        _PIPE_TAKES.clear()  # its answers hold for the options they were asked under
        ext.gemv_set_options(*options)

    return _scoped_options(ext.gemv_get_options, set_, (pdl, wave_div, pipeline))


# pipe_takes's answers per (device, m, bits, group shift, zeros), asked of the extension once each
# (which switches to the device and back): they hold while the GEMV options do, and
# gemv_launch_options clears them when it sets options.
_PIPE_TAKES: dict[tuple[int, int, int, int, bool], bool] = {}


def pipe_takes(state: CudaLayout, m: int, device: torch.device | int | None = None) -> bool:
    """Whether a GEMV call of m tokens on this layer runs the pipelined kernel on the device (its
    width, group size, zeros (above 8 tokens only layers without), the compute capability and the
    launch option `pipeline`)."""
    has_zeros = any(zeros is not None for _, zeros, _ in state.constants.values())
    key = (_device_index(device), m, state.bits, state.group_shift, has_zeros)
    found = _PIPE_TAKES.get(key)
    if found is None:
        found = _PIPE_TAKES[key] = bool(extension().gemv_pipe_takes(*key))
    return found


def _pick(state: CudaLayout, m: int, device: torch.device, sums: bool = False, columns: bool = False) -> str:
    return pick_op(m, lambda: wgmma_available(device), lambda: pipe_takes(state, m, device), sums, columns)


_GATHER_PDL = os.environ.get("QUANTSERVE_GEMV_PDL", "1") != "0"


def gather_cols(x: torch.Tensor, state: CudaLayout) -> torch.Tensor:
    """x[:, perm] of an act-order layer (x fp16/bf16 [M, K] contiguous): our gather kernel, launched
    with programmatic dependent launch on sm_90 so the kernels on both sides overlap it;
    index_select where it cannot take the call (K not a multiple of 8, a misaligned permutation)."""
    perm = state.perm32
    if x.shape[1] % 8 or perm.data_ptr() % 16 or not x.is_contiguous():
        return x.index_select(1, state.perm)
    return extension().gather(x, perm, _GATHER_PDL)


def matmul(state: CudaLayout, x: torch.Tensor, out: torch.Tensor | None = None,
           op: str | None = None, sums: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] (fp16/bf16, contiguous) @ W + bias through the kernels.

    op: "gemv" (M <= 32), "gemm" or "dequant" (dequant_matmul); None asks pick_op.
    Act-order layers gather x[:, perm] first (gather_cols), then run the plain kernel.
    out: optional preallocated y (tests poison it to prove every element is written).
    sums: no bias; with op "gemv" (M <= SUMS_MAX_M) a zeroed float32 [M, N] that receives the
    unconverted products instead of y, and is returned; with op "gemm" (Hopper, M <=
    GEMM_SUMS_MAX_M) the zeroed float32 buffer that receives them as [column][token slot], returned
    as an [M, N] view of strides (1, slots) (matmul_sums)."""
    ws = workspace(x.device)  # first use on a device probes for the wgmma kernel (outside capture)
    if op is None:
        op = _pick(state, x.shape[0], x.device)
    if state.perm is not None:
        x = gather_cols(x, state)
    if op == "dequant":
        return dequant_matmul(state, x, out, ws=ws)
    if x.data_ptr() % 16:
        x = x.clone()
    scales, zeros, bias = state.constants[x.dtype]
    ext = extension()
    args = (x, state.qweight, scales, zeros, bias, ws.partials, ws.counters, ws.accum, ws.accum_counters,
            state.n, state.bits, state.group_shift, state.zero_point, out)
    if op == "gemv":
        return ext.gemv(*args, sums=sums)
    return ext.gemm(*args, sums=sums)


def sums_op(m: int, state: CudaLayout, device: torch.device, columns: bool = False) -> str | None:
    """The kernel that leaves the fp32 sums of a call of m tokens on this layer ("gemv": up to
    SUMS_MAX_M tokens where the GEMV takes the call, unless QUANTSERVE_GEMV_SUMS=0; "gemm": up to
    GEMM_SUMS_MAX_M tokens of a layer of a multiple of 8 columns where the Hopper wgmma GEMM takes
    it, unless QUANTSERVE_GEMM_SUMS=0), or None where the call writes y. (The GEMM's sums as [M, N]
    rows were built and measured slower than its own fix-up, bench/NOTES.md v13-gemm-sums; as
    [column][token slot] they are faster, v30.) columns: the caller's reader takes the GEMM's
    [column][token slot] sums as they are (the q/k/v and SwiGLU readers; the RMSNorm's needs them
    transposed first): then from WGMMA_MIN_M tokens the GEMM leaves them even where the pipelined
    GEMV takes the layer (COLUMN_SUMS)."""
    if m > max(SUMS_MAX_M, GEMM_SUMS_MAX_M):
        return None
    gemm_sums = cuda_route.GEMM_SUMS and m <= GEMM_SUMS_MAX_M and state.n % 8 == 0  # the GEMM's own conditions
    op = _pick(state, m, device, sums=True, columns=columns and gemm_sums)
    if op == "gemv" and cuda_route.GEMV_SUMS and m <= SUMS_MAX_M:
        return "gemv"
    if op == "gemm" and gemm_sums and wgmma_available(device):
        return "gemm"
    return None


def matmul_sums(state: CudaLayout, x: torch.Tensor, op: str = "gemv") -> Sums:
    """y's fp32 sums [M, N] for x fp16/bf16 [M, K] (contiguous) through the kernel `op` (sums_op's
    answer: "gemv", M <= SUMS_MAX_M, [M, N] rows; "gemm", the Hopper wgmma GEMM, M <=
    GEMM_SUMS_MAX_M, [column][token slot]), which adds its products into the device's zeroed sums
    buffer and skips the split-K fix-up; the reader converts them to x.dtype and zeroes them
    (quant.sums). The layer must have no bias."""
    buffer = workspace(x.device).sums
    m = x.shape[0]
    if op == "gemm":
        view = buffer.claim(m, state.n, slots=extension().gemm_sums_tokens(m))
        matmul(state, x, op="gemm", sums=buffer.data)
    else:
        view = buffer.claim(m, state.n)
        matmul(state, x, op="gemv", sums=view)
    return Sums(view, x.dtype, buffer)


def dequant_matmul(state: CudaLayout, x: torch.Tensor, out: torch.Tensor | None = None,
                   chunk_bytes: int | None = None, ws: Workspace | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W + bias, W dequantised into the device's scratch a chunk of whole
    64-column strips at a time (qs_dequant), each chunk multiplied by cuBLAS straight into its
    columns of y. x: fp16/bf16 [M, K], already in the layout's row order (act-order: gathered).
    chunk_bytes: at most this many scratch bytes per chunk (default DEQUANT_SCRATCH_BYTES; never less
    than one strip, and never more than the scratch holds). ws: the device's Workspace when the
    caller already has it."""
    if ws is None:
        ws = workspace(x.device)
    n_strips, k_steps = state.qweight.shape[:2]
    strip = strip_bytes(k_steps)
    want = DEQUANT_SCRATCH_BYTES if chunk_bytes is None else chunk_bytes
    if ws.scratch.numel() < strip:  # a layout that did not come through prepare
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"dequant scratch of {ws.scratch.numel()} bytes is smaller than one strip "
                               f"({strip} bytes, K={state.k}); prepare the layer before capturing a graph")
        ws = workspace(x.device, scratch=scratch_bytes(n_strips, k_steps, want))
    budget = max(strip, min(want, ws.scratch.numel()))
    m = x.shape[0]
    y = out if out is not None else torch.empty(m, state.n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    return cuda_dequant.multiply_in_chunks(extension(), state, x, y, ws.scratch, budget)


def _register() -> None:
    kernels.register(CudaBackend(), ("cuda",), priority=PRIORITY)


kernels.register_loader(_register)
