"""Kernel benchmark: quantserve's CUDA int4 GEMV/GEMM vs cuBLAS fp16 (torch.matmul) vs torch's int4
tinygemm (torch._weight_int4pack_mm, bf16), in one run on one GPU.

Per Llama-2-7B shape (qkv 4096x12288, o 4096x4096, gate_up 4096x22016, down 11008x4096, lm_head
4096x32000) and for all linears of one decode step (32 layers x 4 + lm_head), at M = 1..256;
`--model llama-2-70b` times Llama-2-70B's shapes instead (qkv 8192x10240, o 8192x8192, gate_up
8192x57344, down 28672x8192, lm_head 8192x32000; the step then has --layers layers, not 80, and the
issue's targets, which are 7B figures, are not evaluated).
Timing: each sequence of calls is captured in a CUDA graph and replayed (median of event-timed
replays); every layer has its own weights (32 copies of each shape, 0.25-1.4 GB per shape), so
weights come from HBM, not L2. Random data. Writes bench/results/kernels-<gpu>.json and a PNG plot.

    PYTHONPATH=. python bench/kernels.py [--ms 1,4,16,32,64,128,256] [--layers 32] [--model llama-2-7b]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

from bench.common import RESULTS, slug
from bench.kernel_report import plot, targets
from quant.backends import cuda as cuda_backend
from quant.backends import cuda_dequant
from quant.backends.cuda_layout import CudaLayout

# (k, n) of each linear, per model; SHAPES is the one this run times (main() sets it from --model).
MODELS = {"llama-2-7b": {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096),
                         "lm_head": (4096, 32000)},
          "llama-2-70b": {"qkv": (8192, 10240), "o": (8192, 8192), "gate_up": (8192, 57344),
                          "down": (28672, 8192), "lm_head": (8192, 32000)}}
SHAPES = MODELS["llama-2-7b"]
GROUP = 128


def capture_graph(calls) -> torch.cuda.CUDAGraph:
    """A CUDA graph that runs `calls` in order (run once eagerly on a side stream first, so lazy
    set-up such as workspaces happens outside the capture), replayed three times to warm up."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    for _ in range(3):
        graph.replay()
    return graph


def time_graph(calls, reps: int) -> float:
    """Median ms of one replay of a graph that runs `calls` in order."""
    graph = capture_graph(calls)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def bandwidths() -> tuple[float, float]:
    """(copy TB/s counting read + write, read TB/s of a float32 sum) over 2 GiB buffers."""
    a = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.random_()
    copy_ms = time_graph([lambda: a.copy_(b)], 10)
    f = b.view(torch.float32)
    read_ms = time_graph([lambda: f.sum()], 10)
    del a, b
    return 2 * (1 << 31) / copy_ms / 1e9, (1 << 31) / read_ms / 1e9


