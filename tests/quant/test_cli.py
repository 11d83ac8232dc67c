"""`quantserve quantize` / `quantserve eval` as a user runs them (subprocesses), and GPTQ as the
first-boot default: real checkpoints on disk, loaded back through the serving path."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from quant.checkpoint import open_checkpoint
from tests.conftest import ROOT, save_plain_llama


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", QUANTSERVE_LOG_LEVEL="warning")
    proc = subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plain(tmp_path_factory, default_tokenizer_dir):
    """A plain (float) tiny Llama directory, embeddings scaled up so its text is not uniform."""
    return save_plain_llama(tmp_path_factory.mktemp("plain"), default_tokenizer_dir,
                            edit=lambda m: m.model.embed_tokens.weight.normal_(0, 0.5))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from quant import corpus

    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(corpus.text(1)[:20000], encoding="utf-8")
    return path


def test_quantize_gptq_writes_a_sharded_checkpoint_that_serves(plain, tmp_path, text_file):
    out = tmp_path / "q"
    proc = cli("quantize", str(plain), str(out), "--bits", "4", "--group-size", "32", "--asym",
               "--desc-act", "--no-static-groups", "--calibration", "builtin", "--num-samples", "8",
               "--seq-len", "64", "--shard-size", "3MB", "--device", "cpu", "--json")
    report = last_json(proc)
    assert report["method"] == "gptq" and report["order"] == "act" and report["layers"] == 14
    assert report["loss_sum"] > 0 and report["num_samples"] == 8 and report["seq_len"] == 64
    assert len(report["files"]) > 1  # past --shard-size: shards plus an index
    assert (out / "model.safetensors.index.json").exists()
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["desc_act"] is True and qc["sym"] is False and qc["checkpoint_format"] == "gptq_v2"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    ckpt = open_checkpoint(out)
    assert len(ckpt.quantized_modules()) == 14
    g_idx = dict(ckpt.tensors())["model.layers.0.mlp.down_proj.g_idx"]
    assert not torch.equal(g_idx, torch.arange(128, dtype=g_idx.dtype) // 32)  # act-order layout
    # the served model of that checkpoint tracks the float model on real text
    quant = last_json(cli("eval", str(out), "--text", str(text_file), "--seq-len", "128",
                          "--max-tokens", "1024", "--device", "cpu", "--json"))
    fp = last_json(cli("eval", str(plain), "--unquantized", "--text", str(text_file), "--seq-len",
                       "128", "--max-tokens", "1024", "--device", "cpu", "--json"))
    assert quant["tokens"] == fp["tokens"] > 500
    assert math.isfinite(quant["perplexity"]) and quant["perplexity"] > 1
    assert abs(math.log(quant["perplexity"] / fp["perplexity"])) < 0.1


def test_quantize_defaults_to_act_order_with_static_groups(plain, tmp_path):
    """GPTQ's default: act-order processing with static groups, so the checkpoint says desc_act but
    keeps g_idx = k // group_size (no permutation when served); RTN keeps both off."""
    out = tmp_path / "q"
    report = last_json(cli("quantize", str(plain), str(out), "--group-size", "32", "--calibration",
                           "builtin", "--num-samples", "4", "--seq-len", "32", "--device", "cpu", "--json"))
    assert report["order"] == "act" and report["desc_act"] is True and report["static_groups"] is True
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["desc_act"] is True and qc["static_groups"] is True
    g_idx = dict(open_checkpoint(out).tensors())["model.layers.0.mlp.down_proj.g_idx"]
    assert torch.equal(g_idx, torch.arange(128, dtype=g_idx.dtype) // 32)
    rtn = last_json(cli("quantize", str(plain), str(tmp_path / "r"), "--method", "rtn", "--device", "cpu",
                        "--json"))
    assert rtn["desc_act"] is False and rtn["static_groups"] is False
    bad = cli("quantize", str(plain), str(tmp_path / "b"), "--no-desc-act", "--static-groups", check=False)
    assert bad.returncode != 0 and "--static-groups needs act-order" in bad.stderr


@torch.no_grad()
def test_gptq_beats_rtn_on_the_same_model(plain, tmp_path, text_file):
    """3-bit checkpoints written by the CLI, loaded through the serving path: GPTQ's logits are
    closer to the float model's than RTN's on held-out text (a random model's perplexity is
    near the vocabulary size either way, so the logits are what can tell them apart)."""
    from quant.eval import tokenize
    from server.first_boot import load_float_from_dir
    from server.loader import load_model
    from server.models.attention import CausalAttention

    float_model, _, tokenizer = load_float_from_dir(plain)
    ids = tokenize(tokenizer, text_file.read_text(encoding="utf-8"))[-256:]  # not calibration text
    pos = torch.arange(ids.numel())

    def logits(model):
        return model.compute_logits(model(ids, pos, CausalAttention([ids.numel()]))).float()

    want = logits(float_model)
    err = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        cli("quantize", str(plain), str(out), "--method", method, "--bits", "3", "--group-size",
            "32", "--calibration", str(text_file), "--num-samples", "16", "--seq-len", "128",
            "--device", "cpu")
        model = load_model(str(out), device="cpu", dtype="float32", kernel="torch").model
        err[method] = float((logits(model) - want).norm() / want.norm())
    assert err["gptq"] < 0.9 * err["rtn"], err  # measured 0.78


def test_bad_arguments_exit_with_one_line(plain, tmp_path, text_file):
    cases = [
        (("quantize", str(plain), str(tmp_path / "a"), "--method", "rtn", "--desc-act"),
         "--desc-act applies to GPTQ only"),
        (("quantize", str(plain), str(tmp_path / "b"), "--shard-size", "lots"), "size 'lots'"),
        (("quantize", str(plain), str(tmp_path / "c"), "--calibration", "no-such-source"),
         "neither a file nor one of"),
        (("quantize", str(plain), str(plain)), "exists and is not empty"),
        (("eval", str(plain), "--text", str(tmp_path / "missing.txt")), "no such file"),
        (("eval", str(plain), "--unquantized", "--text", str(text_file), "--seq-len", "100000"),
         "fewer than one window"),
    ]
    for args, message in cases:
        proc = cli(*args, "--device", "cpu", check=False)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert message in lines[-1] and lines[-1].startswith(f"quantserve {args[0]}: error:"), lines
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_first_boot_quantizes_with_gptq_by_default(plain, tmp_path, monkeypatch):
    from server import first_boot
    from server.first_boot import QuantizeSpec
    from server.loader import load_model

    spec = QuantizeSpec(group_size=32, calibration="builtin", num_samples=8, seq_len=64,
                        device="cpu")
    assert QuantizeSpec().method == "gptq"
    loaded = load_model(str(plain), device="cpu", cache_dir=tmp_path, spec=spec)
    assert loaded.path.parent == tmp_path / "models"
    assert loaded.path.name.startswith("plain") and "gptq-4bit-g32-act-static-cal" in loaded.path.name
    meta = json.loads((loaded.path / "quantize_config.json").read_text())
    assert meta["meta"]["method"] == "gptq" and meta["group_size"] == 32
    def no_second_quantization(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been loaded")

    monkeypatch.setattr(first_boot, "quantize_float_model", no_second_quantization)
    again = load_model(str(plain), device="cpu", cache_dir=tmp_path, spec=spec)  # cached now
    assert again.path == loaded.path


@pytest.mark.gpu
def test_first_boot_on_a_gpu_writes_calibration_there(plain, tmp_path):
    """Default calibration (the model writes half of it) with quantisation on CUDA: the float
    model goes to the GPU for the writing and comes back unchanged; the checkpoint serves there."""
    from server.first_boot import QuantizeSpec, load_float_from_dir
    from server.loader import load_model

    before = {k: v.clone() for k, v in load_float_from_dir(plain)[0].state_dict().items()}
    spec = QuantizeSpec(group_size=32, num_samples=8, seq_len=64, device="cuda")
    loaded = load_model(str(plain), device="cuda", cache_dir=tmp_path, spec=spec)
    assert next(loaded.model.parameters()).device.type == "cuda"
    assert json.loads((loaded.path / "quantize_config.json").read_text())["meta"]["method"] == "gptq"
    from server.first_boot import quantize_float_model

    model, _, tokenizer = load_float_from_dir(plain)
    real_to = model.to
    moves = []
    model.to = lambda *a, **k: (moves.append(str(a[0]) if a else k), real_to(*a, **k))[1]
    quantize_float_model(model, spec, tokenizer, progress=False)
    assert moves[:2] == ["cuda", "cpu"]
    for name, t in model.state_dict().items():
        if name in before and not name.startswith("model.layers."):
            assert torch.equal(t, before[name]), name  # embeddings, norms, head: untouched
