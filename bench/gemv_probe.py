"""Run one shape through the GEMV a few times (a target for ncu / compute-sanitizer).

    PYTHONPATH=. python bench/gemv_probe.py --m 16 --k 4096 --n 4096 [--calls 8]
"""

from __future__ import annotations

import argparse

import torch

from bench.kernels import ours_call, ours_make


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--calls", type=int, default=8)
    args = p.parse_args()
    ws = [ours_make(args.k, args.n) for _ in range(args.calls)]
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.float16)
    call = ours_call("gemv")
    for w in ws:
        call(x, w)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
