"""The Triton kernels of server.models.fused against their torch paths: on a GPU, and on the CPU
through Triton's interpreter (TRITON_INTERPRET=1; test_triton_interpreter runs this module and
test_sums that way in a subprocess). The interpreter checks the kernels' logic and rounding, not
their speed, their races or bfloat16 (it computes in numpy, which has no bfloat16)."""

import pytest
import torch

from server.models import fused, qkv_reader
from tests.kernels.triton_devices import DEVICES, triton_or_skip

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float32, id="fp32")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_triton_kernels_equal_torch(dtype, device):
    triton_or_skip(device, dtype)
    g = torch.Generator(device=device).manual_seed(1)
    for t, h in [(1, 576), (7, 4096), (33, 8192)]:
        x = torch.randn(t, h, device=device, generator=g).to(dtype)
        r = torch.randn(t, h, device=device, generator=g).to(dtype)
        w = torch.randn(h, device=device, generator=g).to(dtype)
        for res in (None, r):
            got, got_r = fused.rms_norm(x, w, 1e-5, res)
            want, want_r = fused.rms_norm_torch(x, w, 1e-5, res)
            torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
            if res is not None:
                torch.testing.assert_close(got_r, want_r, atol=0, rtol=0)
        gu = torch.randn(t, 2 * h, device=device, generator=g).to(dtype)
        torch.testing.assert_close(fused.silu_mul(gu), fused.silu_mul_torch(gu), atol=1e-2, rtol=1e-2)
    for t, nh, nkv, d in [(5, 9, 3, 64), (3, 32, 32, 128), (2, 64, 8, 128)]:
        qkv = torch.randn(t, (nh + 2 * nkv) * d, device=device, generator=g).to(dtype)
        q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
        q, k = q.view(t, nh, d), k.view(t, nkv, d)
        pos = torch.randint(0, 4000, (t,), device=device, generator=g).float()
        freqs = pos[:, None] * (1.0 / 10000 ** (torch.arange(0, d, 2, device=device) / d))[None]
        emb = torch.cat([freqs, freqs], -1)[:, None, :]
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        want_q, want_k = fused.rotary_torch(q.clone(), k.clone(), cos, sin)
        got_q, got_k, got_v = qkv_reader.qkv_rotary(qkv.clone(), nh, nkv, d, cos, sin)
        fused.rotary_(q, k, cos, sin)  # in place, into qkv
        for got, want in ((q, want_q), (k, want_k), (got_q, want_q), (got_k, want_k)):
            torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
        assert torch.equal(got_v.reshape(t, -1), v)
