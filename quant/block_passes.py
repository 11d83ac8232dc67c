"""One decoder block through GPTQ (staged true-sequential, or hooked) or RTN: the per-block passes
of quant.calibrate's layer-by-layer driver.

Staged (true-sequential): the block's stages run in order over all samples, each stage fed by what
the previous one kept, so every linear runs once per sample; each sequential group's shared input
Hessian is accumulated as its stage runs and the group is solved before the next stage uses it.
Hooked (true_sequential=False): forward pre-hooks take every Hessian from one pass of the float
block. Solving swaps nn.Linear for a QuantLinear prepared on the exact dense dequantised weights,
so the rest of the block sees the quantised layer.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import nn

from quant.calibrate_report import LayerReport, QuantizeReport, StageTimes
from quant.format import LLAMA_LINEAR_NAMES, LLAMA_SEQUENTIAL_GROUPS, QuantConfig
from quant.gptq import HessianAccumulator, cpu_threads_for, factor_hessian, quantize_weight
from quant.linear import QuantLinear
from quant.quantizer import QuantResult
from quant.rtn import quantize_rtn
from server.models.attention import CausalAttention


class _StopForward(Exception):
    """Raised from a hook once a group has its inputs: the rest of the block is not needed."""


class _GroupCapture:
    """Forward pre-hooks on one sequential group's linears.

    Linears that receive the very same tensor (q/k/v get one normed x) share one accumulator; which
    ones share is learnt on the first batch. Once every linear of the group has been reached, the
    hook raises _StopForward so the block runs no further than needed.
    """

    def __init__(self, block: nn.Module, names: tuple[str, ...], device: torch.device,
                 times: StageTimes) -> None:
        self.names = names
        self.device = device
        self.times = times
        self.acc: dict[str, HessianAccumulator] = {}
        self.owner: dict[str, str] = {}  # linear name -> name owning the accumulator it uses
        self._first = True
        self._batch: list[tuple[torch.Tensor, str]] = []
        self._handles = [block.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._first:
                source = next((n for t, n in self._batch if t is x), None)
                self.owner[name] = name if source is None else self.owner[source]
                if source is None:
                    self.acc[name] = HessianAccumulator(x.shape[-1], self.device)
            if self.owner[name] == name:
                start = time.perf_counter()
                self.acc[name].add_batch(x)
                sync(self.device)
                self.times.hessians += time.perf_counter() - start
            self._batch.append((x, name))
            if len(self._batch) == len(self.names):
                raise _StopForward
        return fn

    def end_batch(self) -> None:
        missing = set(self.names) - {n for _, n in self._batch}
        if missing:
            raise RuntimeError(f"linears {sorted(missing)} received no input in the block's forward")
        self._batch.clear()
        self._first = False

    def bundles(self) -> list[list[str]]:
        """Group names by shared accumulator, each bundle in group order."""
        out: dict[str, list[str]] = {}
        for n in self.names:
            out.setdefault(self.owner[n], []).append(n)
        return list(out.values())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _set_submodule(block: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, attr, module)


def _install(block: nn.Module, name: str, result: QuantResult, config: QuantConfig,
             device: torch.device) -> None:
    linear = block.get_submodule(name)
    with cpu_threads_for(torch.device("cpu"), 0):  # packing runs on the CPU, in small ops
        qlinear = QuantLinear.from_result(result, config, bias=linear.bias)
    qlinear = qlinear.to(device)
    qlinear.prepare("dense")  # exact dequantised weights for the next forwards in this block
    _set_submodule(block, name, qlinear)


def _unprepare(block: nn.Module) -> None:
    for m in block.modules():
        if isinstance(m, QuantLinear):
            m.backend, m.kernel_state = None, None


@contextmanager
def on_device(block: nn.Module, device: torch.device):
    """Keep `block` on `device` for the duration; put it back where it was afterwards."""
    home = next(iter(block.parameters()), torch.empty(0)).device
    block.to(device)
    try:
        yield
    finally:
        _unprepare(block)
        block.to(home)


class Runner:
    """Runs one block over all calibration samples, `batch` samples per forward."""

    def __init__(self, model: nn.Module, num_samples: int, seq_len: int, batch: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.num_samples, self.seq_len, self.batch, self.device = num_samples, seq_len, batch, device
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for nb in {batch, num_samples % batch or batch}:
            positions = torch.arange(seq_len, device=model.rotary.inv_freq.device).repeat(nb)
            cos, sin = model.rotary(positions, dtype)
            self._rope[nb] = (cos.to(device), sin.to(device))

    def batches(self):
        for b0 in range(0, self.num_samples, self.batch):
            yield b0, min(b0 + self.batch, self.num_samples)

    def forward(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [nb, L, H] hidden states (any device) -> the block's hidden states [nb * L, H].

        Decoder layers hand the residual stream on separately (the add is fused into the next
        norm); a layer given residual=None takes x as the stream, so storing x + residual between
        layers computes the same thing."""
        nb = x.shape[0]
        cos, sin = self._rope[nb]
        flat = x.reshape(nb * self.seq_len, -1).to(self.device, non_blocking=True)
        out, residual = block(flat, None, cos, sin, CausalAttention([self.seq_len] * nb))
        return out + residual


