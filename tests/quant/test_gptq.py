"""The one-layer GPTQ solver (quant/gptq.py) on random layers with correlated inputs."""

import itertools
import pytest
import torch

from quant.format import FORMAT_V1, FORMAT_V2, QuantConfig, max_code, num_groups, sym_zero
from quant.gptq import (GPTQError, HessianAccumulator, factor_hessian, gptq_quantize,
                        processing_order, quantize_weight)
from quant.linear import QuantLinear
from quant.rtn import quantize_rtn


def _layer(k=256, n=64, rows=2048, seed=0):
    """Weight [N, K] and inputs X [rows, K] whose channels are correlated and unevenly scaled, as
    real activations are (that is where GPTQ's error feedback pays off)."""
    g = torch.Generator().manual_seed(seed)
    r = k // 4  # rank of the shared structure
    X = torch.randn(rows, r, generator=g) @ torch.randn(r, k, generator=g) / r ** 0.5
    X = X + 0.05 * torch.randn(rows, k, generator=g)
    X = X * torch.logspace(-0.5, 0.5, k)[torch.randperm(k, generator=g)]
    W = torch.randn(n, k, generator=g) * 0.05
    return W, X


def _hessian(X):
    acc = HessianAccumulator(X.shape[1], "cpu")
    acc.add_batch(X)
    return acc.H


def _out_err(W, X, result):
    return (X @ W.t() - X @ result.dequantize()).norm().item()


def test_hessian_is_running_average_over_uneven_batches():
    _, X = _layer(k=48, rows=301)
    acc = HessianAccumulator(48, "cpu")
    for chunk in (X[:7], X[7:200].view(1, 193, 48), X[200:]):
        acc.add_batch(chunk)
    assert acc.num_rows == 301
    torch.testing.assert_close(acc.H, 2 * X.t() @ X / 301, rtol=1e-4, atol=1e-5)
    with pytest.raises(GPTQError, match="K=48"):
        acc.add_batch(torch.zeros(3, 47))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [-1, 64, 128])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_output_error_beats_rtn(bits, group_size, desc_act):
    W, X = _layer()
    H = _hessian(X)
    result, stats = gptq_quantize(W, H, bits, group_size, sym=True, desc_act=desc_act)
    rtn = quantize_rtn(W, bits, group_size, sym=True)
    assert _out_err(W, X, result) < 0.5 * _out_err(W, X, rtn)
    assert stats.loss > 0 and stats.damp_percent == 0.01 and stats.row_loss.shape == (64,)
    assert torch.isclose(stats.row_loss.sum(), torch.tensor(stats.loss), rtol=1e-4)


def test_isotropic_hessian_reduces_to_rtn():
    """With H = c*I there is no correlation to exploit: GPTQ must give RTN's codes exactly, and
    its loss is sum (w - q)^2 * (c + damp) / 2."""
    W, _ = _layer(k=128, n=32)
    c = 3.0
    result, stats = gptq_quantize(W, c * torch.eye(128), 4, 32, sym=False)
    rtn = quantize_rtn(W, 4, 32, sym=False)
    assert torch.equal(result.codes, rtn.codes) and torch.equal(result.scales, rtn.scales)
    assert torch.equal(result.zeros, rtn.zeros)
    want = ((W.t() - rtn.dequantize()) ** 2).sum() * c * 1.01 / 2
    assert stats.loss == pytest.approx(want.item(), rel=1e-4)


