"""Where one decode step's time goes: torch.profiler over engine steps of a dummy model.

    python -m bench.profile_step --preset llama-2-7b --batch 1 [--kernel NAME] [--eager]
    python -m bench.profile_step --prefill 1024     # one prompt's prefill instead of decode steps
Prints the wall time per step, the GPU time per step, where the host's share of the step goes
(schedule, the runner's input preparation and launch, the sampler, which waits for the GPU, and the
scheduler's update), the top kernels by GPU time, and what each kernel adds to the GPU's critical
path (frontier_costs: under programmatic dependent launch kernels start early and wait, so their
durations overlap and do not add up to the step).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench.decode import kv_bytes_per_token
from quant.format import QuantConfig
from server.config import EngineConfig
from server.dummy import build_dummy_model, dummy_config
from server.engine.engine import LLMEngine
from server.engine.sequence import SamplingParams
from server.loader import finalize


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kernel", default=None)
    p.add_argument("--fp16", action="store_true", help="dense fp16 model instead of int4")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prefill", type=int, default=0, help="profile the prefill of one prompt of this many tokens")
    p.add_argument("--desc-act", action="store_true", help="a random act-order g_idx per layer")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="the scheduler's running-sequence cap (default: max(128, --batch))")
    args = p.parse_args()
    if args.prefill:
        args.steps = 1
    quant = None if args.fp16 else QuantConfig(bits=4, group_size=128, desc_act=args.desc_act)
    model = build_dummy_model(dummy_config(args.preset), quant, torch.device("cuda"), torch.float16)
    print("backends", finalize(model, args.kernel) if quant is not None else model.fuse_projections())
    seqs = args.max_num_seqs or max(128, args.batch)
    # KV for every sequence's prompt and all the steps run here (warm-up, timing, phases, profile)
    tokens = args.batch * (32 + 12 + 3 * args.steps + 8) + args.prefill
    kv_gb = max(2.0, 1.25 * tokens * kv_bytes_per_token(model) / 2**30)
    eng = LLMEngine(model, EngineConfig(max_model_len=max(512, args.prefill + 8), kv_cache_gb=kv_gb,
                                        max_num_seqs=seqs, max_num_batched_tokens=max(1024, 32 * seqs),
                                        enforce_eager=args.eager,
                                        cuda_graph_max_batch=max(1, args.batch)), [])
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    if args.prefill:
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

        def run() -> None:  # one whole prompt, chunked by the scheduler's token budget
            eng.add_request(f"p{time.perf_counter()}", list(range(1, args.prefill + 1)), params)
            while eng.requests:
                eng.step()
    else:
        for i in range(args.batch):
            eng.add_request(str(i), list(range(1, 33)), params)
        for _ in range(10):
            eng.step()

        def run() -> None:
            eng.step()
    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        run()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    phases = timed_phases(eng, run, args.steps)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            run()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events if e.self_device_time_total > 0)
    print(f"wall {wall * 1e3:.3f} ms/step, GPU busy {gpu_total / args.steps / 1e3:.3f} ms/step, "
          f"{len(eng.scheduler.running)} running")
    print("host phases, ms/step: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in phases.items()))
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    costs, idle = frontier_costs(kernels)
    span = sum(c[1] for c in costs.values()) + idle
    print(f"critical path: {span / args.steps / 1e3:.3f} ms/step of GPU time span, idle "
          f"{idle / args.steps / 1e3:.3f}; what each kernel adds to it (its end past the latest earlier end):")
    print(f"  {'kernel':58s} {'calls':>6s} {'adds ms':>8s} {'share':>6s} {'runs ms':>8s}")
    for name, (calls, added, busy) in sorted(costs.items(), key=lambda kv: -kv[1][1])[:16]:
        print(f"  {name[:58]:58s} {calls / args.steps:6.1f} {added / args.steps / 1e3:8.3f} "
              f"{100 * added / span:5.1f}% {busy / args.steps / 1e3:8.3f}")


def frontier_costs(kernels: list[tuple[str, float, float]]) -> tuple[dict[str, list[float]], float]:
    """kernels: (name, start, end) of the GPU work of a run, any order, one stream's worth (times in
    any one unit). Sorted by start, each kernel moves the end of the GPU's work (the frontier) from
    the latest end before it to its own end, or not at all if it ends inside earlier work; a start
    past the frontier is idle time. Returns ({name: [calls, added, ran]}, idle): the added times and
    the idle time sum to the run's span, ran is the kernels' own summed durations."""
    costs: dict[str, list[float]] = {}
    idle = 0.0
    frontier = None
    for name, start, end in sorted(kernels, key=lambda k: (k[1], k[2])):
        if frontier is None:
            frontier = start
        if start > frontier:
            idle += start - frontier
            frontier = start
        added = max(0.0, end - frontier)
        frontier = max(frontier, end)
        entry = costs.setdefault(name, [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += added
        entry[2] += end - start
    return costs, idle


def timed_phases(eng: LLMEngine, run, steps: int) -> dict[str, float]:
    """Seconds per step in each engine phase (no added synchronisation: the sampler's phase holds
    the wait for the GPU, because its token list is the step's first device-to-host read)."""
    spent: dict[str, float] = defaultdict(float)
    targets = {"schedule": (eng.scheduler, "schedule"), "execute": (eng.runner, "execute"),
               "sample": (eng.sampler, "sample"), "update": (eng.scheduler, "update")}
    for name, (obj, attr) in targets.items():
        fn = getattr(obj, attr)

        def timed(*a, _fn=fn, _name=name, **kw):
            t = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                spent[_name] += time.perf_counter() - t
        setattr(obj, attr, timed)
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    finally:
        for name, (obj, attr) in targets.items():
            delattr(obj, attr)  # the instance attribute set above; the class's method shows again
    total = time.perf_counter() - t0
    out = {k: spent[k] / steps for k in targets}
    out["other"] = total / steps - sum(out.values())
    return out


if __name__ == "__main__":
    main()
