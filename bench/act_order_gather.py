"""Act-order cost per call: our gather kernel before the plain kernel vs torch's index_select before
it, against the same layer without act-order, for Llama-2-7B shapes and small M. (Up to v8 it also
timed the GEMV reading x through the permutation, the "fused" gather: results/act-order-gather-*.json
of those runs have its column.) 32 layers per shape (weights from HBM), CUDA-graph timing as in
bench/kernels.py.

    PYTHONPATH=. python bench/act_order_gather.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from bench.common import RESULTS, slug
from bench.kernels import SHAPES, ours_make, time_graph
from quant.backends import cuda as cuda_backend


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--ms", default="1,2,4,8,16")
    args = p.parse_args()
    gpu = torch.cuda.get_device_name()
    rows = []
    for s in ("o", "down", "qkv"):
        k, n = SHAPES[s]
        base = [ours_make(k, n) for _ in range(32)]
        perm = torch.randperm(k, device="cuda")
        permuted = [dataclasses.replace(w, perm=perm) for w in base]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)

            def us(layers, torch_select=False):
                if torch_select:  # index_select, then the plain kernel (the layers without a perm)
                    calls = [(lambda w=w: cuda_backend.matmul(w, x.index_select(1, perm))) for w in base]
                else:
                    calls = [(lambda w=w: cuda_backend.matmul(w, x)) for w in layers]
                return time_graph(calls, 20) / len(layers) * 1000

            plain = us(base)
            row = {"layer": s, "k": k, "n": n, "m": m, "x_kb": m * k * 2 / 1024, "plain_us": round(plain, 2),
                   "select_extra_us": round(us(permuted) - plain, 2),
                   "index_select_extra_us": round(us(base, torch_select=True) - plain, 2)}
            rows.append(row)
            print(f"{s:5s} m={m:2d} plain {plain:6.2f} us  gather kernel +{row['select_extra_us']:6.2f}  "
                  f"index_select +{row['index_select_extra_us']:6.2f}  x={row['x_kb']:.0f} KB", flush=True)
    out = Path(args.out) / f"act-order-gather-{slug(gpu)}.json"
    out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
