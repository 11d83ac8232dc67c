"""One warm call of our kernels on one layer shape, for `ncu` (Nsight Compute) to profile.

    ncu -k regex:gemm_wgmma -s 3 -c 1 --set full python bench/ncu_one.py --k 4096 --n 4096 --m 64

Random 4-bit g128 weights in the kernel layout (as bench/kernels.py builds them), a fresh copy per
call so every call streams its weights from HBM; the earlier calls warm up the extension and the
workspace, so profile the last one (`-s calls-1 -c 1`). Also a target for compute-sanitizer.
"""

from __future__ import annotations

import argparse

import torch

from quant.backends import cuda as cuda_backend
from bench.kernels import ours_make


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--op", choices=("gemv", "gemm", "dequant"), default=None)
    p.add_argument("--no-wgmma", action="store_true", help="GEMM calls take the mma.sync kernel")
    p.add_argument("--calls", type=int, default=4, help="calls in a row (profile the last with -c/-s)")
    args = p.parse_args()
    ws = [ours_make(args.k, args.n) for _ in range(args.calls)]
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.float16)
    with cuda_backend.gemm_launch_options(not args.no_wgmma):
        for w in ws:
            cuda_backend.matmul(w, x, op=args.op)
    torch.cuda.synchronize()
    print(f"m={args.m} k={args.k} n={args.n} op={args.op or 'auto'} wgmma={not args.no_wgmma}: done")


if __name__ == "__main__":
    main()
