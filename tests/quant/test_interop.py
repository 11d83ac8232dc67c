"""Checkpoints cross the ecosystem both ways, with the same numbers on each side.

- A tiny Llama quantised by GPTQModel 7.6.0 (v1 symmetric with act-order, and v2 asymmetric) loads
  into quantserve and gives the logits of GPTQModel's own torch path.
- Checkpoints quantserve writes (v1 symmetric, v2 asymmetric) load with transformers + optimum +
  gptqmodel and give quantserve's logits.
Both sides run in bfloat16 on the CPU (GPTQModel's torch kernel takes fp16/bf16 only), so the
tolerance is bf16's: relative error of the logits < 2%.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

gptqmodel = pytest.importorskip("gptqmodel", reason="the interop extra (pip install '.[interop]')")

from quant import kernels  # noqa: E402
from quant.checkpoint import open_checkpoint  # noqa: E402
from server.loader import build_model  # noqa: E402
from server.models.attention import CausalAttention  # noqa: E402
from tests.conftest import make_tiny_checkpoint, save_plain_llama  # noqa: E402

IDS = torch.arange(100, 148)
REL_TOL = 2e-2


def ours(path, kernel: str = "torch") -> torch.Tensor:
    model = build_model(open_checkpoint(path), torch.device("cpu"), torch.bfloat16)
    kernels.prepare_model(model, kernel)
    with torch.no_grad():
        hidden = model(IDS, torch.arange(IDS.numel()), CausalAttention([IDS.numel()]))
        return model.compute_logits(hidden)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory, default_tokenizer_dir):
    return save_plain_llama(tmp_path_factory.mktemp("plain"), default_tokenizer_dir)


def gptqmodel_quantize(plain, out, **kw):
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(str(plain), QuantizeConfig(bits=4, group_size=32, **kw), device="cpu")
    texts = [f"The quick brown fox {i} jumps over the lazy dog near the river bank. " * 6
             for i in range(16)]
    model.quantize(texts, batch_size=4)
    model.save(str(out))
    return out


def gptqmodel_logits(path) -> torch.Tensor:
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(str(path), backend=BACKEND.TORCH, device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        return model.model(IDS.unsqueeze(0)).logits[0].float()


@pytest.mark.parametrize("kw,fmt", [({"desc_act": True, "sym": True}, "gptq"),
                                     ({"desc_act": False, "sym": False, "format": "gptq_v2"}, "gptq_v2")])
def test_gptqmodel_checkpoint_serves_with_its_logits(plain_dir, tmp_path, kw, fmt):
    path = gptqmodel_quantize(plain_dir, tmp_path / "gq", **kw)
    ck = open_checkpoint(path)
    assert ck.quant_config.checkpoint_format == fmt and ck.quant_config.desc_act == kw["desc_act"]
    want = gptqmodel_logits(path)
    for kernel in ("torch", kernels.available("cpu")[0]):
        got = ours(path, kernel)
        assert rel(got, want) < REL_TOL, (kernel, rel(got, want))


@pytest.mark.parametrize("sym", [True, False])
def test_our_checkpoint_loads_in_transformers(tmp_path, default_tokenizer_dir, sym):
    from transformers import AutoModelForCausalLM

    path = make_tiny_checkpoint(tmp_path / "ours", default_tokenizer_dir, sym=sym,
                                tie_word_embeddings=False)
    assert open_checkpoint(path).quant_config.checkpoint_format == ("gptq" if sym else "gptq_v2")
    hf = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=torch.bfloat16)
    assert any("QuantLinear" in type(m).__name__ or "Linear" in type(m).__name__ and
               hasattr(m, "qweight") for m in hf.modules())
    with torch.no_grad():
        want = hf(IDS.unsqueeze(0)).logits[0].float()
    assert rel(ours(path), want) < REL_TOL


def test_asymmetric_v2_round_trips_through_gptqmodel(tmp_path, default_tokenizer_dir):
    """Ours (v2, zero points of 0 included) -> GPTQModel loads it -> same logits."""
    def non_negative_group(model):  # one group whose minimum is 0: its true zero point is 0
        w = model.model.layers[0].mlp.down_proj.weight
        w[:, :32] = w[:, :32].abs()

    path = make_tiny_checkpoint(tmp_path / "asym", default_tokenizer_dir, sym=False, bits=4,
                                edit=non_negative_group, tie_word_embeddings=False)
    zeros = [t for n, t in open_checkpoint(path).tensors() if n.endswith(".qzeros")]
    from quant.pack import unpack_qzeros

    assert any(bool((unpack_qzeros(z, 4, z.shape[1] * 8, "gptq_v2") == 0).any()) for z in zeros)
    assert rel(ours(path), gptqmodel_logits(path)) < REL_TOL
