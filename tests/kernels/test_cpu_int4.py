"""cpu_int4 (csrc/cpu/gptq_cpu.cpp) against the float32 reference, on fresh random layers and inputs.

Two checks per case:
  * exact: the kernel equals x_hat @ W in float64, where x_hat is x rounded to int8 per (row, K-block)
    exactly as the kernel does; only float32 summation order may differ.
  * reference: the kernel is within the int8-activation rounding bound of `kernels.reference`
    (|y - y_ref| <= sum_k |W[n, k]| * scale_of_block(k) / 2 plus float slack).
Outputs are written into NaN-poisoned buffers, so a column or row the kernel skips shows up.
Every ISA path compiled into this build (scalar, AVX2, AVX-512 VNNI, NEON) is swept.
"""

from __future__ import annotations

import pytest
import torch

from quant import cpu_int4, kernels
from quant.format import FORMAT_V1, FORMAT_V2, num_groups
from quant.linear import QuantLinear
from quant.pack import pack_qzeros, unpack_qweight, unpack_qzeros

_GEN = torch.Generator().manual_seed(1234)


def _rand_layer(k, n, bits, group_size, sym, fmt, desc_act, bias, dead_zero=False):
    """A QuantLinear with random codes/scales/zeros (any int32 bit pattern is a valid code word)."""
    layer = QuantLinear(k, n, bits, group_size, bias=bias, checkpoint_format=fmt, sym=sym,
                        desc_act=desc_act)
    g = num_groups(k, group_size)
    layer.qweight.copy_(torch.randint(-2**31, 2**31, layer.qweight.shape, generator=_GEN,
                                      dtype=torch.int64).to(torch.int32))
    maxq = (1 << bits) - 1
    if sym:
        zeros = torch.full((g, n), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(0, maxq + 1, (g, n), generator=_GEN, dtype=torch.int32)
        if dead_zero:
            zeros[0] = 0  # v1 stores -1: the masked-overflow case
    layer.qzeros.copy_(pack_qzeros(zeros, bits, fmt))
    layer.scales.copy_((torch.rand(g, n, generator=_GEN) * 0.02 + 0.001).half())
    gs = k if group_size == -1 else group_size
    if desc_act:
        rank = torch.randperm(k, generator=_GEN)
        layer.g_idx.copy_((rank // gs).to(torch.int32))
    else:
        layer.g_idx.copy_((torch.arange(k) // gs).to(torch.int32))
    if bias:
        layer.bias.copy_(torch.randn(n, generator=_GEN).half())
    return layer


def _dequant_cols(layer, cols):
    """float64 W [len(cols), K] (nn.Linear orientation) for a subset of output columns."""
    k = layer.in_features
    codes = unpack_qweight(layer.qweight[:, cols], layer.bits, k).double()  # [K, c]
    zeros = unpack_qzeros(layer.qzeros, layer.bits, layer.out_features, layer.checkpoint_format)
    g = layer.g_idx.long()
    w = (codes - zeros[:, cols][g].double()) * layer.scales[:, cols][g].double()
    return w.t().contiguous()


def _emulate(layer, state, x, w, cols):
    """float64 y[:, cols] computed from x rounded exactly as the kernel rounds it.

    Returns (y, bound, mag): bound = sum_k |w| * scale(k) / 2 is the most the activation rounding
    can move each output; mag = |x_hat| @ |w| scales the float32 summation slack."""
    k = layer.in_features
    perm = state.perm.long() if state.perm is not None else torch.arange(k)
    xs = x.float()[:, perm]
    w = w[:, perm]  # kernel row order
    bk = state.block_k
    xhat = torch.empty_like(xs, dtype=torch.float64)
    scale_k = torch.empty_like(xs, dtype=torch.float64)
    for k0 in range(0, k, bk):
        blk = xs[:, k0:k0 + bk]
        amax = blk.abs().amax(dim=1, keepdim=True)
        inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
        q = torch.round(blk * inv)  # float32 product, half-to-even: as the kernel
        scale = amax / 127.0
        xhat[:, k0:k0 + bk] = q.double() * scale.double()
        scale_k[:, k0:k0 + bk] = scale.double()
    y = xhat @ w.t()
    if layer.bias is not None:
        y = y + layer.bias[cols].double()
    return y, (scale_k / 2) @ w.abs().t(), xhat.abs() @ w.abs().t()


def _check(layer, ms, isas=None, dtype=torch.float32, max_cols=None, scalar_max_m=8):
    assert layer.prepare() == "cpu_int4", kernels.available("cpu")
    state = layer.kernel_state
    k, n = layer.in_features, layer.out_features
    cols = torch.arange(n)
    if max_cols is not None and n > max_cols:  # big layers: check a random subset of columns
        cols = torch.randperm(n, generator=_GEN)[:max_cols].sort().values
    w = _dequant_cols(layer, cols)
    isas = cpu_int4.module().compiled_isas() if isas is None else isas
    for m in ms:
        x = torch.randn(m, k, generator=_GEN).to(dtype)
        want, bound, mag = _emulate(layer, state, x, w, cols)
        # the float32 reference (same formula as kernels.reference, on the checked columns)
        ref = (x.float() @ w.float().t()).double()
        if layer.bias is not None:
            ref = ref + layer.bias[cols].double()
        eps = 1e-5 if dtype == torch.float32 else 2 ** -8
        for isa in isas:
            if isa == 0 and m > scalar_max_m:
                continue  # the portable path is slow; small M covers its logic
            out = torch.full((m, n), float("nan"), dtype=dtype)
            ret = cpu_int4.gemm(state, x, n, isa=isa, out=out)
            assert ret.data_ptr() == out.data_ptr()
            ctx = f"K={k} N={n} M={m} isa={cpu_int4.ISA_NAMES[isa]} {dtype}"
            assert torch.isfinite(out).all(), f"{ctx}: output not fully written"
            got = out.double()[:, cols]
            # exact up to float32 (and bf16 output) rounding
            tol = eps * (mag + want.abs()) + 1e-6
            err = (got - want).abs()
            assert (err <= tol).all(), f"{ctx}: max excess {(err - tol).max().item():.3e}"
            # against the float32 reference: within the activation-rounding bound
            err_ref = (got - ref).abs()
            tol_ref = bound * 1.001 + tol
            assert (err_ref <= tol_ref).all(), f"{ctx}: vs reference, excess {(err_ref - tol_ref).max():.3e}"
    if max_cols is None:  # kernels.reference itself, and the layer's forward through the backend
        x = torch.randn(3, k, generator=_GEN).to(dtype)
        ref = kernels.reference(layer, x).double()
        want = (x.float() @ w.float().t()).double() + (0 if layer.bias is None else layer.bias.double())
        torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), cpu_int4.gemm(state, x, n), rtol=0, atol=0)


SMOL = [(576, 192), (576, 576), (576, 1536), (1536, 576)]
MS = [1, 2, 3, 5, 8, 16, 33, 64]
VARIANTS = [  # (sym, checkpoint format, desc_act, bias)
    (True, FORMAT_V1, False, False),
    (False, FORMAT_V2, False, True),
    (False, FORMAT_V1, True, False),
    (True, FORMAT_V2, True, True),
]


# every (shape, group size) gets two variants; over the grid each variant meets every shape and group
SWEEP = [(k, n, gs, VARIANTS[(i + j + 2 * s) % 4])
         for i, (k, n) in enumerate(SMOL) for j, gs in enumerate([32, 64, 128, -1]) for s in (0, 1)]


@pytest.mark.parametrize("k,n,group_size,variant", SWEEP,
                         ids=[f"{k}x{n}-g{gs}-sym{int(v[0])}-{v[1]}-act{int(v[2])}-b{int(v[3])}"
                              for k, n, gs, v in SWEEP])
def test_int4_smollm2_shapes(k, n, group_size, variant):
    sym, fmt, desc_act, bias = variant
    layer = _rand_layer(k, n, 4, group_size, sym, fmt, desc_act, bias, dead_zero=not sym)
    _check(layer, MS)


@pytest.mark.parametrize("k,n,group_size", [(200, 40, 64), (72, 24, 32), (136, 8, 128), (64, 32, 32)])
@pytest.mark.parametrize("sym,desc_act", [(True, False), (False, True)])
def test_int4_partial_groups_and_ragged_n(k, n, group_size, sym, desc_act):
    """K not a multiple of the group size (last group partial), N not a multiple of 16."""
    layer = _rand_layer(k, n, 4, group_size, sym, FORMAT_V2 if not sym else FORMAT_V1, desc_act, True)
    _check(layer, [1, 4, 7])


@pytest.mark.parametrize("k,n,group_size", [(576, 192, 64), (1536, 576, 128), (576, 200, -1), (200, 48, 64)])
@pytest.mark.parametrize("sym,fmt,desc_act", [(True, FORMAT_V1, False), (False, FORMAT_V2, True),
                                              (False, FORMAT_V1, False)])
def test_int8(k, n, group_size, sym, fmt, desc_act):
    layer = _rand_layer(k, n, 8, group_size, sym, fmt, desc_act, bias=not sym, dead_zero=not sym)
    _check(layer, [1, 3, 8, 33])


@pytest.mark.parametrize("bits,group_size,sym,desc_act", [(4, 64, True, False), (4, 128, False, True),
                                                          (8, -1, True, False)])
def test_bfloat16_activations(bits, group_size, sym, desc_act):
    layer = _rand_layer(576, 1536, bits, group_size, sym, FORMAT_V2, desc_act, bias=True)
    _check(layer, [1, 5, 64], dtype=torch.bfloat16)


@pytest.mark.parametrize("k,n,ms", [(4096, 4096, [1, 3, 16]), (11008, 4096, [1, 2])])
@pytest.mark.parametrize("group_size,sym,desc_act", [(128, True, False), (128, False, True)])
def test_int4_large(k, n, ms, group_size, sym, desc_act):
    layer = _rand_layer(k, n, 4, group_size, sym, FORMAT_V2, desc_act, bias=False)
    _check(layer, ms, isas=[cpu_int4.module().best_isa()], max_cols=256)


def test_dispatch_prefers_cpu_int4_and_falls_back():
    assert kernels.available("cpu")[0] == "cpu_int4"
    layer = _rand_layer(64, 32, 4, 32, True, FORMAT_V1, False, False)
    assert layer.prepare() == "cpu_int4"
    assert layer.prepare("dense") == "dense"  # the fallback stays selectable
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), kernels.reference(layer, x), rtol=1e-5, atol=1e-5)
    for bits in (2, 3):
        low = _rand_layer(64, 32, bits, 32, True, FORMAT_V1, False, False)
        assert "bits=" in cpu_int4.CpuInt4().unsupported_reason(low)
        assert low.prepare() == "dense"
    odd = _rand_layer(64, 32, 4, 32, True, FORMAT_V1, False, False)
    odd.g_idx.copy_(torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32))  # groups not runs of 32
    assert "g_idx" in cpu_int4.CpuInt4().unsupported_reason(odd)
    assert odd.prepare() == "dense"


