"""Per-warp timeline of the pipelined GEMV over one Llama-2-7B decode step's linears, back to back.

Diagnosis, not a benchmark: the kernels are built with QS_GEMV_TRACE (QUANTSERVE_CUDA_TRACE=1, which
this script sets; csrc/qs_trace.cuh), so every warp of the fp16 pipelined GEMV records when it
entered, when it got past the programmatic-dependent-launch wait (the call before it had finished)
and when it left, on the GPU's nanosecond timer. The step is the one bench/kernels.py times (the
same random 4-bit g128 layers, own weights per layer, a CUDA graph of the 129 calls), at M tokens
(1-8: the calls the pipelined kernel takes). It answers where a call's time goes beyond its bytes:

    ramp   first warp past its wait -> last warp past it (how long the grid takes to get going)
    body   first warp past its wait -> the 90th-percentile warp's exit
    tail   90th-percentile exit -> last exit (the slowest warps: split strips' fix-up, imbalance)
    units  each warp's exit split by how many units the stream-K split gave it (median / last)
    gap    the previous call's last exit -> this call's first warp past its wait
    early  first entry -> first warp past its wait (how long warps sat in the PDL wait)
    first  median over warps of their own wait -> their first unit computed (the first load's
           latency under the call's own burst, plus one unit's compute)
    data   median over warps of their own wait -> every operand of their first unit in registers
           (the load part of `first`; first - data is that unit's compute)

--raw FILE also writes every record (int64 [n, 6]: tag, entry, wait, exit, first unit done, first
unit's operands in, ns) and the layer of each call's key as a safetensors file, for analysis the
table does not do (per SM, per block).

    QUANTSERVE_CUDA_TRACE=1 is set here; PYTHONPATH=. python bench/gemv_timeline.py [--m 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

MASK64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class CallTiming:
    """One launch's warps, times in microseconds from the first warp entry of the step."""

    key: int
    warps: int
    sms: int
    entry_first: float
    wait_first: float
    wait_last: float
    exit_p90: float
    exit_last: float
    # (units, warps, median exit, last exit) per count of units a warp ran, exits in microseconds
    # after the first warp got past its wait; empty when the call's unit total is not known.
    exits_by_units: tuple[tuple[int, int, float, float], ...] = ()
    # Median over the warps with units of (first unit computed - own wait), microseconds; nan where
    # the records have no first-unit time (older 4-column records) or no warp had a unit.
    first: float = float("nan")
    # The same for the first unit's operands arriving (6-column records), microseconds.
    data: float = float("nan")


def _median_us(ns: list[int]) -> float:
    """Median of nanosecond spans in microseconds; nan for none."""
    return statistics.median(ns) / 1e3 if ns else float("nan")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def warp_units(total: int, warps: int, w: int) -> int:
    """Units warp w of `warps` runs when the GEMV splits `total` (strip, chunk) units: the
    contiguous range [total*w/warps, total*(w+1)/warps) (csrc/qs_streamk.cuh)."""
    return total * (w + 1) // warps - total * w // warps


