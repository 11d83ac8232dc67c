"""Quantise a whole Llama-family model, one decoder layer at a time (GPTQ or RTN).

GPTQ flow (the layer-wise scheme of the GPTQ paper, with true-sequential quantisation):

    inputs of layer 0 = embeddings of every calibration sample            [S, L, H]  (once)
    for each decoder layer (the only block resident on `device`):
        for each sequential group ([k, v, q] -> [o] -> [up, gate] -> [down]):
            run the block's next stage over all samples, fed by what the previous stage kept
            (so every linear runs once per sample); accumulate the Hessian of the group's input
            (q/k/v share one, up/gate share one), solve the group with gptq.py (layers sharing a
            Hessian are solved as one stacked matrix: rows are independent in GPTQ, so this is
            exact) and swap nn.Linear -> QuantLinear
        the last stage's outputs, through the quantised down_proj, are the next layer's inputs
    Without true_sequential, forward pre-hooks take every Hessian from one pass of the float block.

The per-block passes live in quant/block_passes.py, the report types in quant/calibrate_report.py.
Only the linears inside decoder layers are quantised; embeddings, norms and lm_head stay as they
are. The returned model holds QuantLinear modules in place, unprepared (no kernel state), on the
devices its layers came from.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from quant.block_passes import (Runner, on_device, quantize_block_hooked, quantize_block_rtn,
                                quantize_block_staged, sync)
from quant.calibrate_report import QuantizeReport
from quant.format import LLAMA_LINEAR_NAMES, QuantConfig
from quant.gptq import select_order

METHODS = ("gptq", "rtn")
TOKENS_PER_FORWARD = 8192  # calibration samples are run through a block in batches of ~this many tokens


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "rotary"):
        raise TypeError(f"{type(model).__name__} is not a Llama-family model of server.models "
                        f"(needs .model.layers and .rotary)")
    return layers


def _check_shapes(layers: nn.ModuleList, config: QuantConfig) -> None:
    """Every linear must be packable in the requested format; fail before any work is done."""
    for i, layer in enumerate(layers):
        for name in LLAMA_LINEAR_NAMES:
            try:
                linear = layer.get_submodule(name)
            except AttributeError:
                raise TypeError(f"model.layers.{i}.{name} is missing (projections fused? quantise "
                                f"before fuse_projections())") from None
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"model.layers.{i}.{name} is {type(linear).__name__}, not nn.Linear "
                                f"(already quantised?)")
            config.layer_shape(linear.in_features, linear.out_features)


def _inputs_home(device: torch.device, nbytes: int) -> torch.device:
    """Where layer inputs/outputs live: on the device when both copies fit in half its free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if 2 * nbytes > free // 2:
            return torch.device("cpu")
    return device


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig, method: str = "gptq",
                   calibration: torch.Tensor | None = None, device: torch.device | str | None = None,
                   progress: bool = True, batch_size: int | None = None,
                   act_group_aware: bool = True) -> QuantizeReport:
    """Quantise every decoder-layer linear of `model` in place.

    model        server.models.llama.LlamaForCausalLM (any device; each block is moved to `device`
                 while it is quantised and moved back afterwards)
    config       bits / group_size / sym / desc_act / static_groups / true_sequential / damp_percent
    method       "gptq" (needs `calibration`) or "rtn" (ignores it)
    calibration  int64 token ids [num_samples, seq_len] (see quant.data)
    device       where the work runs; default CUDA when present, else the CPU
    batch_size   calibration samples per block forward (default: ~8192 tokens per forward)
                 Forwards use the caller's torch threads; solving and packing run on one CPU
                 thread (small ops). On a CPU shared with other jobs one thread is fastest overall
                 (measured 2x on a busy 2-core box, bench/NOTES.md).
    act_group_aware  without desc_act, visit groups (and channels inside them) by decreasing
                 activation energy; the file layout is unchanged (g_idx = k // group_size)
    Returns a QuantizeReport; the model's linears are QuantLinear modules afterwards (unprepared).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layers = _decoder_layers(model)
    _check_shapes(layers, config)
    start_all = time.perf_counter()
    num_samples = seq_len = 0
    if method == "gptq":
        if calibration is None or calibration.dim() != 2 or calibration.dtype != torch.int64:
            got = None if calibration is None else f"{calibration.dtype} {tuple(calibration.shape)}"
            raise ValueError(f"GPTQ needs calibration token ids int64 [num_samples, seq_len], got {got}")
        num_samples, seq_len = calibration.shape
        vocab = model.model.embed_tokens.num_embeddings
        if calibration.numel() and (calibration.min() < 0 or calibration.max() >= vocab):
            raise ValueError(f"calibration ids span {calibration.min().item()}..{calibration.max().item()}, "
                             f"vocabulary is 0..{vocab - 1}")
    order = select_order(config.desc_act, act_group_aware and config.group_size != -1)
    report = QuantizeReport(method, config, str(device), num_samples, seq_len,
                            order if method == "gptq" else "natural")
    bar = _progress(len(layers), method, progress)
    if method == "rtn":
        for i, layer in enumerate(layers):
            with on_device(layer, device):
                quantize_block_rtn(layer, f"model.layers.{i}", config, device, report)
            bar.update(1)
        bar.close()
        report.seconds = time.perf_counter() - start_all
        return report

    dtype = model.dtype
    hidden = model.model.embed_tokens.embedding_dim
    batch = batch_size or max(1, TOKENS_PER_FORWARD // seq_len)
    runner = Runner(model, num_samples, seq_len, batch, device, dtype)
    start = time.perf_counter()
    nbytes = num_samples * seq_len * hidden * torch.empty(0, dtype=dtype).element_size()
    home = _inputs_home(device, nbytes)
    inps = torch.empty(num_samples, seq_len, hidden, dtype=dtype, device=home)
    outs = torch.empty_like(inps)
    for b0, b1 in runner.batches():
        inps[b0:b1] = model.embed(calibration[b0:b1].to(model.device)).to(home)
    # the staged path keeps the residual stream and the MLP activations of every sample
    stage_bytes = nbytes // hidden * (hidden + model.config.intermediate_size)
    store = _inputs_home(device, stage_bytes // 2) if home == device else home
    report.times.capture = time.perf_counter() - start
    for i, layer in enumerate(layers):
        with on_device(layer, device):
            if config.true_sequential:
                quantize_block_staged(layer, f"model.layers.{i}", runner, inps, outs, store, config,
                                       report)
            else:
                quantize_block_hooked(layer, f"model.layers.{i}", runner, inps, config, report)
                start = time.perf_counter()
                for b0, b1 in runner.batches():
                    outs[b0:b1] = runner.forward(layer, inps[b0:b1]).view(b1 - b0, seq_len, hidden).to(home)
                sync(device)
                report.times.forward += time.perf_counter() - start
        inps, outs = outs, inps
        bar.set_postfix(layer=i, loss=f"{report.layer_loss(i):.4g}")
        bar.update(1)
    bar.close()
    report.seconds = time.perf_counter() - start_all
    return report


def _progress(total: int, method: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"quantize ({method})", unit="layer", disable=not enabled)