def test_gptq_buffers_unchanged_by_prepare():
    layer = _rand_layer(576, 192, 4, 64, False, FORMAT_V1, True, True)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    layer.prepare()
    for name, t in layer.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_bad_input_is_rejected():
    layer = _rand_layer(64, 32, 4, 32, True, FORMAT_V1, False, False)
    layer.prepare()
    with pytest.raises(ValueError, match="contiguous"):
        cpu_int4.gemm(layer.kernel_state, torch.randn(64, 4).t(), 32)
    with pytest.raises(ValueError, match="out must be"):
        cpu_int4.gemm(layer.kernel_state, torch.randn(2, 64), 32, out=torch.empty(2, 31))


def test_named_backend_loads_optional_backends(monkeypatch):
    """prepare('cpu_int4') works before anything asked for the available backends."""
    monkeypatch.setattr(kernels, "_LOADERS", [kernels._load_cpu_int4])
    monkeypatch.delitem(kernels._REGISTRY, "cpu_int4", raising=False)
    layer = _rand_layer(64, 32, 4, 32, True, FORMAT_V1, False, False)
    assert layer.prepare("cpu_int4") == "cpu_int4"


def test_fast_forward_equals_dispatch_and_leaves_other_inputs_to_it():
    """QuantLinear.forward's cpu_int4 shortcut gives exactly kernels.apply's output; inputs it
    does not take (3-D, strided, float16, wrong K) go through kernels.apply as before."""
    from quant.kernels import KernelError

    layer = _rand_layer(128, 48, 4, 32, False, FORMAT_V1, True, True)
    assert layer.prepare() == "cpu_int4" and layer.fast_forward is not None
    for x in (torch.randn(3, 128), torch.randn(1, 128).bfloat16(), torch.randn(0, 128)):
        assert layer.fast_forward(x) is not None
        assert torch.equal(layer(x), kernels.apply(layer, x))
    for x in (torch.randn(2, 3, 128), torch.randn(128, 4).t(), torch.randn(2, 128).half()):
        assert layer.fast_forward(x) is None
        assert torch.equal(layer(x), kernels.apply(layer, x))
    with pytest.raises(KernelError, match="features"):
        layer(torch.randn(2, 64))
    assert layer.prepare("dense") == "dense" and layer.fast_forward is None  # no shortcut there
    layer.prepare()
    assert layer.fast_forward is not None
    layer.to("cpu")  # any move or cast (Module._apply) drops it: it was built for the old tensors
    assert layer.fast_forward is None
    x = torch.randn(2, 128)
    assert torch.equal(layer(x), kernels.apply(layer, x))