def quantize_block_hooked(block: nn.Module, prefix: str, runner: Runner, inps: torch.Tensor,
                         config: QuantConfig, report: QuantizeReport) -> None:
    """GPTQ of one block without true-sequential: every linear's Hessian comes from one pass of
    the float block, captured by forward pre-hooks (true-sequential runs use
    `quantize_block_staged`)."""
    device, times = runner.device, report.times
    capture = _GroupCapture(block, LLAMA_LINEAR_NAMES, device, times)
    try:
        start, hook_seconds = time.perf_counter(), times.hessians
        for b0, b1 in runner.batches():
            try:
                runner.forward(block, inps[b0:b1])
            except _StopForward:
                pass
            capture.end_batch()
        sync(device)
        times.forward += time.perf_counter() - start - (times.hessians - hook_seconds)
    finally:
        capture.remove()
    for bundle in capture.bundles():
        _solve_bundle(block, prefix, bundle, capture.acc[capture.owner[bundle[0]]].H, config,
                      device, report)


def _solve_bundle(block: nn.Module, prefix: str, bundle: list[str], H: torch.Tensor,
                  config: QuantConfig, device: torch.device, report: QuantizeReport) -> None:
    """GPTQ of the linears in `bundle` (all fed by the input whose Hessian is H), stacked along
    their outputs, then installed as QuantLinear modules of `block`."""
    times = report.times
    start = time.perf_counter()
    factor = factor_hessian(H, config.damp_percent, report.order, config.group_size)
    W = torch.cat([block.get_submodule(n).weight for n in bundle], dim=0)
    result, stats = quantize_weight(W, factor, config.bits, config.group_size, config.sym,
                                    config.static_groups)
    del factor
    times.solve += time.perf_counter() - start
    start = time.perf_counter()
    row = 0
    for name in bundle:
        n = block.get_submodule(name).out_features
        part = QuantResult(codes=result.codes[:, row:row + n], zeros=result.zeros[:, row:row + n],
                           scales=result.scales[:, row:row + n], g_idx=result.g_idx,
                           bits=result.bits)
        _install(block, name, part, config, device)
        report.layers.append(LayerReport(
            name=f"{prefix}.{name}", loss=stats.row_loss[row:row + n].sum().item(),
            damp_percent=stats.damp_percent, seconds=stats.seconds * n / W.shape[0]))
        row += n
    sync(device)
    times.pack += time.perf_counter() - start


