"""Serving benchmark: a concurrency sweep of streaming clients against a live server.

Starts `quantserve serve` as a subprocess with the given server arguments (or uses --base-url),
then for each concurrency runs the load generator (clients/loadgen.py) for a fixed time and
records TTFT p50/p99, inter-token latency p50/p99 and aggregate generated tokens/s. The ratio
column is aggregate tok/s over the single-stream tok/s of the same run.

    python -m bench.serving --server-args "--model llama-2-7b --load-format dummy --quantize-group-size 128"
    python -m bench.serving --base-url http://127.0.0.1:8000 --concurrency 1 4 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import asdict

import httpx

from bench.common import RESULTS, device_name, slug, write_result
from clients.loadgen import LoadConfig, run_load
from clients.local import NotReadyError, free_port, wait_ready


def start_server(server_args: str, port: int, log_path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           *shlex.split(server_args)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=900, interval=0.5)
    except NotReadyError as exc:
        proc.kill()
        raise RuntimeError(f"{exc}; see {log_path}") from None
    return proc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server-args", default="", help="arguments for `quantserve serve`")
    p.add_argument("--base-url", default=None, help="benchmark a running server instead")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    p.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--tag", default="", help="name of this configuration in the result file")
    args = p.parse_args()

    proc = None
    url = args.base_url
    if url is None:
        port = free_port()
        RESULTS.mkdir(parents=True, exist_ok=True)
        proc = start_server(args.server_args, port, RESULTS / "serving-server.log")
        url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
        for c in args.concurrency:
            cfg = LoadConfig(base_url=url, concurrency=c, duration=args.duration,
                             max_tokens=args.max_tokens, chat=True)
            asyncio.run(run_load(LoadConfig(base_url=url, concurrency=c, requests=c,
                                            duration=None, max_tokens=8)))  # warm-up
            summary, _ = asyncio.run(run_load(cfg))
            row = {"concurrency": c, **asdict(summary)}
            rows.append(row)
            print(f"c={c:4d} {summary.tokens_per_s:9.1f} tok/s  TTFT p50 {summary.ttft_p50_s * 1e3:7.1f} "
                  f"p99 {summary.ttft_p99_s * 1e3:7.1f} ms  ITL p50 {summary.itl_p50_s * 1e3:6.1f} "
                  f"p99 {summary.itl_p99_s * 1e3:6.1f} ms  errors {summary.errors}", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    single = next((r["tokens_per_s"] for r in rows if r["concurrency"] == 1), None)
    for r in rows:
        r["speedup_vs_single_stream"] = r["tokens_per_s"] / single if single else None
    payload = {"server_args": args.server_args, "model": model.get("id"),
               "quantization": model.get("quantization"), "max_tokens": args.max_tokens,
               "duration_s": args.duration, "results": rows}
    path = write_result("serving" + (f"-{slug(args.tag)}" if args.tag else ""), payload)
    print("wrote", path, "on", device_name())


if __name__ == "__main__":
    main()
