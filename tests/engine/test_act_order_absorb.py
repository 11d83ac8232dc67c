"""Act-order down_proj: its row permutation moved into gate/up at load (server.models.act_order).

The MLP's output must not change, the moved layers must dequantise to exactly the permuted
weights (codes, zeros and scales move as integers and fp16 values, no rounding), and down_proj
must come out with g_idx = k // group_size, i.e. without a gather per call.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quant import kernels
from quant.format import FORMAT_V1, FORMAT_V2, QuantConfig
from quant.linear import QuantLinear
from server.dummy import build_dummy_model
from server.models.act_order import (
    absorb_down_perm,
    grouping_perm,
    permute_columns,
    permute_rows,
)
from server.models.attention import CausalAttention
from tests.kernels.layers import random_layer

TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256,
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "tie_word_embeddings": False}


def _dense(layer: QuantLinear) -> torch.Tensor:
    return layer.dequantize().float().t()  # W [K, N], GPTQ orientation


@pytest.mark.parametrize("bits,fmt,sym", [(4, FORMAT_V1, False), (3, FORMAT_V2, False), (8, FORMAT_V1, True),
                                          (2, FORMAT_V1, False)])
def test_moved_layers_dequantise_to_the_permuted_weights(bits, fmt, sym):
    """Exact: columns of a producer, rows of an act-order layer (v1 asymmetric zeros include 0,
    stored as -1, the case a careless repack corrupts)."""
    prod = random_layer(64, 192, bits, 32, sym=sym, fmt=fmt, bias=True, seed=1)
    cols = torch.randperm(192, generator=torch.Generator().manual_seed(3))
    want = _dense(prod)[:, cols]
    bias = prod.bias[cols].clone()
    assert permute_columns(prod, cols)
    assert torch.equal(_dense(prod), want) and torch.equal(prod.bias, bias)

    down = random_layer(192, 64, bits, 32, sym=sym, fmt=fmt, desc_act=True, seed=2)
    perm = grouping_perm(down)
    assert perm is not None
    want = _dense(down)[perm]
    permute_rows(down, perm)
    assert torch.equal(_dense(down), want)
    assert torch.equal(down.g_idx.long(), torch.arange(192) // 32)  # k // group_size
    assert grouping_perm(down) is None


def _mlp(fused: bool, dense_producers: bool = False, seed: int = 0) -> nn.Module:
    model = build_dummy_model(TINY, QuantConfig(bits=4, group_size=32, desc_act=True), torch.device("cpu"),
                              torch.float32, seed=seed)
    mlp = model.model.layers[0].mlp
    if dense_producers:
        for name in ("gate_proj", "up_proj"):
            q = getattr(mlp, name)
            lin = nn.Linear(q.in_features, q.out_features, bias=False)
            lin.weight.data.copy_(_dense(q).t())
            setattr(mlp, name, lin)
    elif fused:
        mlp.up_proj.g_idx.copy_(mlp.gate_proj.g_idx)  # as GPTQ gives them (one input, one Hessian)
        assert mlp.fuse()
    return mlp


@pytest.mark.parametrize("fused,dense_producers", [(True, False), (False, False), (False, True)])
def test_mlp_output_unchanged(fused, dense_producers):
    mlp = _mlp(fused, dense_producers)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    want = copy.deepcopy(mlp)(x)  # a forward prepares the layers for a backend: on a copy
    assert absorb_down_perm(mlp)
    assert grouping_perm(mlp.down_proj) is None  # down_proj needs no gather any more
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)
    assert not absorb_down_perm(mlp)  # nothing left to move


def test_left_alone():
    """No act-order, a dense down_proj, or layers already prepared for a backend: unchanged."""
    plain = build_dummy_model(TINY, QuantConfig(bits=4, group_size=32), torch.device("cpu"), torch.float32)
    assert plain.absorb_act_order() == 0
    mlp = _mlp(fused=True)
    mlp.down_proj.prepare("torch")
    assert not absorb_down_perm(mlp)
    dense = build_dummy_model(TINY, None, torch.device("cpu"), torch.float32).model.layers[0].mlp
    assert not absorb_down_perm(dense)


def test_model_logits_unchanged():
    """The whole model, act-order everywhere (random g_idx per layer), through the load-time passes;
    the default CPU backend and the torch reference backend each give the logits they gave before."""
    model = build_dummy_model(TINY, QuantConfig(bits=4, group_size=32, desc_act=True), torch.device("cpu"),
                              torch.float32, seed=5)
    ids = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(6))
    pos = torch.arange(9)

    def logits(m, kernel=None):
        m = copy.deepcopy(m)  # a forward prepares the layers for a backend: on a copy
        if kernel is not None:
            kernels.prepare_model(m, kernel)
        return m.compute_logits(m(ids, pos, CausalAttention([9])))

    want = {k: logits(model, k) for k in (None, "torch")}
    model.fuse_projections()
    assert model.absorb_act_order() == TINY["num_hidden_layers"]
    for k, w in want.items():
        torch.testing.assert_close(logits(model, k), w, rtol=1e-5, atol=1e-5)


def test_dummy_act_order_is_shared_per_input_and_fuses():
    """bench/decode.py --desc-act: q/k/v share one random g_idx and gate/up another (as GPTQ gives
    them), o/down have their own, so the projections fuse as a real checkpoint's do."""
    model = build_dummy_model(TINY, QuantConfig(bits=4, group_size=32, desc_act=True), torch.device("cpu"),
                              torch.float32, seed=7)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert torch.equal(attn.q_proj.g_idx, attn.k_proj.g_idx) and torch.equal(attn.q_proj.g_idx, attn.v_proj.g_idx)
    assert torch.equal(mlp.gate_proj.g_idx, mlp.up_proj.g_idx)
    assert not torch.equal(attn.q_proj.g_idx, model.model.layers[1].self_attn.q_proj.g_idx)
    assert not torch.equal(mlp.gate_proj.g_idx.sort().values, mlp.gate_proj.g_idx)  # really act-order
    assert model.fuse_projections() == 2 * TINY["num_hidden_layers"]
