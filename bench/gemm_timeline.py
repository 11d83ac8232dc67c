"""Per-block timeline of the wgmma GEMM over one Llama-2-7B decode step's linears, back to back.

Diagnosis, not a benchmark: the kernels are built with the trace (QUANTSERVE_CUDA_TRACE=1, which this
script sets; csrc/qs_gemm_trace.cuh), so thread 0 of every block of the fp16 wgmma GEMM, and of the
sums_to_y kernel after the calls that take it, records on the GPU's nanosecond timer when the block
entered, got past its programmatic-dependent-launch wait, finished its last tile segment's main
loop, had that segment's sums out (stores, or reds + fence + barrier), began draining a completed
tile, and left. The step is the one bench/kernels.py times (the same random 4-bit g128 layers, own
weights per layer, a CUDA graph of the 129 calls), at M tokens (9-256: the calls the GEMM takes).
It answers where a call's time goes beyond its bytes and FLOPs, per layer (medians over its calls,
microseconds):

    early  first block entry -> first block past its wait (how long blocks sat in the PDL wait)
    ramp   first block past its wait -> last one past it (how late the grid's last blocks start)
    loop   per block: own wait -> its last segment's main loop done (median, and the slowest block)
    out    per block: that loop done -> its sums out (median)
    drain  per draining block: drain begun -> exit (median; the split-K fix-up's read-back and y)
    tail   90th-percentile block exit -> last exit
    s2y    the call's last GEMM block exit -> the last exit of its sums_to_y blocks (0: none ran)
    gap    the previous call's end (its last exit, sums_to_y's included) -> this call's first wait
    share  the previous call's end -> this call's end (the call's part of the step)

--raw FILE also writes every record (int64 [n, 8], csrc/qs_gemm_trace.cuh) and the layer of each
call's key as a safetensors file.

    PYTHONPATH=. python bench/gemm_timeline.py [--m 16 64 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import statistics
import sys

MASK64 = (1 << 64) - 1
KIND_GEMM, KIND_SUMS_TO_Y = 0, 1


@dataclasses.dataclass(frozen=True)
class Block:
    """One block's record, times in ns (0: not reached)."""

    key: int
    sm: int
    block: int
    entry: int
    wait: int
    loop: int
    out: int
    drain: int
    exit: int
    flushes: int
    drains: int
    tokens: int
    kind: int


def parse(row: tuple[int, ...]) -> Block:
    """One int64 record [tag, entry, wait, loop, out, drain, exit, info] (csrc/qs_gemm_trace.cuh)."""
    tag, info = row[0] & MASK64, row[7] & MASK64
    return Block(key=tag >> 32, sm=(tag >> 16) & 0xFFFF, block=tag & 0xFFFF, entry=row[1], wait=row[2],
                 loop=row[3], out=row[4], drain=row[5], exit=row[6], flushes=info & 0xFFFF,
                 drains=(info >> 16) & 0xFFFF, tokens=(info >> 32) & 0xFFFF, kind=(info >> 48) & 0xFFFF)


def _med(v: list[float]) -> float:
    return statistics.median(v) if v else float("nan")


