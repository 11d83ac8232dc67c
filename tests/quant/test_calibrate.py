"""The layer-by-layer driver (quant/calibrate.py) on the tiny random Llama of tests/conftest.py."""

import copy

import pytest
import torch
from torch import nn

from quant.calibrate import quantize_model
from quant.format import LLAMA_LINEAR_NAMES, LLAMA_SEQUENTIAL_GROUPS, FormatError, QuantConfig
from quant.gptq import HessianAccumulator, gptq_quantize
from quant.linear import QuantLinear
from quant.rtn import quantize_rtn
from server.models.attention import CausalAttention
from server.models.config import LlamaConfig
from server.models.llama import LlamaForCausalLM
from tests.conftest import tiny_hf_config

SEQ_LEN = 24


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_hf(tiny_hf_config(attention_bias=True))).eval()
    # a structured input distribution: a small vocabulary slice, so activations are correlated
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 512, (6, SEQ_LEN), generator=g)
    return model, calib


def _hidden(model, ids):
    n = ids.shape[0]
    with torch.no_grad():
        h = model(ids.reshape(-1), torch.arange(SEQ_LEN).repeat(n), CausalAttention([SEQ_LEN] * n))
        return model.compute_logits(h)


def _quantized(tiny, method="gptq", **cfg):
    model, calib = tiny
    q = copy.deepcopy(model)
    config = QuantConfig(**{"bits": 4, "group_size": 32, **cfg})
    report = quantize_model(q, config, method, calib if method == "gptq" else None,
                            device="cpu", progress=False, batch_size=4)
    return q, report


def test_every_decoder_linear_is_quantized_and_nothing_else(tiny):
    model, _ = tiny
    q, report = _quantized(tiny)
    for i, layer in enumerate(q.model.layers):
        for name in LLAMA_LINEAR_NAMES:
            m = layer.get_submodule(name)
            assert isinstance(m, QuantLinear), f"layer {i} {name} is {type(m).__name__}"
            assert m.backend is None and m.kernel_state is None  # left unprepared
            orig = model.model.layers[i].get_submodule(name)
            if orig.bias is not None:
                assert torch.equal(m.bias, orig.bias.half())
    assert isinstance(q.lm_head, nn.Linear) and torch.equal(q.lm_head.weight, model.lm_head.weight)
    assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert len(report.layers) == 2 * len(LLAMA_LINEAR_NAMES)
    assert all(r.loss > 0 and r.damp_percent == 0.01 for r in report.layers)
    assert report.num_samples == 6 and report.seq_len == SEQ_LEN
    assert set(report.times.as_dict()) == {"capture", "forward", "hessians", "solve", "pack"}


def test_report_follows_true_sequential_order(tiny):
    _, report = _quantized(tiny)
    assert report.order == "group_act"  # the default without desc_act
    order = [f"model.layers.{i}.{n}" for i in range(2) for group in LLAMA_SEQUENTIAL_GROUPS
             for n in group]
    assert [r.name for r in report.layers] == order


def test_true_sequential_groups_see_quantized_inputs(tiny):
    """Layer 0's o_proj must be solved on the Hessian of inputs made by the QUANTISED q/k/v; with
    true_sequential off, on the float ones. Reproduce both losses by hand."""
    model, calib = tiny
    cfg = dict(bits=4, group_size=32)
    losses = {}
    for seq in (True, False):
        q, report = _quantized(tiny, true_sequential=seq)
        losses[seq] = {r.name: r.loss for r in report.layers}
        # the block as the driver had it when o_proj was solved: q/k/v quantised (or not), rest float
        block = copy.deepcopy(model.model.layers[0])
        if seq:
            for name in LLAMA_SEQUENTIAL_GROUPS[0]:
                parent, attr = name.split(".")
                layer = copy.deepcopy(q.model.layers[0].get_submodule(name))
                layer.prepare("dense")  # as the driver runs them: exact dequantised weights
                setattr(block.get_submodule(parent), attr, layer)
        acc = HessianAccumulator(block.self_attn.o_proj.in_features, "cpu")
        block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: acc.add_batch(a[0]))
        x = model.embed(calib.reshape(-1))
        cos, sin = model.rotary(torch.arange(SEQ_LEN).repeat(6), x.dtype)
        with torch.no_grad():
            block(x, None, cos, sin, CausalAttention([SEQ_LEN] * 6))
        _, stats = gptq_quantize(model.model.layers[0].self_attn.o_proj.weight, acc.H, sym=True,
                                 damp_percent=0.01, act_group_aware=True, **cfg)
        assert losses[seq]["model.layers.0.self_attn.o_proj"] == pytest.approx(stats.loss, rel=1e-4)
    first = [f"model.layers.0.{n}" for n in LLAMA_SEQUENTIAL_GROUPS[0]]
    for name in first:  # the first group sees the same inputs either way
        assert losses[True][name] == pytest.approx(losses[False][name], rel=1e-5)
    assert losses[True]["model.layers.0.mlp.down_proj"] != losses[False]["model.layers.0.mlp.down_proj"]