def test_act_order_static_groups_keep_contiguous_g_idx():
    W, X = _layer(k=256)
    H = _hessian(X)
    result, _ = gptq_quantize(W, H, 4, 64, sym=True, desc_act=True, static_groups=True)
    assert torch.equal(result.g_idx, (torch.arange(256) // 64).int())
    # static group params are the RTN params of the original weights' contiguous groups
    rtn = quantize_rtn(W, 4, 64, sym=True)
    assert torch.equal(result.scales, rtn.scales)
    assert _out_err(W, X, result) < 0.7 * _out_err(W, X, rtn)


@pytest.mark.parametrize("k,group_size", [(256, 64), (576, 128)])
def test_group_aware_order_keeps_groups_contiguous(k, group_size):
    """act_group_aware: whole groups visited by decreasing peak diag H, channels inside a group by
    decreasing diag H; g_idx stays k // group_size; the partial last group may come first."""
    W, X = _layer(k=k, n=64)
    X[:, k - 1] *= 30  # the partial (or last) group holds the hottest channel
    H = _hessian(X)
    diag = torch.diag(H)
    perm = processing_order(diag, "group_act", group_size)
    assert sorted(perm.tolist()) == list(range(k))
    assert perm[0] == k - 1
    groups = [g for g, _ in itertools.groupby((perm // group_size).tolist())]
    assert sorted(groups) == list(range(num_groups(k, group_size)))  # each group is one run
    for g in groups:
        members = perm[perm // group_size == g]
        assert (diag[members][1:] <= diag[members][:-1]).all()
    result, _ = gptq_quantize(W, H, 4, group_size, sym=True, act_group_aware=True)
    assert torch.equal(result.g_idx, (torch.arange(k) // group_size).int())
    natural, _ = gptq_quantize(W, H, 4, group_size, sym=True)
    assert _out_err(W, X, result) < _out_err(W, X, natural)


@pytest.mark.parametrize("k,group_size", [(256, 64), (576, 128)])
def test_act_order_dynamic_groups_follow_the_permutation(k, group_size):
    W, X = _layer(k=k, n=64)
    H = _hessian(X)
    result, _ = gptq_quantize(W, H, 4, group_size, sym=False, desc_act=True)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    want = torch.empty(k, dtype=torch.int32)
    want[perm] = (torch.arange(k) // group_size).int()  # the j-th processed channel is in group j // gs
    assert torch.equal(result.g_idx, want)
    assert not torch.equal(result.g_idx, (torch.arange(k) // group_size).int())  # really scattered
    counts = torch.bincount(result.g_idx.long())
    sizes = [min(group_size, k - g * group_size) for g in range(num_groups(k, group_size))]
    assert counts.tolist() == sizes
    # codes are in original channel order: the packed layer dequantises to the same weight
    cfg = QuantConfig(bits=4, group_size=group_size, sym=False, desc_act=True, checkpoint_format=FORMAT_V2)
    layer = QuantLinear.from_result(result, cfg)
    assert torch.equal(layer.dequantize(), result.dequantize().t())
    assert _out_err(W, X, result) < _out_err(W, X, quantize_rtn(W, 4, group_size, sym=False))


@pytest.mark.parametrize("desc_act", [False, True])
def test_partial_last_group(desc_act):
    """K = 576 = 4.5 x 128 (SmolLM2's hidden size): five groups, the last one of 64 channels."""
    W, X = _layer(k=576, n=192)
    result, _ = gptq_quantize(W, _hessian(X), 4, 128, sym=True, desc_act=desc_act)
    assert result.scales.shape == (5, 192) and result.zeros.shape == (5, 192)
    assert torch.bincount(result.g_idx.long()).tolist() == [128, 128, 128, 128, 64]
    layer = QuantLinear.from_result(result, QuantConfig(bits=4, group_size=128, desc_act=desc_act))
    assert torch.equal(layer.dequantize(), result.dequantize().t())
    rtn = quantize_rtn(W, 4, 128, sym=True)
    assert _out_err(W, X, result) < 0.7 * _out_err(W, X, rtn)


@pytest.mark.parametrize("fmt,sym", [(FORMAT_V1, True), (FORMAT_V2, False)])
def test_all_bit_widths_round_trip_and_error_shrinks(fmt, sym):
    W, X = _layer(k=256, n=64)
    H = _hessian(X)
    errs = []
    for bits in (2, 3, 4, 8):
        result, _ = gptq_quantize(W, H, bits, 64, sym=sym)
        assert result.codes.min() >= 0 and result.codes.max() <= max_code(bits)
        assert result.codes.max() > max_code(bits) // 2  # the range is used
        assert torch.equal(result.scales, result.scales.half().float())  # fp16-representable
        if sym:
            assert (result.zeros == sym_zero(bits)).all()
        else:
            assert result.zeros.min() >= 0 and result.zeros.max() <= max_code(bits)
        layer = QuantLinear.from_result(result, QuantConfig(bits=bits, group_size=64, sym=sym,
                                                            checkpoint_format=fmt))
        assert torch.equal(layer.dequantize(), result.dequantize().t())
        errs.append(_out_err(W, X, result))
        assert errs[-1] < _out_err(W, X, quantize_rtn(W, bits, 64, sym))
    assert errs == sorted(errs, reverse=True)


def test_asymmetric_zeros_follow_skewed_weights():
    W, X = _layer(k=128, n=32)
    W = W.abs() + 0.01  # all positive: the asymmetric grid should sit low, zeros near 0
    result, _ = gptq_quantize(W, _hessian(X), 4, 32, sym=False)
    assert result.zeros.max() <= 2 and result.zeros.min() >= 0
    sym, _ = gptq_quantize(W, _hessian(X), 4, 32, sym=True)
    assert _out_err(W, X, result) < _out_err(W, X, sym)


def test_dead_input_channels_get_zero_weights():
    W, X = _layer(k=128, n=32)
    X[:, [5, 77]] = 0
    H = _hessian(X)
    factor = factor_hessian(H, 0.01, "act")
    assert factor.dead.nonzero().flatten().tolist() == [5, 77]
    result, _ = quantize_weight(W, factor, 4, 32, sym=True)
    assert (result.dequantize()[[5, 77]] == 0).all()


def test_damp_is_retried_upward_when_cholesky_fails():
    """An indefinite H (float32 accumulation can produce one): the smallest eigenvalue is
    -1.5% of mean(diag H), so damp 0.01 fails and 0.02 is the first that succeeds."""
    k = 64
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(k, k, generator=g))
    eig = torch.rand(k, generator=g) + 0.5
    eig[0] = -0.015 * eig[1:].sum() / (k - 0.985)  # => eig[0] = -0.015 * mean(eig)
    H = basis @ torch.diag(eig) @ basis.t()
    W = torch.randn(16, k, generator=g)
    result, stats = gptq_quantize(W, H, 4, 32, sym=True, damp_percent=0.01)
    assert stats.damp_percent == pytest.approx(0.02)
    assert torch.isfinite(result.dequantize()).all()


def test_rank_deficient_hessian_needs_no_retry():
    """Fewer samples than channels: H is singular, the initial dampening makes it definite."""
    W, X = _layer(k=128, n=32, rows=16)
    result, stats = gptq_quantize(W, _hessian(X), 4, 32, sym=True)
    assert stats.damp_percent == 0.01
    assert _out_err(W, X, result) < _out_err(W, X, quantize_rtn(W, 4, 32, True))


def test_bad_hessians_and_weights_raise_with_numbers():
    with pytest.raises(GPTQError, match="non-finite"):
        factor_hessian(torch.full((8, 8), float("nan")), 0.01)
    with pytest.raises(GPTQError, match=r"square"):
        factor_hessian(torch.zeros(8, 4), 0.01)
    factor = factor_hessian(torch.eye(32), 0.01)
    with pytest.raises(GPTQError, match="K=16"):
        quantize_weight(torch.zeros(8, 16), factor, 4, 16, True)
    with pytest.raises(GPTQError, match="always fails|failed"):
        factor_hessian(-torch.eye(8), 0.01)
