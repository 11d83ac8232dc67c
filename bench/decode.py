"""Decode throughput of the engine against the weight-bandwidth roofline and the same engine in fp16.

GPU: a dummy (random-weight) model of a preset shape, 4-bit g128 by default, built directly on
the device; for each batch size, B requests with a 32-token prompt decode greedily through the
real engine (scheduler, CUDA graphs, sampler) and the decode steps are timed: wall time per step
(host and GPU, as a user sees it) and, where the step runs as a CUDA graph, the GPU time of that
graph replayed back to back (`gpu_step_ms`: the kernels alone, without the host's run-to-run
spread, which is several percent between processes with the same kernels). The baseline is the
same engine on a dense fp16 model of the same shape (skipped when it cannot fit). The roofline is
the bytes one decode step must read (packed weights + lm_head + the KV cache at the mean context)
over the measured copy bandwidth.

CPU: the default model (real weights, quantised) against transformers' own fp32 `generate()` on
the same weights, batch 1, in the same run.

    python -m bench.decode --preset llama-2-7b --batch 1 16
    python -m bench.decode --cpu
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from bench.common import copy_bandwidth, device_name, write_result
from quant.format import QuantConfig
from quant.linear import QuantLinear
from server.config import EngineConfig
from server.dummy import build_dummy_model, dummy_config
from server.engine.engine import LLMEngine
from server.engine.sequence import SamplingParams
from server.loader import finalize

PROMPT_LEN = 32


def weight_bytes(model) -> tuple[int, int]:
    """(bytes read per decode step for the decoder linears, bytes of lm_head)."""
    linear = 0
    for m in model.model.layers.modules():
        if isinstance(m, QuantLinear):
            linear += sum(t.numel() * t.element_size() for t in (m.qweight, m.qzeros, m.scales))
        elif isinstance(m, torch.nn.Linear):
            linear += m.weight.numel() * m.weight.element_size()
    head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return linear, head


def kv_bytes_per_token(model) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.dtype.itemsize


def time_step_graph(engine: LLMEngine, batch: int, reps: int = 200, warmup: int = 10) -> float | None:
    """GPU milliseconds of one decode step of `batch` sequences as the engine runs it: its captured
    decode graph (the smallest captured size >= batch) replayed `reps` times back to back on the
    current stream, timed with CUDA events, on the inputs the engine's last step left in the graph's
    buffers. Nothing of the host's step (scheduling, input preparation, sampling) is included.
    Replaying only rewrites the step's own KV-cache slots and logits from the same inputs (equal up
    to the order of fp32 reductions). None where the step is not a graph (CPU, eager, batch too
    large)."""
    graphs = engine.runner.graphs
    if graphs is None or not graphs.can_run(batch):
        return None
    graph = graphs.graphs[next(s for s in graphs.batch_sizes if s >= batch)]
    for _ in range(warmup):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def time_decode(engine: LLMEngine, batch: int, steps: int, warmup: int = 8) -> dict:
    """Decode `steps` tokens for `batch` sequences; returns per-step wall time, tokens/s and the
    GPU time of the step's graph (time_step_graph; None where the step is not a graph)."""
    params = SamplingParams(max_tokens=steps + warmup + 1, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    vocab = engine.model.config.vocab_size
    for i in range(batch):
        prompt = torch.randint(0, vocab, (PROMPT_LEN,), generator=g).tolist()
        engine.add_request(f"b{batch}-{i}", prompt, params)
    while any(s.in_prefill or s.num_output_tokens == 0 for s in engine.requests.values()):
        engine.step()
    for _ in range(warmup):
        engine.step()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    dt = time.perf_counter() - t0
    gpu_ms = time_step_graph(engine, batch)
    for rid in list(engine.requests):
        engine.abort_request(rid)
    return {"batch": batch, "steps": steps, "step_ms": dt / steps * 1e3,
            "tokens_per_s": batch * steps / dt, "gpu_step_ms": gpu_ms,
            "mean_context": PROMPT_LEN + warmup + steps / 2}


def time_prefill(engine: LLMEngine, prompt_len: int, reps: int = 3) -> dict:
    """Time to first token of one prompt of `prompt_len` tokens on an idle engine (the scheduler
    prefills it in chunks of max_num_batched_tokens); median of `reps` after one warm-up."""
    vocab = engine.model.config.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(prompt_len)
    times = []
    for i in range(reps + 1):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.add_request(f"p{prompt_len}-{i}", prompt, params)
        while engine.requests:
            engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ttft = sorted(times[1:])[len(times[1:]) // 2]
    return {"prompt_len": prompt_len, "ttft_ms": ttft * 1e3, "prefill_tokens_per_s": prompt_len / ttft}


def gpu_main(args: argparse.Namespace) -> dict:
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    config = dummy_config(args.preset)
    quant = QuantConfig(bits=4, group_size=args.group_size, desc_act=args.desc_act)
    max_len = args.max_model_len or max([PROMPT_LEN + args.steps + 64] + [p + 8 for p in args.prefill])
    ecfg = EngineConfig(max_model_len=max_len, max_num_seqs=max(args.batch, default=1),
                        max_num_batched_tokens=max(1024, max(args.batch, default=1) * PROMPT_LEN),
                        kv_cache_gb=args.kv_gb,
                        cuda_graph_max_batch=args.graph_max_batch or max(args.batch, default=1))
    rows, prefill = [], []
    variants = [("int4", quant)] + ([] if args.no_fp16 else [("fp16", None)])
    for label, q in variants:
        try:
            model = build_dummy_model(config, q, dev, torch.float16)
        except torch.OutOfMemoryError:
            print(f"{label}: does not fit on this GPU, skipped")
            continue
        backends = finalize(model, args.kernel) if q is not None else {"cublas-fp16": model.fuse_projections()}
        lin, head = weight_bytes(model)
        per_tok_kv = kv_bytes_per_token(model)
        engine = LLMEngine(model, ecfg, eos_token_ids=[])
        for p_len in args.prefill:
            r = time_prefill(engine, p_len)
            r.update(variant=label, backends=backends)
            prefill.append(r)
            print(f"{label:5s} prefill {p_len:6d} tokens: TTFT {r['ttft_ms']:.1f} ms, "
                  f"{r['prefill_tokens_per_s']:.0f} tok/s")
        for b in args.batch:
            r = time_decode(engine, b, args.steps)
            step_bytes = lin + head + b * per_tok_kv * r["mean_context"]
            r.update(variant=label, backends=backends, weight_bytes=lin + head,
                     roofline_tokens_per_s=b * bw / step_bytes,
                     roofline_weights_only_tokens_per_s=b * bw / (lin + head))
            r["fraction_of_roofline"] = r["tokens_per_s"] / r["roofline_tokens_per_s"]
            rows.append(r)
            gpu = f"{r['gpu_step_ms']:.3f} ms" if r["gpu_step_ms"] is not None else "-"
            print(f"{label:5s} B={b:3d} {r['tokens_per_s']:9.1f} tok/s  step {r['step_ms']:.3f} ms  gpu {gpu}  "
                  f"roofline {r['roofline_tokens_per_s']:9.1f}  ({100 * r['fraction_of_roofline']:.0f}%)")
        del engine, model
        gc.collect()
        torch.cuda.empty_cache()
    for r in rows:
        base = next((x for x in rows if x["variant"] == "fp16" and x["batch"] == r["batch"]), None)
        if base is not None:
            r["speedup_vs_fp16"] = r["tokens_per_s"] / base["tokens_per_s"]
    for r in prefill:
        base = next((x for x in prefill if x["variant"] == "fp16" and x["prompt_len"] == r["prompt_len"]), None)
        if base is not None:
            r["speedup_vs_fp16"] = base["ttft_ms"] / r["ttft_ms"]
    return {"preset": args.preset, "group_size": args.group_size, "copy_bandwidth_bytes_per_s": bw,
            "max_num_batched_tokens": ecfg.max_num_batched_tokens, "max_model_len": max_len,
            "results": rows, "prefill": prefill}


def cpu_main(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from server.first_boot import default_gguf
    from server.loader import load_model

    gguf = default_gguf()
    steps = args.steps
    loaded = load_model("default", device="cpu", kernel=args.kernel)
    engine = LLMEngine(loaded.model, EngineConfig(kv_cache_gb=0.25), eos_token_ids=[])
    ours = time_decode(engine, 1, steps)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                              dtype=torch.float32).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        hf_s = time.perf_counter() - t0
    hf_row = {"variant": "transformers-fp32-generate", "batch": 1, "tokens_per_s": steps / hf_s}
    ours.update(variant=f"quantserve-{'/'.join(loaded.backends)}", backends=loaded.backends)
    ours["speedup_vs_transformers"] = ours["tokens_per_s"] / hf_row["tokens_per_s"]
    print(f"quantserve {ours['tokens_per_s']:.1f} tok/s vs transformers fp32 generate "
          f"{hf_row['tokens_per_s']:.1f} tok/s ({ours['speedup_vs_transformers']:.2f}x), "
          f"threads {torch.get_num_threads()}")
    return {"model": "SmolLM2-135M-Instruct", "results": [ours, hf_row]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--batch", type=int, nargs="*", default=[1])
    p.add_argument("--prefill", type=int, nargs="*", default=[],
                   help="prompt lengths whose time to first token is measured (GPU)")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--desc-act", action="store_true",
                   help="act-order weights (a random permuted g_idx per layer, as desc_act checkpoints have)")
    p.add_argument("--kv-gb", type=float, default=4.0)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the engine's max_model_len (default: just what the run needs); a server's is "
                        "the model's, e.g. 4096, which sizes the decode attention's partitions")
    p.add_argument("--kernel", default=None, help="force a kernel backend")
    p.add_argument("--no-fp16", action="store_true", help="skip the dense fp16 baseline")
    p.add_argument("--graph-max-batch", type=int, default=None,
                   help="largest batch replayed as a CUDA graph (default: the largest --batch); "
                        "larger batches run eagerly")
    p.add_argument("--cpu", action="store_true", help="the CPU benchmark on the default model")
    p.add_argument("--tag", default="", help="suffix for the result file name")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = cpu_main(args) if args.cpu or not torch.cuda.is_available() else gpu_main(args)
    kind = "decode-cpu" if args.cpu or not torch.cuda.is_available() else f"decode-{args.preset}"
    print("wrote", write_result(kind + (f"-{args.tag}" if args.tag else ""), payload))
    print("device:", device_name())


if __name__ == "__main__":
    main()