@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.15)])
def test_quantized_logits_stay_close(tiny, bits, bound):
    model, calib = tiny
    want = _hidden(model, calib)
    errs = {}
    for method in ("gptq", "rtn"):
        q, _ = _quantized(tiny, method, bits=bits)
        got = _hidden(q, calib)
        errs[method] = ((got - want).norm() / want.norm()).item()
    assert errs["gptq"] < bound, errs
    assert errs["gptq"] < errs["rtn"], errs  # on its own calibration data GPTQ must win


def test_rtn_through_the_driver_equals_rtn_per_layer(tiny):
    model, _ = tiny
    q, report = _quantized(tiny, "rtn", bits=3, group_size=32, sym=False, checkpoint_format="gptq_v2")
    assert report.num_samples == 0 and all(r.loss is None for r in report.layers)
    for name in LLAMA_LINEAR_NAMES:
        w = model.model.layers[1].get_submodule(name).weight
        want = quantize_rtn(w, 3, 32, sym=False).dequantize().t()
        assert torch.equal(q.model.layers[1].get_submodule(name).dequantize(), want)


def test_act_order_through_the_driver(tiny):
    q, report = _quantized(tiny, desc_act=True, static_groups=False)
    g_idx = q.model.layers[0].self_attn.q_proj.g_idx
    assert sorted(torch.bincount(g_idx.long()).tolist()) == [32, 32]
    qs, _ = _quantized(tiny, desc_act=True, static_groups=True)
    assert torch.equal(qs.model.layers[0].self_attn.q_proj.g_idx, (torch.arange(64) // 32).int())


def test_bad_arguments_fail_before_any_work(tiny):
    model, calib = tiny
    with pytest.raises(ValueError, match="int64"):
        quantize_model(copy.deepcopy(model), QuantConfig(), "gptq", calib.int(), progress=False)
    with pytest.raises(ValueError, match="vocabulary"):
        quantize_model(copy.deepcopy(model), QuantConfig(), "gptq", calib + 10 ** 6, progress=False)
    with pytest.raises(ValueError, match="method"):
        quantize_model(copy.deepcopy(model), QuantConfig(), "awq", calib, progress=False)
    q, _ = _quantized(tiny, "rtn")
    with pytest.raises(TypeError, match="already quantised"):
        quantize_model(q, QuantConfig(), "rtn", progress=False)
    fused = copy.deepcopy(model)
    fused.fuse_projections()
    with pytest.raises(TypeError, match="before fuse_projections"):
        quantize_model(fused, QuantConfig(), "rtn", progress=False)
    odd = LlamaForCausalLM(LlamaConfig.from_hf(tiny_hf_config(intermediate_size=80)))
    with pytest.raises(FormatError, match="80 values cannot be packed at 3 bits"):
        quantize_model(odd, QuantConfig(bits=3), "gptq", calib, progress=False)
    assert isinstance(odd.model.layers[0].self_attn.q_proj, nn.Linear)  # nothing was touched


@pytest.mark.gpu
def test_driver_on_cuda_matches_the_cpu(tiny):
    """The same GPTQ run with each block on the GPU: same layers, losses within float rounding,
    and the quantised model's hidden states as close to the float model's as on the CPU."""
    model, calib = tiny
    cpu_q, cpu_report = _quantized(tiny)
    gpu_q = copy.deepcopy(model)
    gpu_report = quantize_model(gpu_q, QuantConfig(bits=4, group_size=32), "gptq", calib,
                                device="cuda", progress=False, batch_size=4)
    assert gpu_report.device.startswith("cuda")
    assert [r.name for r in gpu_report.layers] == [r.name for r in cpu_report.layers]
    for g, c in zip(gpu_report.layers, cpu_report.layers):
        assert g.loss == pytest.approx(c.loss, rel=0.05, abs=1e-6), g.name
    want = _hidden(model, calib)
    err_cpu = ((_hidden(cpu_q, calib) - want).norm() / want.norm()).item()
    err_gpu = ((_hidden(gpu_q, calib) - want).norm() / want.norm()).item()
    assert err_gpu < 1.2 * err_cpu + 1e-4, (err_gpu, err_cpu)