def summarize(rows: list[tuple[int, ...]], totals: dict[int, int] | None = None) -> list[CallTiming]:
    """rows: (tag, entry ns, wait ns, exit ns[, first unit ns[, its operands ns]]) per warp, tag =
    key << 32 | smid << 16 | warp; first unit 0: the warp had no unit. Returns
    one CallTiming per key (a launch: every layer has its own weights), in the order the calls got
    past their waits. totals: the unit count of each key's layer, to split exits by units a warp ran
    (every warp of the grid records, so the grid's warp count is the highest warp index + 1)."""
    by_key: dict[int, list[tuple[int, int, int, int, int, int]]] = {}
    for r in rows:
        tag = r[0] & MASK64
        by_key.setdefault(tag >> 32, []).append((tag, r[1], r[2], r[3], r[4] if len(r) > 4 else 0,
                                                 r[5] if len(r) > 5 else 0))
    if not by_key:
        return []
    origin = min(r[1] for rs in by_key.values() for r in rs)
    calls = []
    for key, rs in by_key.items():
        exits = sorted(r[3] for r in rs)
        wait_first = min(r[2] for r in rs)
        by_units: list[tuple[int, int, float, float]] = []
        if totals and key in totals:
            grid = max(r[0] & 0xFFFF for r in rs) + 1
            split: dict[int, list[int]] = {}
            for r in rs:
                split.setdefault(warp_units(totals[key], grid, r[0] & 0xFFFF), []).append(r[3] - wait_first)
            by_units = [(u, len(v), statistics.median(v) / 1e3, max(v) / 1e3) for u, v in sorted(split.items())]
        firsts = [r[4] - r[2] for r in rs if r[4]]
        datas = [r[5] - r[2] for r in rs if r[4] and r[5]]
        calls.append(CallTiming(key=key, warps=len(rs), sms=len({(r[0] >> 16) & 0xFFFF for r in rs}),
                                entry_first=(min(r[1] for r in rs) - origin) / 1e3,
                                wait_first=(wait_first - origin) / 1e3,
                                wait_last=(max(r[2] for r in rs) - origin) / 1e3,
                                exit_p90=(exits[min(len(exits) - 1, (len(exits) * 9) // 10)] - origin) / 1e3,
                                exit_last=(exits[-1] - origin) / 1e3, exits_by_units=tuple(by_units),
                                first=_median_us(firsts), data=_median_us(datas)))
    return sorted(calls, key=lambda c: c.wait_first)


def phases(calls: list[CallTiming]) -> list[dict]:
    """Per call: ramp, body, tail, gap and early (module docstring), microseconds."""
    out = []
    for i, c in enumerate(calls):
        out.append({"key": c.key, "warps": c.warps, "sms": c.sms,
                    "ramp": c.wait_last - c.wait_first, "body": c.exit_p90 - c.wait_first,
                    "tail": c.exit_last - c.exit_p90,
                    "gap": c.wait_first - calls[i - 1].exit_last if i else 0.0,
                    "exits_by_units": [list(e) for e in c.exits_by_units],
                    "early": c.wait_first - c.entry_first, "first": c.first, "data": c.data})
    return out


def table(per_call: list[dict], names: list[str]) -> list[dict]:
    """Median phases per layer name (names[i] is call i's layer) and the step totals."""
    rows = []
    for name in dict.fromkeys(names):
        sel = [p for p, n in zip(per_call, names) if n == name]
        units: dict[int, list[tuple[float, float]]] = {}
        for p in sel:
            for u, _, med, last in p.get("exits_by_units", []):
                units.setdefault(u, []).append((med, last))
        rows.append({"layer": name, "calls": len(sel),
                     **{f: round(statistics.median(p[f] for p in sel), 2)
                        for f in ("ramp", "body", "tail", "gap", "early", "first", "data")},
                     "exit_by_units": {u: (round(statistics.median(m for m, _ in v), 2),
                                           round(statistics.median(x for _, x in v), 2))
                                       for u, v in sorted(units.items())}})
    rows.append({"layer": "step (sums)", "calls": len(per_call),
                 **{f: round(sum(p[f] for p in per_call), 1) for f in ("ramp", "body", "tail", "gap", "early")}})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, default=1, help="tokens (1-8: the pipelined GEMV's calls)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the per-call phases and the table here")
    p.add_argument("--wave-div", type=int, default=None,
                   help="GEMV launch option wave_div (2: half the resident grid), to see how the phases "
                        "follow the warps a SM")
    p.add_argument("--raw", default=None, help="also write every record and the layer of each key here "
                   "(safetensors)")
    args = p.parse_args()
    import torch

    from bench.kernels import SHAPES, step_order
    from bench.trace_step import replay_traced, step_graph, step_weights, trace_extension, weight_keys
    from quant.backends import cuda as cuda_backend

    ext = trace_extension()
    weights = step_weights(args.layers)
    order = step_order(args.layers)
    key_name = weight_keys(weights)
    chunk_steps = 8  # a 4-bit GEMV unit: 8 k16 steps of one 64-column strip (csrc/gemv.cuh gemv_steps)
    totals = {key: _cdiv(SHAPES[s][1], 64) * _cdiv(_cdiv(SHAPES[s][0], 16), chunk_steps) for key, s in key_name.items()}
    with cuda_backend.gemv_launch_options(wave_div=args.wave_div):
        graph, _inputs = step_graph(args.m, args.layers, weights)
    records, replay_ms = replay_traced(graph, ext.gemv_trace_take)
    rows = [tuple(int(v) for v in r) for r in records.tolist()]
    timings = summarize(rows, totals)
    names = [key_name.get(c.key, "?") for c in timings]
    if len(timings) != len(order):
        print(f"warning: {len(timings)} traced launches for {len(order)} calls (only the fp16 pipelined GEMV "
              f"records; M={args.m})", file=sys.stderr)
    per_call = phases(timings)
    rows_t = table(per_call, names)
    step_us = timings[-1].exit_last - timings[0].entry_first if timings else 0.0
    print(f"{torch.cuda.get_device_name()}: M={args.m}, {len(timings)} launches, replay {replay_ms:.3f} ms "
          f"(event), first entry -> last exit {step_us / 1e3:.3f} ms; microseconds, medians per layer:")
    print(f"  {'layer':12s} {'calls':>5s} {'ramp':>7s} {'body':>7s} {'tail':>7s} {'gap':>7s} {'early':>7s} "
          f"{'first':>7s} {'data':>7s}  exit after the wait by units a warp ran: median / last")
    for r in rows_t:
        by_units = ", ".join(f"{u}: {m:.2f} / {x:.2f}" for u, (m, x) in r.get("exit_by_units", {}).items())
        print(f"  {r['layer']:12s} {r['calls']:5d} {r['ramp']:7.2f} {r['body']:7.2f} {r['tail']:7.2f} "
              f"{r['gap']:7.2f} {r['early']:7.2f} {r.get('first', float('nan')):7.2f} "
              f"{r.get('data', float('nan')):7.2f}  {by_units}")
    if args.raw:
        from safetensors.torch import save_file

        save_file({"records": records.contiguous()}, args.raw,
                  metadata={"gpu": torch.cuda.get_device_name(), "m": str(args.m),
                            "layers": json.dumps({str(k): v for k, v in key_name.items()})})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "m": args.m, "replay_ms": replay_ms,
                       "table": rows_t, "calls": [dict(p, layer=n) for p, n in zip(per_call, names)]}, f, indent=1)


if __name__ == "__main__":
    main()
