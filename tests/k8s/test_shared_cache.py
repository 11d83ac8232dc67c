"""Replicas share one model-cache volume (the Deployment's PVC): when several boot together on an
empty cache, one quantises the model and the others wait for it and load its checkpoint."""

from __future__ import annotations

import threading
import time

import torch

from quant.checkpoint import open_checkpoint, save_checkpoint
from server import first_boot
from server.models.config import LlamaConfig
from server.models.llama import LlamaForCausalLM
from tests.conftest import tiny_hf_config

REPLICAS = 3


def plain_model_dir(out, tokenizer_dir):
    """A float (unquantised) tiny Llama in Hugging Face layout, as a user would point --model at."""
    from transformers import AutoTokenizer

    cfg = tiny_hf_config()
    torch.manual_seed(0)
    state = LlamaForCausalLM(LlamaConfig.from_hf(cfg)).state_dict()
    state.pop("lm_head.weight", None)  # tied to the embeddings
    save_checkpoint(out, state, cfg, None, float_dtype=torch.float32,
                    tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    return out


def test_replicas_booting_together_quantize_once(tmp_path, default_tokenizer_dir, monkeypatch):
    source = plain_model_dir(tmp_path / "plain-tiny", default_tokenizer_dir)
    cache = tmp_path / "shared-cache"
    spec = first_boot.QuantizeSpec(method="rtn", bits=4, group_size=32)
    loads = []
    real_load = first_boot.load_float_from_dir

    def slow_load(path):  # every replica reads the float weights first: make that take a while
        loads.append(threading.get_ident())
        time.sleep(0.5)
        return real_load(path)

    monkeypatch.setattr(first_boot, "load_float_from_dir", slow_load)
    # Each thread opens the lock file itself, and flock treats separate opens as separate owners,
    # exactly as it treats separate processes (or pods on one volume).
    start = threading.Barrier(REPLICAS)
    results, errors = [], []

    def boot():
        start.wait()
        try:
            results.append(first_boot.ensure_quantized(str(source), cache, spec))
        except Exception as exc:  # noqa: BLE001 - the test reports any
            errors.append(exc)

    threads = [threading.Thread(target=boot) for _ in range(REPLICAS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(loads) == 1, f"{len(loads)} replicas quantised the same model into one cache"
    assert len(set(results)) == 1 and len(results) == REPLICAS
    path, name = results[0]
    assert name == "plain-tiny"
    ckpt = open_checkpoint(path)
    assert ckpt.quant_config is not None and ckpt.quant_config.group_size == 32
    leftovers = sorted(p.name for p in path.parent.iterdir() if p != path)
    assert leftovers == [f".{path.name}.lock"]
    # a later boot finds the checkpoint and neither loads nor waits
    assert first_boot.ensure_quantized(str(source), cache, spec) == results[0]
    assert len(loads) == 1