def quantize_block_staged(block: nn.Module, prefix: str, runner: Runner, inps: torch.Tensor,
                           outs: torch.Tensor, store: torch.device, config: QuantConfig,
                           report: QuantizeReport) -> None:
    """True-sequential GPTQ of one decoder block, each linear run exactly once per sample.

    The block is walked in stages, and what each stage hands to the next is kept for every
    calibration sample, so no stage is recomputed to reach the next group's inputs:
        x -> input norm -> h            Hessian of q/k/v; quantise q, k, v
        h -> q/k/v, rope, attention -> a    Hessian of o; quantise o        (a kept)
        r = x + o(a); h2 = norm(r)      Hessian of gate/up; quantise them   (r kept)
        m = silu(gate(h2)) * up(h2)     Hessian of down; quantise down      (m kept)
        out = r + down(m)               the next block's inputs
    Every stage uses the already-quantised linears before it.
    `store` holds the kept tensors (about num_samples * seq_len * (hidden + intermediate) values).
    """
    device, times, seq_len = runner.device, report.times, runner.seq_len
    attn, mlp = block.self_attn, block.mlp
    names = LLAMA_SEQUENTIAL_GROUPS
    batches = list(runner.batches())
    kept: list[torch.Tensor | None] = [None] * len(batches)  # a, then r
    acts: list[torch.Tensor | None] = [None] * len(batches)  # m

    def x_of(b0: int, b1: int) -> torch.Tensor:
        return inps[b0:b1].reshape((b1 - b0) * seq_len, -1).to(device, non_blocking=True)

    def rope(b0: int, b1: int):
        cos, sin = runner._rope[b1 - b0]
        return cos, sin, CausalAttention([seq_len] * (b1 - b0))

    def run_stage(stage: int, in_features: int) -> torch.Tensor:
        acc = HessianAccumulator(in_features, device)
        start, hess = time.perf_counter(), 0.0
        for j, (b0, b1) in enumerate(batches):
            if stage == 0:
                feed, _ = block.input_layernorm(x_of(b0, b1))
            elif stage == 1:
                h, _ = block.input_layernorm(x_of(b0, b1))
                feed = attn.mix(h, *rope(b0, b1))
                kept[j] = feed.to(store)
            elif stage == 2:
                feed, r = block.post_attention_layernorm(attn.o_proj(kept[j].to(device)), x_of(b0, b1))
                kept[j] = r.to(store)
            else:
                h2, _ = block.post_attention_layernorm(kept[j].to(device))
                feed = mlp.act(h2)
                acts[j] = feed.to(store)
            t = time.perf_counter()
            acc.add_batch(feed)
            sync(device)
            hess += time.perf_counter() - t
        sync(device)
        times.hessians += hess
        times.forward += time.perf_counter() - start - hess
        return acc.H

    for stage, group in enumerate(names):
        first = block.get_submodule(group[0])
        H = run_stage(stage, first.in_features)
        _solve_bundle(block, prefix, list(group), H, config, device, report)
        del H
    start = time.perf_counter()
    hidden = inps.shape[-1]
    for j, (b0, b1) in enumerate(batches):
        out = kept[j].to(device) + mlp.down_proj(acts[j].to(device))
        outs[b0:b1] = out.view(b1 - b0, seq_len, hidden).to(outs.device)
        kept[j] = acts[j] = None
    sync(device)
    times.forward += time.perf_counter() - start


def quantize_block_rtn(block: nn.Module, prefix: str, config: QuantConfig, device: torch.device,
                        report: QuantizeReport) -> None:
    for name in LLAMA_LINEAR_NAMES:
        start = time.perf_counter()
        weight = block.get_submodule(name).weight.detach()
        with cpu_threads_for(device, weight.numel()):
            result = quantize_rtn(weight, config.bits, config.group_size, config.sym)
        sync(device)
        seconds = time.perf_counter() - start
        report.times.solve += seconds
        start = time.perf_counter()
        _install(block, name, result, config, device)
        report.times.pack += time.perf_counter() - start
        report.layers.append(LayerReport(f"{prefix}.{name}", None, None, seconds))