# ---- backends: make(k, n) -> weight object; call(x, w) -> y; bytes(k, n) -> weight bytes read
def ours_make(k, n):
    ns, ks = -(-n // 64), -(-k // 16)
    # as QuantLinear's prepare does: split-K accumulators and scratch sized for this layer (70B's
    # gate_up is wider than the default accumulators; without it the call would not take the
    # GEMV or the wgmma GEMM)
    cuda_backend.workspace(torch.device("cuda"), n, cuda_dequant.scratch_bytes(ns, ks))
    qweight = torch.randint(-2**31, 2**31 - 1, (ns, ks, 32, 4), dtype=torch.int32, device="cuda")
    scales = (torch.rand(k // GROUP, ns, 8, 8, device="cuda") * 0.01 + 0.001).half()
    return CudaLayout(qweight=qweight, bits=4, n=n, k=k, groups=k // GROUP, group_shift=3, zero_point=8,
                      perm=None, constants={torch.float16: (scales, None, None)})


def ours_asym_make(k, n):
    """As ours_make, with a zero per group and column (GPTQ sym=False): codes 0-15, zeros 0-15."""
    w = ours_make(k, n)
    scales = w.constants[torch.float16][0]
    zeros = torch.randint(0, 16, scales.shape, device="cuda").half()
    return dataclasses.replace(w, zero_point=0, constants={torch.float16: (scales, zeros, None)})


def ours_call(op=None):
    return lambda x, w: cuda_backend.matmul(w, x, op=op)


def fp16_make(k, n):
    return torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02


def fp16_call(x, w):
    return torch.nn.functional.linear(x, w)


def tiny_make(k, n):
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    w = torch._convert_weight_to_int4pack(packed, 8)
    sz = (torch.rand(k // GROUP, n, 2, device="cuda") * 0.01).to(torch.bfloat16)
    return w, sz


def tiny_call(x, w):
    return torch._weight_int4pack_mm(x, w[0], GROUP, w[1])


BACKENDS = {
    "ours": (ours_make, ours_call(), torch.float16, lambda k, n: k * n // 2 + k // GROUP * n * 2),
    "ours_asym": (ours_asym_make, ours_call(), torch.float16, lambda k, n: k * n // 2 + k // GROUP * n * 4),
    "cublas_fp16": (fp16_make, fp16_call, torch.float16, lambda k, n: k * n * 2),
    "torch_int4": (tiny_make, tiny_call, torch.bfloat16, lambda k, n: k * n // 2 + k // GROUP * n * 4),
}


def step_order(layers: int) -> list[str]:
    return [name for _ in range(layers) for name in ("qkv", "o", "gate_up", "down")] + ["lm_head"]


def bench_backend(name, ms, layers, rows, steps, extra_ops, sweep=False):
    make, call, dtype, nbytes = BACKENDS[name]
    try:
        weights = {s: [make(*SHAPES[s]) for _ in range(layers if s != "lm_head" else 4)] for s in SHAPES}
    except Exception as exc:  # noqa: BLE001 - recorded, the other backends still run
        print(f"{name}: cannot build weights: {exc}", file=sys.stderr)
        return
    for m in ms:
        xs = {k: torch.randn(m, k, device="cuda", dtype=dtype) for k in {k for k, _ in SHAPES.values()}}
        try:
            for s, (k, n) in SHAPES.items():
                ws = weights[s]
                ms_graph = time_graph([(lambda w=w: call(xs[k], w)) for w in ws], 20)
                us = ms_graph * 1000 / len(ws)
                rows.append({"layer": s, "k": k, "n": n, "m": m, "backend": name, "us": round(us, 2),
                             "tbs": round(nbytes(k, n) / us / 1e6, 3)})
            order = step_order(layers)
            step_ms = time_graph(step_calls(order, weights, xs, call), 10)
            steps.append({"m": m, "backend": name, "ms": round(step_ms, 4)})
            print(f"{name:12s} m={m:4d} step {step_ms:8.3f} ms", flush=True)
            if name == "ours" and sums_step(m, order, weights, xs, steps):
                print(f"{'ours_sums':12s} m={m:4d} step {steps[-1]['ms']:8.3f} ms", flush=True)
            if name == "ours" and m <= cuda_backend.CudaBackend.gemv_max_m:
                gemv_variants(m, order, weights, xs, steps)
                interleaved_step(m, order, weights, xs, call, name, steps)
            elif name == "cublas_fp16" and m == 1:
                interleaved_step(m, order, weights, xs, call, name, steps)
            if name == "ours" and sweep and m in DEQUANT_SWEEP_MS:
                dequant_variants(m, order, weights, xs, steps)
            for label, (op, sub_ms, wgmma, pdl) in extra_ops.items():
                if name == "ours" and m in sub_ms:
                    with cuda_backend.gemm_launch_options(wgmma, pdl):
                        calls2 = step_calls(order, weights, xs, ours_call(op))
                        steps.append({"m": m, "backend": label, "ms": round(time_graph(calls2, 10), 4)})
                    print(f"  {label}: m={m} step {steps[-1]['ms']:.3f} ms", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"{name} m={m}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
    if name == "ours":
        act_order_cost(weights, rows)
    del weights
    torch.cuda.empty_cache()


GEMV_VARIANTS = ((False, 1), (False, 2), (True, 1), (True, 2))  # (pdl, wave_div)
# With --dequant-sweep: token counts at which the dequantise + cuBLAS path is timed over scratch
# chunk sizes (MB; 0: the whole layer in one chunk), next to the dequantisation alone.
DEQUANT_SWEEP_MS = {128, 256, 512, 1024, 2048}
DEQUANT_CHUNKS_MB = (8, 16, 32, 64, 128, 0)


def step_calls(order, weights, xs, call):
    seen: dict[str, int] = {}
    calls = []
    for s in order:
        i = seen.get(s, 0)
        seen[s] = i + 1
        calls.append(lambda w=weights[s][i % len(weights[s])], k=SHAPES[s][0]: call(xs[k], w))
    return calls


def sums_step(m, order, weights, xs, steps) -> bool:
    """The decode step as the engine runs it where its kernels leave fp32 sums (quant/sums.py): every
    linear but lm_head adds into an fp32 [M, N] buffer instead of writing y (no split-K fix-up); the
    conversion that the next kernel (RMSNorm, SwiGLU, the q/k/v rotary) does is not in this time.
    The buffer is never zeroed here: the values are meaningless, the memory traffic is the engine's.
    False where no call of m tokens leaves sums (cuda_backend.sums_op: more tokens than the GEMV and
    the Hopper wgmma GEMM leave sums for, or QUANTSERVE_GEMV_SUMS=0 / QUANTSERVE_GEMM_SUMS=0)."""
    # as the engine asks: q/k/v and gate/up for readers of the GEMM's [column][slot] layout
    ops = {SHAPES[s]: cuda_backend.sums_op(m, weights[s][0], torch.device("cuda"), s in ("qkv", "gate_up"))
           for s in SHAPES if s != "lm_head"}
    if any(op is None for op in ops.values()):
        return False
    slots = cuda_backend.extension().gemm_sums_tokens(m) if "gemm" in ops.values() else m
    buf = torch.zeros(slots * max(n for _, n in SHAPES.values()), device="cuda")

    def call(x, w):
        op = ops.get((w.k, w.n))  # None for lm_head: it writes y, as in the engine
        return cuda_backend.matmul(w, x, op=op, sums=buf) if op else cuda_backend.matmul(w, x)

    steps.append({"m": m, "backend": "ours_sums", "ms": round(time_graph(step_calls(order, weights, xs, call), 10), 4)})
    return True


def gemv_variants(m, order, weights, xs, steps):
    """The decode step under each GEMV launch option (programmatic dependent launch, grid size)."""
    for pdl, div in GEMV_VARIANTS:
        with cuda_backend.gemv_launch_options(pdl, div):
            ms_ = time_graph(step_calls(order, weights, xs, ours_call("gemv")), 10)
        steps.append({"m": m, "backend": f"ours_gemv_pdl{int(pdl)}_div{div}", "ms": round(ms_, 4)})
        print(f"  gemv pdl={int(pdl)} wave_div={div}: m={m} step {ms_:.3f} ms", flush=True)


def dequant_variants(m, order, weights, xs, steps):
    """The step through dequant_matmul at each scratch chunk size, and the dequantisation alone (the
    same chunks, no GEMM), in this process."""
    biggest = max(64 * (-(-n // 64)) * 16 * (-(-k // 16)) * 2 for k, n in SHAPES.values())
    cuda_backend.workspace(torch.device("cuda"), scratch=biggest)
    ext = cuda_backend.extension()

    def widen_only(chunk_bytes):
        def call(x, w):
            scales, zeros, _ = w.constants[x.dtype]
            scratch = cuda_backend.workspace(x.device).scratch
            for s0, buf, _, _ in cuda_dequant.dequant_chunks(w, x.dtype, scratch, chunk_bytes):
                ext.dequant(w.qweight, scales, zeros, buf, s0, w.bits, w.group_shift, w.zero_point)
        return call

    for mb in DEQUANT_CHUNKS_MB:
        cb = biggest if mb == 0 else mb << 20
        tag = "whole" if mb == 0 else f"{mb}mb"
        calls = step_calls(order, weights, xs, lambda x, w, cb=cb: cuda_backend.dequant_matmul(w, x, chunk_bytes=cb))
        steps.append({"m": m, "backend": f"ours_dequant_cublas_{tag}", "ms": round(time_graph(calls, 10), 4)})
        alone = time_graph(step_calls(order, weights, xs, widen_only(cb)), 10)
        steps.append({"m": m, "backend": f"ours_dequant_only_{tag}", "ms": round(alone, 4)})
        print(f"  dequant+cuBLAS chunk {tag}: m={m} step {steps[-2]['ms']:.3f} ms (dequant alone {alone:.3f})",
              flush=True)


def interleaved_step(m, order, weights, xs, call, name, steps):
    """The step with a small elementwise kernel writing the activations before every linear, as in
    a model (norms, rope, residuals sit between the matmuls); its own time is measured and removed."""
    def bump(k):
        xs[k].mul_(1.0)

    def with_bumps():
        calls = []
        for s, c in zip(order, step_calls(order, weights, xs, call)):
            calls.append(lambda k=SHAPES[s][0]: bump(k))
            calls.append(c)
        return calls

    total = time_graph(with_bumps(), 10)
    bumps = time_graph([(lambda k=SHAPES[s][0]: bump(k)) for s in order], 10)
    steps.append({"m": m, "backend": f"{name}_interleaved", "ms": round(total, 4),
                  "elementwise_alone_ms": round(bumps, 4)})
    print(f"  {name} interleaved with elementwise kernels: m={m} {total:.3f} ms "
          f"(elementwise alone {bumps:.3f})", flush=True)


def act_order_cost(weights, rows):
    """Extra time of act-order layers: every call runs our gather kernel before the plain kernel."""
    for s in ("o", "down"):
        k, n = SHAPES[s]
        for m in (1, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            perm = torch.randperm(k, device="cuda")
            base = weights[s]
            permuted = [dataclasses.replace(w, perm=perm) for w in base]
            t0 = time_graph([(lambda w=w: cuda_backend.matmul(w, x)) for w in base], 20) / len(base)
            t1 = time_graph([(lambda w=w: cuda_backend.matmul(w, x)) for w in permuted], 20) / len(base)
            rows.append({"layer": s, "k": k, "n": n, "m": m, "backend": "ours_act_order",
                         "us": round(t1 * 1000, 2), "gather_us": round((t1 - t0) * 1000, 2)})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,4,16,32,64,128,256,512,1024")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--model", choices=sorted(MODELS), default="llama-2-7b",
                   help="whose layer shapes to time (targets are evaluated for llama-2-7b only)")
    p.add_argument("--backends", default="ours,cublas_fp16,torch_int4")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--no-extras", action="store_true",
                   help="time only the default path of each backend (no forced-op comparisons)")
    p.add_argument("--extras", default="",
                   help="comma-separated names of the extra variants to time (default: all of them)")
    p.add_argument("--dequant-sweep", action="store_true",
                   help="also time the dequantise + cuBLAS path over scratch chunk sizes")
    args = p.parse_args()
    global SHAPES
    SHAPES = MODELS[args.model]
    ms = [int(v) for v in args.ms.split(",")]
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:  # before any GPU work (ours_sums etc. are rows of "ours", not backends)
        sys.exit(f"bench/kernels.py: unknown --backends {','.join(unknown)} (known: {','.join(BACKENDS)})")
    # (op, batch sizes, wgmma allowed, PDL for the wgmma kernel): the GEMM where the GEMV is the
    # default, the wgmma kernel without PDL, the mma.sync GEMM (the previous kernel) where the
    # Hopper wgmma kernel is the default, and the dequantise + cuBLAS path and the fused GEMM kernels
    # on both sides of DEQUANT_MIN_M, timed in the same process.
    extra = {"ours_gemm_forced": ("gemm", {4, 8, 9, 10, 11, 12, 16, 32}, True, True),
             "ours_wgmma_no_pdl": ("gemm", {32, 64, 128}, True, False),
             "ours_gemm_mma_sync": ("gemm", {16, 32, 64, 128, 256, 512}, False, True),
             "ours_dequant_cublas": ("dequant", {128, 192, 256, 320, 384, 448}, True, True),
             "ours_fused_gemm": ("gemm", {320, 384, 448, 512, 1024, 2048}, True, True)}
    if args.no_extras:
        extra = {}
    elif args.extras:
        wanted = set(args.extras.split(","))
        if wanted - set(extra):
            sys.exit(f"bench/kernels.py: unknown --extras {','.join(sorted(wanted - set(extra)))} "
                     f"(known: {','.join(extra)})")
        extra = {k: v for k, v in extra.items() if k in wanted}
    gpu = torch.cuda.get_device_name()
    copy_bw, read_bw = bandwidths()
    print(f"{gpu}: copy {copy_bw:.3f} TB/s (read+write), read {read_bw:.3f} TB/s; "
          f"wgmma GEMM: {cuda_backend.wgmma_available()}", flush=True)
    rows, steps = [], []
    for name in backends:
        bench_backend(name, ms, args.layers, rows, steps, extra, args.dequant_sweep)
    result = {"gpu": gpu, "torch": torch.__version__, "wgmma": cuda_backend.wgmma_available(), "cuda": torch.version.cuda, "group_size": GROUP,
              "model": args.model, "layers": args.layers, "copy_bw_tbs": round(copy_bw, 3),
              "read_bw_tbs": round(read_bw, 3), "per_shape": rows, "decode_step": steps,
              "targets": targets(steps, rows, copy_bw) if args.model == "llama-2-7b" else []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-{slug(gpu)}" + ("" if args.model == "llama-2-7b" else f"-{args.model}")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    int4_bytes = sum(BACKENDS["ours"][3](*SHAPES[s]) for s in step_order(args.layers))
    plotted = plot(steps, copy_bw, out / f"{stem}.png", gpu, int4_bytes)
    print(f"\nwrote {out / stem}.json{' and .png' if plotted else ''}")
    print("\nper-shape us (M=1 / 16 / 64):")
    for s in SHAPES:
        line = f"  {s:8s}"
        for b in BACKENDS:
            vals = [next((r['us'] for r in rows if r['layer'] == s and r['m'] == m and r['backend'] == b), None)
                    for m in (1, 16, 64)]
            line += f" {b}: " + "/".join("-" if v is None else f"{v:.1f}" for v in vals)
        print(line)
    print("\ndecode step ms:")
    for m in ms:
        cells = [f"{b}={next((s['ms'] for s in steps if s['backend'] == b and s['m'] == m), float('nan')):.3f}"
                 for b in list(BACKENDS) + list(extra)]
        print(f"  M={m:4d} " + " ".join(cells))
    print("\ntargets:")
    for t in result["targets"]:
        print(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: {t['measured']}")


if __name__ == "__main__":
    main()
