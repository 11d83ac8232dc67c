"""Unconverted matmul outputs (quant.sums): the shared buffer's rules, the readers in
server.models.fused and qkv_reader (on the CPU, the GPU, and Triton's interpreter), the decoder
handing every Sums to a reader, and (GPU) the CUDA GEMV that leaves them. The whole decode-step
chain with sums runs in test_gpu_engine."""

import pytest
import torch
from torch import nn

from quant import kernels
from quant.backends import cuda as cuda_backend
from quant.format import FORMAT_V2
from quant.sums import Sums, SumsBuffer, as_tensor
from server.models import column_sums, fused, qkv_reader
from server.models.attention import CausalAttention
from server.models.config import LlamaConfig
from server.models.llama import LlamaForCausalLM
from tests.conftest import tiny_hf_config


def _sums(buffer: SumsBuffer, values: torch.Tensor, dtype: torch.dtype, slots: int | None = None) -> Sums:
    view = buffer.claim(*values.shape, slots=slots)
    view.copy_(values)
    return Sums(view, dtype, buffer)


def test_buffer_claims_zeroed_space_and_cleans_up_after_an_unread_sums():
    buffer = SumsBuffer(torch.zeros(64))
    first = _sums(buffer, torch.randn(2, 8), torch.float16)
    assert buffer.pending and first.shape == (2, 8)
    second = buffer.claim(4, 4)  # the first was never read: its values must not leak into this one
    assert buffer.pending and not second.any() and not buffer.data.any()
    with pytest.raises(ValueError, match="holds 64 floats, \\[5, 13\\] needs 65"):
        buffer.claim(5, 13)
    columns = buffer.claim(3, 4, slots=16)  # [column][slot], as the Hopper GEMM leaves them
    assert columns.shape == (3, 4) and columns.stride() == (1, 16) and columns.data_ptr() == buffer.data.data_ptr()
    with pytest.raises(ValueError, match="\\[3, 5\\] in 16 slots a column needs 80"):
        buffer.claim(3, 5, slots=16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_materialize_rounds_like_the_matmul_and_zeroes(dtype):
    buffer = SumsBuffer(torch.zeros(100))
    values = torch.randn(3, 20) * 100
    sums = _sums(buffer, values, dtype)
    y = as_tensor(sums)
    assert y.dtype == dtype and torch.equal(y, values.to(dtype))
    assert not buffer.pending and not buffer.data.any()
    assert as_tensor(y) is y


def _slots(layout: str, t: int) -> int | None:
    """Token slots a column for a layout id: rows (None), or columns as the Hopper GEMM's tile
    sizes give them (16 to 128, at least t)."""
    return None if layout == "rows" else max(16, 1 << (t - 1).bit_length())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("t,nh,nkv,d", [(3, 9, 3, 64), (1, 32, 8, 128), (8, 32, 32, 128), (40, 8, 2, 64)])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_fused_readers_take_sums_as_the_tensor_they_stand_for(dtype, device, t, nh, nkv, d, layout):
    """The readers given sums equal (bit for bit) the reader given the tensor: on the GPU the Triton
    kernels' FROM_SUMS paths, the q/k/v sums kernels and the column readers (server.models.column_sums),
    on the CPU materialize() then the usual path; sums as [t, n] rows (the GEMV's) and as [column][16-64
    token slots] (the Hopper GEMM's; 40 tokens take several token blocks a column), whose other
    slots stay zero."""
    slots = _slots(layout, t)
    g = torch.Generator(device=device).manual_seed(5)
    buffer = SumsBuffer(torch.zeros(1 << 19, device=device))
    h = 4096
    w = torch.rand(h, generator=g, device=device).to(dtype) + 0.5
    res = torch.randn(t, h, generator=g, device=device).to(dtype)
    values = torch.randn(t, h, generator=g, device=device)
    for residual in (None, res):
        want = fused.rms_norm(values.to(dtype), w, 1e-5, residual)
        got = fused.rms_norm(_sums(buffer, values, dtype, slots), w, 1e-5, residual)
        for a, b in zip(got, want):
            assert (a is None and b is None) or torch.equal(a, b)
        assert not buffer.pending and not buffer.data.any()
    gu = torch.randn(t, 2 * h, generator=g, device=device)
    assert torch.equal(fused.silu_mul(_sums(buffer, gu, dtype, slots)), fused.silu_mul(gu.to(dtype)))
    assert not buffer.pending and not buffer.data.any()
    qkv = torch.randn(t, (nh + 2 * nkv) * d, generator=g, device=device)
    emb = torch.randn(t, 1, d, generator=g, device=device)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    want = qkv_reader.qkv_rotary(qkv.to(dtype, copy=True), nh, nkv, d, cos, sin)  # rotates in place
    got = qkv_reader.qkv_rotary(_sums(buffer, qkv, dtype, slots), nh, nkv, d, cos, sin)
    assert [x.shape for x in got] == [(t, nh, d), (t, nkv, d), (t, nkv, d)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert not buffer.pending and not buffer.data.any()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("t,slots", [(13, 16), (70, 128)])
@pytest.mark.parametrize("h", [576, 1000])
def test_column_readers_take_partial_blocks(device, t, slots, h):
    """The column readers where neither the tokens nor the columns fill their blocks: 13 or 70 tokens
    (a partial last block of tokens), widths of 576 (SmolLM2) and 1000 columns (a partial last
    block of 128), [column][slot] sums with slots past the tokens. sums_rows and the SwiGLU equal the
    tensor path bit for bit and leave the buffer zero; so does the RMSNorm, which reads sums_rows' rows."""
    g = torch.Generator(device=device).manual_seed(23)
    buffer = SumsBuffer(torch.zeros(1 << 18, device=device))
    values = torch.randn(t, h, generator=g, device=device) * 3
    assert torch.equal(column_sums.sums_rows(_sums(buffer, values, torch.float16, slots)), values.half())
    assert not buffer.pending and not buffer.data.any()
    assert torch.equal(fused.silu_mul(_sums(buffer, values, torch.float16, slots)), fused.silu_mul(values.half()))
    assert not buffer.pending and not buffer.data.any()
    w = torch.rand(h, generator=g, device=device).half() + 0.5
    res = torch.randn(t, h, generator=g, device=device).half()
    got = fused.rms_norm(_sums(buffer, values, torch.float16, slots), w, 1e-6, res)
    want = fused.rms_norm(values.half(), w, 1e-6, res)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not buffer.pending and not buffer.data.any()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("heads_per_program", [1, 2, 8, 64])
def test_qkv_reader_splits_a_row_over_programs(device, heads_per_program, monkeypatch):
    """However many heads one program of the q/k/v reader takes (a partial last block included:
    7 + 2 * 3 = 13 heads), it equals the tensor path and leaves the buffer zeroed."""
    monkeypatch.setattr(qkv_reader, "QKV_HEADS_PER_PROGRAM", heads_per_program)
    g = torch.Generator(device=device).manual_seed(11)
    buffer = SumsBuffer(torch.zeros(1 << 14, device=device))
    t, nh, nkv, d = 5, 7, 3, 32
    qkv = torch.randn(t, (nh + 2 * nkv) * d, generator=g, device=device)
    emb = torch.randn(t, 1, d, generator=g, device=device)
    cos, sin = emb.cos().half(), emb.sin().half()
    want = qkv_reader.qkv_rotary(qkv.half(), nh, nkv, d, cos, sin)
    got = qkv_reader.qkv_rotary(_sums(buffer, qkv, torch.float16), nh, nkv, d, cos, sin)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert not buffer.pending and not buffer.data.any()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_qkv_reader_stores_k_and_v_in_the_cache(device, dtype, layout):
    """Given the layer's KVSlots, the q/k/v sums kernel also stores k and v (rounded and rotated as
    it returns them) in their tokens' cache slots and nowhere else, and says so (stored); where
    the kernel does not run (plain CPU) or the cache does not fit, nothing is stored and the
    attention writes them as before."""
    g = torch.Generator(device=device).manual_seed(17)
    buffer = SumsBuffer(torch.zeros(1 << 14, device=device))
    t, nh, nkv, d = 3, 6, 2, 32
    qkv = torch.randn(t, (nh + 2 * nkv) * d, generator=g, device=device)
    emb = torch.randn(t, 1, d, generator=g, device=device)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    want = qkv_reader.qkv_rotary(qkv.to(dtype, copy=True), nh, nkv, d, cos, sin)
    kc = torch.zeros(6, 4, nkv, d, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([21, 2, 9], device=device)
    kv = qkv_reader.KVSlots(kc, vc, slots)
    slots_a_column = _slots(layout, t)
    got = qkv_reader.qkv_rotary(_sums(buffer, qkv, dtype, slots_a_column), nh, nkv, d, cos, sin, kv)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert kv.stored == fused.use_triton(qkv, dtype)
    if kv.stored:
        assert torch.equal(kc.view(-1, nkv, d)[slots], want[1]) and torch.equal(vc.view(-1, nkv, d)[slots], want[2])
        others = torch.ones(24, dtype=torch.bool, device=device)
        others[slots] = False
        assert not kc.view(-1, nkv, d)[others].any() and not vc.view(-1, nkv, d)[others].any()
    else:
        assert not kc.any() and not vc.any()
    wrong = qkv_reader.KVSlots(torch.zeros(6, 4, nkv + 1, d, device=device, dtype=dtype),
                          torch.zeros(6, 4, nkv + 1, d, device=device, dtype=dtype), slots)
    short = qkv_reader.KVSlots(kc.clone().zero_(), vc.clone().zero_(), slots[:2])  # fewer slots than tokens
    for bad in (wrong, short):
        qkv_reader.qkv_rotary(_sums(buffer, qkv, dtype, slots_a_column), nh, nkv, d, cos, sin, bad)
        assert not bad.stored and not bad.k_cache.any()
    assert not buffer.pending and not buffer.data.any()


class SumsLinear(nn.Linear):
    """A dense linear that leaves its output as Sums in a shared buffer, as the CUDA GEMV does."""

    buffer = SumsBuffer(torch.zeros(1 << 14))
    made = 0
    columns: list[tuple[int, bool]] = []  # (out_features, columns) of every call

    def forward_sums(self, x: torch.Tensor, columns: bool = False) -> Sums:
        SumsLinear.made += 1
        SumsLinear.columns.append((self.out_features, columns))
        return _sums(self.buffer, self(x).float(), x.dtype)


def test_decoder_hands_every_sums_to_a_reader():
    """Every projection that may leave Sums (fused q/k/v and gate/up, o, down) does, and the model's
    output equals the plain model's exactly: each Sums reached a reader, which left the buffer zero.
    q/k/v and gate/up tell the layer that their readers take [column][slot] sums as they are
    (columns=True); o and down, read by the RMSNorm, do not."""
    config = LlamaConfig.from_hf(tiny_hf_config())
    plain = LlamaForCausalLM(config).eval()
    plain.fuse_projections()
    made = LlamaForCausalLM(config, lambda i, o, b, name: SumsLinear(i, o, bias=b)).eval()
    for layer in made.model.layers:  # fused by hand: concat_linears keeps only plain nn.Linear
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = SumsLinear(attn.q_proj.in_features, attn.q_size + 2 * attn.kv_size, bias=False)
        mlp.gate_up_proj = SumsLinear(mlp.gate_proj.in_features, 2 * mlp.gate_proj.out_features, bias=False)
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj
    made.load_state_dict(plain.state_dict())
    ids = torch.tensor([3, 14, 15, 92, 65])
    attn = CausalAttention([5])
    with torch.no_grad():
        want = plain(ids, torch.arange(5), attn)
        SumsLinear.made = 0
        SumsLinear.columns.clear()
        got = made(ids, torch.arange(5), attn)
        assert SumsLinear.made == 4 * config.num_hidden_layers
        h, i = config.hidden_size, config.intermediate_size
        want_columns = [(config.q_size + 2 * config.kv_size, True), (h, False), (2 * i, True), (h, False)]
        assert SumsLinear.columns == want_columns * config.num_hidden_layers
        assert torch.equal(got, want)
        assert not SumsLinear.buffer.pending and not SumsLinear.buffer.data.any()
        layer = made.model.layers[0]  # the modules' own forward still gives tensors
        assert isinstance(layer.mlp(torch.randn(2, config.hidden_size)), torch.Tensor)
        assert not SumsLinear.buffer.pending


def test_forward_sums_keeps_replaced_forwards_and_hooks():
    """The self-check replaces a layer's forward and tools hook modules: forward_sums must not go
    around either."""
    from tests.kernels.layers import random_layer

    layer = random_layer(64, 32, 4, 32)
    assert layer.prepare("torch") == "torch"
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer.forward_sums(x), layer(x))
    seen = []
    handle = layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    layer.forward_sums(x)
    assert seen == [(2, 32)]
    handle.remove()
    layer.forward = lambda inp: torch.zeros(inp.shape[0], 5)
    assert layer.forward_sums(x).shape == (2, 5)

def _cuda_layer(k, n, bits, group_size, sym=True, desc_act=False, bias=False):
    from tests.kernels.layers import random_layer

    layer = random_layer(k, n, bits, group_size, sym, FORMAT_V2, desc_act, bias, seed=k + n + bits,
                         device="cuda")
    assert layer.prepare("cuda") == "cuda"
    return layer


@pytest.mark.parametrize("k,n,bits,group_size,sym,desc_act", [
    (576, 192, 4, 128, True, False), (576, 1536, 8, 64, False, False), (1536, 576, 4, 32, False, True),
    (4096, 4096, 4, 128, True, False), (4096, 12288, 4, -1, False, False), (584, 72, 4, 32, True, False)])
@pytest.mark.gpu
def test_gemv_sums_are_the_products(k, n, bits, group_size, sym, desc_act):
    """The GEMV that leaves its fp32 sums (apply_sums, 1-16 tokens): the sums match the float32
    reference and, rounded to x's dtype, the y the same call writes otherwise; materialize() gives
    that y and leaves the shared buffer zero for the next call, also when a Sums was abandoned.
    With the wgmma GEMM on (Hopper), 9-16-token calls that the pipelined GEMV does not take go to
    it, which leaves them as [column][token slot], and so do those whose reader takes that layout
    (columns=True: the q/k/v and SwiGLU projections) also where the pipelined GEMV takes the layer;
    with it off, the register GEMV leaves their sums (two 8-token blocks)."""
    layer = _cuda_layer(k, n, bits, group_size, sym, desc_act)
    buffer = cuda_backend.workspace(torch.device("cuda")).sums
    g = torch.Generator(device="cuda").manual_seed(k + n)
    for wgmma in (True, False):
        with cuda_backend.gemm_launch_options(wgmma=wgmma):
            for dtype in (torch.float16, torch.bfloat16):
                for m in range(1, cuda_backend.SUMS_MAX_M + 1):
                    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
                    for columns in (False, True):
                        _check_sums(layer, x, buffer, wgmma, columns)
    x = x[:8]  # the GEMV takes 8 tokens of every layer
    layer.forward_sums(x)  # abandoned: never read
    again = layer.forward_sums(x)
    torch.testing.assert_close(again.materialize(), layer(x), rtol=1e-2, atol=1e-3)
    assert not buffer.data.any()


def _check_sums(layer, x, buffer, wgmma, columns=False):
    m, dtype = x.shape[0], x.dtype
    ref = kernels.reference(layer, x)
    sums = layer.forward_sums(x, columns=columns)
    gemm = m >= cuda_backend.WGMMA_MIN_M and wgmma and cuda_backend.wgmma_available()
    column_gemm = columns and cuda_backend.COLUMN_SUMS and cuda_backend.GEMM_SUMS and layer.out_features % 8 == 0
    gemv = not gemm or (cuda_backend.pipe_takes(layer.kernel_state, m) and not column_gemm)
    want = "gemv" if gemv else ("gemm" if cuda_backend.GEMM_SUMS else None)
    assert cuda_backend.sums_op(m, layer.kernel_state, x.device, columns) == want, (m, wgmma, columns)
    leaves = want is not None
    if not leaves:
        assert isinstance(sums, torch.Tensor) and sums.dtype == dtype and not buffer.pending
        err = ((sums.float() - ref).norm() / ref.norm()).item()
        assert err < (2e-3 if dtype == torch.float16 else 1.2e-2), f"m={m} {dtype}: y rel err {err:.2e}"
        return
    assert isinstance(sums, Sums) and sums.shape == (m, layer.out_features) and sums.dtype == dtype
    assert sums.data.stride() == ((layer.out_features, 1) if gemv else (1, 16)), sums.data.stride()
    assert sums.data.dtype == torch.float32 and buffer.pending
    err = ((sums.data - ref).norm() / ref.norm()).item()
    assert err < (5e-4 if dtype == torch.float16 else 3e-3), f"m={m} {dtype}: sums rel err {err:.2e}"
    y = layer(x)
    got = sums.materialize()
    assert got.dtype == dtype and not buffer.pending and not buffer.data.any()
    # the same products, summed in another order by the atomics: equal up to an ulp of y
    torch.testing.assert_close(got, y, rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-3)


@pytest.mark.parametrize("k,n,bits,group_size,sym", [
    (4096, 4096, 4, 128, True), (4096, 12288, 4, 128, False), (11008, 4096, 4, 128, True),
    (1040, 8256, 4, 32, False), (576, 192, 8, 64, True), (4096, 22016, 4, -1, True)])
@pytest.mark.gpu
def test_gemm_sums_are_the_products(k, n, bits, group_size, sym):
    """The Hopper wgmma GEMM leaving its fp32 sums (9-128 tokens): [column][t token slots] in the
    buffer (t the tile's token count), returned as an [m, n] view of strides (1, t). Whole and split
    tiles (stream-K, evenly split, whole), every tile size, token counts that fill part of a quad:
    the sums match the float32 reference and, rounded, the y the same call writes otherwise, and
    every float of the buffer outside the view (the slots of tokens >= m, the layer's tail) stays
    zero for the next call."""
    if not cuda_backend.wgmma_available():
        pytest.skip("needs the sm_90a wgmma kernel")
    layer = _cuda_layer(k, n, bits, group_size, sym, False)
    ext = cuda_backend.extension()
    g = torch.Generator(device="cuda").manual_seed(k + n + 1)
    for m in (9, 13, 16, 17, 31, 32, 33, 57, 64, 65, 100, 127, 128):
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
            t = ext.gemm_sums_tokens(m)
            assert t >= m and t in (16, 32, 64, 128)
            buf = torch.zeros(t * n + 64, device="cuda")
            sums = cuda_backend.matmul(layer.kernel_state, x, op="gemm", sums=buf)
            assert sums.shape == (m, n) and sums.stride() == (1, t) and sums.data_ptr() == buf.data_ptr()
            ref = kernels.reference(layer, x)
            err = ((sums - ref).norm() / ref.norm()).item()
            assert err < (5e-4 if dtype == torch.float16 else 3e-3), f"m={m} {dtype}: sums rel err {err:.2e}"
            rest = buf.clone()
            rest.as_strided((m, n), (1, t)).zero_()
            assert not rest.any(), f"m={m} {dtype}: sums written outside the [m, n] view"
            y = cuda_backend.matmul(layer.kernel_state, x, op="gemm")
            torch.testing.assert_close(sums.to(dtype), y, rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-3)
    x = torch.randn(cuda_backend.GEMM_SUMS_MAX_M + 1, k, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="sums: gemm of m <= 128 rows only"):
        cuda_backend.matmul(layer.kernel_state, x, op="gemm", sums=torch.zeros(256 * n, device="cuda"))


@pytest.mark.gpu
def test_apply_sums_leaves_other_calls_to_apply():
    """Calls the sums path does not take come back as y: more tokens than the GEMV and the wgmma GEMM
    leave sums for, a bias, float32 input."""
    plain = _cuda_layer(576, 192, 4, 128)
    biased = _cuda_layer(576, 192, 4, 128, bias=True)
    x = torch.randn(max(cuda_backend.SUMS_MAX_M, cuda_backend.GEMM_SUMS_MAX_M) + 1, 576, device="cuda",
                    dtype=torch.float16)
    for layer, xin in ((plain, x), (biased, x[:1]), (plain, x[:1].float())):
        y = layer.forward_sums(xin)
        assert isinstance(y, torch.Tensor) and y.dtype == xin.dtype
        torch.testing.assert_close(y.float(), kernels.reference(layer, xin), rtol=2e-3, atol=2e-3)
