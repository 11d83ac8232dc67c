"""Asyncio load generator: N concurrent streaming clients against an OpenAI-compatible server.

Each client sends streaming requests back to back (chat or completions) until the duration is
over or the request budget is spent, and records per request: time to first token, the gaps
between streamed chunks (inter-token latency), the completion tokens (from the stream's usage
chunk, else the number of content chunks), and the error if any. `summarize` turns the records
into a `LoadSummary` with p50/p99 latencies and aggregate tokens per second.

Importable (bench/serving.py reuses `run_load` and `LoadSummary`) and runnable:

    python clients/loadgen.py --base-url http://127.0.0.1:8000 --concurrency 8 --duration 30
    python clients/loadgen.py --requests 100 --max-tokens 64 --json

Only needs httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."


@dataclass(frozen=True)
class LoadConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model of /v1/models
    concurrency: int = 4
    duration: float | None = 10.0  # seconds; None: until `requests` are done
    requests: int | None = None  # total request budget across clients; None: until `duration`
    max_tokens: int = 64
    prompt: str = DEFAULT_PROMPT
    chat: bool = True
    temperature: float = 0.0
    api_key: str | None = None
    timeout: float = 120.0
    ignore_eos: bool = True  # every request generates max_tokens (server extra; comparable runs)

    def __post_init__(self) -> None:
        if self.duration is None and self.requests is None:
            raise ValueError("give a duration, a request count, or both")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


@dataclass
class RequestRecord:
    """One streamed request, times in seconds from its start."""

    start: float  # time.perf_counter() when sent
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    e2e: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class LoadSummary:
    requests: int
    ok: int
    errors: int
    duration_s: float
    completion_tokens: int
    tokens_per_s: float  # completion tokens of all requests / wall time
    requests_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    error_samples: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def format(self) -> str:
        ms = lambda v: "n/a" if math.isnan(v) else f"{v * 1e3:.1f} ms"  # noqa: E731
        return "\n".join([
            f"requests {self.requests} ({self.ok} ok, {self.errors} errors) in {self.duration_s:.1f} s"
            f" = {self.requests_per_s:.2f} req/s",
            f"generated {self.completion_tokens} tokens = {self.tokens_per_s:.1f} tok/s",
            f"TTFT  p50 {ms(self.ttft_p50_s)}  p99 {ms(self.ttft_p99_s)}",
            f"ITL   p50 {ms(self.itl_p50_s)}  p99 {ms(self.itl_p99_s)}",
            f"e2e   p50 {ms(self.e2e_p50_s)}  p99 {ms(self.e2e_p99_s)}",
        ] + [f"error: {e}" for e in self.error_samples])


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(records: list[RequestRecord], duration_s: float) -> LoadSummary:
    ok = [r for r in records if r.ok]
    tokens = sum(r.completion_tokens for r in records)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [g for r in ok for g in r.itl]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    errors = [r.error for r in records if r.error]
    d = max(duration_s, 1e-9)
    return LoadSummary(
        requests=len(records), ok=len(ok), errors=len(errors), duration_s=duration_s,
        completion_tokens=tokens, tokens_per_s=tokens / d, requests_per_s=len(records) / d,
        ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
        itl_p50_s=percentile(itl, 50), itl_p99_s=percentile(itl, 99),
        e2e_p50_s=percentile(e2e, 50), e2e_p99_s=percentile(e2e, 99),
        error_samples=sorted(set(errors))[:5])


def _payload(cfg: LoadConfig, model: str) -> tuple[str, dict]:
    body = {"model": model, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.chat:
        body["messages"] = [{"role": "user", "content": cfg.prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = cfg.prompt
    return "/v1/completions", body


def _content(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def one_request(client: httpx.AsyncClient, cfg: LoadConfig, model: str) -> RequestRecord:
    """Send one streaming request and time it (never raises: errors go into the record)."""
    path, body = _payload(cfg, model)
    rec = RequestRecord(start=time.perf_counter())
    last = None
    chunks = 0
    try:
        async with client.stream("POST", path, json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text[:200]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # SSE comments (pings), blank separators
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
                    break
                now = time.perf_counter()
                if _content(chunk, cfg.chat):
                    chunks += 1
                    if rec.ttft is None:
                        rec.ttft = now - rec.start
                    else:
                        rec.itl.append(now - last)
                    last = now
                usage = chunk.get("usage")
                if usage:
                    rec.completion_tokens = int(usage.get("completion_tokens", 0))
                    rec.prompt_tokens = usage.get("prompt_tokens")
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.e2e = time.perf_counter() - rec.start
    if not rec.completion_tokens:
        rec.completion_tokens = chunks
    return rec


async def first_model(client: httpx.AsyncClient) -> str:
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def run_load(cfg: LoadConfig) -> tuple[LoadSummary, list[RequestRecord]]:
    """Run the load described by `cfg`; returns the summary and every request's record."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency + 2,
                          max_keepalive_connections=cfg.concurrency + 2)
    records: list[RequestRecord] = []
    async with httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=cfg.timeout) as client:
        model = cfg.model or await first_model(client)
        budget = cfg.requests
        t0 = time.perf_counter()
        deadline = None if cfg.duration is None else t0 + cfg.duration

        def take() -> bool:
            nonlocal budget
            if deadline is not None and time.perf_counter() >= deadline:
                return False
            if budget is not None:
                if budget <= 0:
                    return False
                budget -= 1
            return True

        async def worker() -> None:
            while take():
                records.append(await one_request(client, cfg, model))

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        elapsed = time.perf_counter() - t0
    return summarize(records, elapsed), records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--concurrency", "-c", type=int, default=4)
    p.add_argument("--duration", "-d", type=float, default=None, help="seconds (default 10 "
                   "unless --requests is given)")
    p.add_argument("--requests", "-n", type=int, default=None, help="total requests")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--completions", action="store_true", help="use /v1/completions, not chat")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    a = p.parse_args(argv)
    duration = a.duration if (a.duration is not None or a.requests is not None) else 10.0
    cfg = LoadConfig(base_url=a.base_url, model=a.model, concurrency=a.concurrency,
                     duration=duration, requests=a.requests, max_tokens=a.max_tokens,
                     prompt=a.prompt, chat=not a.completions, temperature=a.temperature,
                     api_key=a.api_key, ignore_eos=not a.no_ignore_eos)
    summary, _ = asyncio.run(run_load(cfg))
    print(summary.to_json() if a.json else summary.format())
    return 0 if summary.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