def calls_of(blocks: list[Block]) -> list[dict]:
    """The GEMM launches (one per key: every layer has its own weights) in the order they got past
    their waits, each with the sums_to_y blocks that ran after it, and their phases in microseconds
    (module docstring)."""
    gemm: dict[int, list[Block]] = {}
    s2y = sorted((b for b in blocks if b.kind == KIND_SUMS_TO_Y), key=lambda b: b.wait)
    for b in blocks:
        if b.kind == KIND_GEMM:
            gemm.setdefault(b.key, []).append(b)
    launches = sorted(((min(b.wait for b in bs), key, bs) for key, bs in gemm.items()), key=lambda l: l[0])
    firsts = [w for w, _, _ in launches]
    # a sums_to_y block belongs to the last GEMM launch past its wait before it
    after: list[list[Block]] = [[] for _ in launches]
    for b in s2y:
        i = bisect.bisect_right(firsts, b.wait) - 1
        if i >= 0:
            after[i].append(b)
    out, prev_end = [], None
    for (wait_first, key, bs), extra in zip(launches, after):
        exits = sorted(b.exit for b in bs)
        gemm_end = exits[-1]
        end = max([gemm_end] + [b.exit for b in extra])
        p90 = exits[min(len(exits) - 1, (len(exits) * 9) // 10)]
        loops = [(b.loop - b.wait) / 1e3 for b in bs if b.loop]
        outs = [(b.out - b.loop) / 1e3 for b in bs if b.loop and b.out]
        drains = [(b.exit - b.drain) / 1e3 for b in bs if b.drain]
        out.append({
            "key": key, "blocks": len(bs), "sms": len({b.sm for b in bs}), "tokens": bs[0].tokens,
            "drainers": len(drains), "s2y_blocks": len(extra),
            "early": (wait_first - min(b.entry for b in bs)) / 1e3,
            "ramp": (max(b.wait for b in bs) - wait_first) / 1e3,
            "loop": _med(loops), "loop_max": max(loops) if loops else float("nan"),
            "out": _med(outs), "drain": _med(drains),
            "tail": (gemm_end - p90) / 1e3,
            "s2y": (end - gemm_end) / 1e3,
            "gap": (wait_first - prev_end) / 1e3 if prev_end is not None else 0.0,
            "share": (end - prev_end) / 1e3 if prev_end is not None else (end - wait_first) / 1e3,
        })
        prev_end = end
    return out


FIELDS = ("early", "ramp", "loop", "loop_max", "out", "drain", "tail", "s2y", "gap", "share")


def table(calls: list[dict], names: list[str]) -> list[dict]:
    """Medians of each field per layer name (names[i]: call i's layer), and the step's sum of shares."""
    rows = []
    for name in dict.fromkeys(names):
        sel = [c for c, n in zip(calls, names) if n == name]
        row = {"layer": name, "calls": len(sel), "blocks": sel[0]["blocks"], "tokens": sel[0]["tokens"],
               "drainers": sel[0]["drainers"], "s2y_blocks": sel[0]["s2y_blocks"]}
        for f in FIELDS:
            vals = [c[f] for c in sel if c[f] == c[f]]
            row[f] = round(statistics.median(vals), 2) if vals else float("nan")
        rows.append(row)
    rows.append({"layer": "step", "calls": len(calls), "share": round(sum(c["share"] for c in calls), 1),
                 "gap": round(sum(c["gap"] for c in calls), 1)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[16, 64, 128], help="tokens (9-256: the GEMM's calls)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the per-call phases and the tables here")
    p.add_argument("--gemm-pdl", type=int, choices=(0, 1), default=None,
                   help="the GEMM's launch option pdl (0: no programmatic dependent launch: each call's blocks "
                        "start after the call before it ended)")
    p.add_argument("--raw", default=None, help="also write every record and the layer of each key here "
                   "(safetensors; the last --m only)")
    args = p.parse_args()
    import torch

    from bench.kernels import step_order
    from bench.trace_step import replay_traced, step_graph, step_weights, trace_extension, weight_keys

    ext = trace_extension()
    if args.gemm_pdl is not None:
        wgmma, _, y_sums = ext.gemm_get_options()
        ext.gemm_set_options(wgmma, bool(args.gemm_pdl), y_sums)
    weights = step_weights(args.layers)
    key_name = weight_keys(weights)
    order = step_order(args.layers)
    report = {"gpu": torch.cuda.get_device_name(), "runs": []}
    for m in args.m:
        graph, _inputs = step_graph(m, args.layers, weights)
        records, replay_ms = replay_traced(graph, ext.gemm_trace_take)
        blocks = [parse(tuple(int(v) for v in r)) for r in records.tolist()]
        calls = calls_of(blocks)
        names = [key_name.get(c["key"], "?") for c in calls]
        if len(calls) != len(order):
            print(f"note: M={m}: {len(calls)} traced GEMM launches for {len(order)} calls (the others ran "
                  f"another kernel)", file=sys.stderr)
        rows = table(calls, names)
        print(f"{report['gpu']}: M={m}, {len(calls)} GEMM launches, replay {replay_ms:.3f} ms (event), "
              f"sum of shares {rows[-1]['share'] / 1e3:.3f} ms; microseconds, medians per layer:")
        print(f"  {'layer':8s} {'tok':>4s} {'blk':>4s} {'drn':>4s} {'s2yb':>4s}" +
              "".join(f" {f:>8s}" for f in FIELDS))
        for r in rows[:-1]:
            print(f"  {r['layer']:8s} {r['tokens']:4d} {r['blocks']:4d} {r['drainers']:4d} {r['s2y_blocks']:4d}" +
                  "".join(f" {r[f]:8.2f}" for f in FIELDS))
        report["runs"].append({"m": m, "replay_ms": replay_ms, "table": rows,
                               "calls": [dict(c, layer=n) for c, n in zip(calls, names)]})
        if args.raw and m == args.m[-1]:
            from safetensors.torch import save_file

            save_file({"records": records.contiguous()}, args.raw,
                      metadata={"gpu": report["gpu"], "m": str(m),
                                "layers": json.dumps({str(k): v for k, v in key_name.items()})})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
