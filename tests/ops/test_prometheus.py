"""Our /metrics as Prometheus sees it: promtool's lint, a real Prometheus scraping a live server
under load (PromQL token rate and TTFT quantiles), and every Grafana dashboard expression naming
metrics the server exports and evaluating in Prometheus."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

from clients.loadgen import LoadConfig, run_load
from server.api import gauges
from tests.live_server import free_port
from tests.ops.conftest import ROOT, require_binary

DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "quantserve.json"
GRAFANA_VARS = {"$__rate_interval": "10s", "$__interval": "1s", "$__range": "1m"}
NAME = re.compile(r"\b(quantserve_[a-zA-Z0-9_]+)\b")


def _drive(url: str, requests: int = 2) -> None:
    for i in range(requests):
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": f"warm up {i}",
                                                      "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text


def exported_names(text: str) -> set[str]:
    """Every series name a scrape can contain: samples, and each family's declared names (a
    labelled family with no children yet has a TYPE line and no sample)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def cuda_only_names(monkeypatch) -> set[str]:
    """The names memory_gauges adds on a CUDA device, from the real collector with torch.cuda's
    memory queries faked (no GPU here)."""
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 1)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (3, 4))
    monkeypatch.setattr(gauges, "_nvml_handle", lambda d: None)
    families = gauges.memory_gauges(10, 20, torch.device("cuda", 0))()
    return {f.name for f in families}


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows included."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def _grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


# --------------------------------------------------------------------------- promtool


def test_promtool_check_metrics_is_clean(ops_server):
    promtool = require_binary("promtool")
    _drive(ops_server.url)
    text = httpx.get(ops_server.url + "/metrics", timeout=10).text
    assert "quantserve_time_to_first_token_seconds_bucket" in text
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


def test_metric_names_follow_prometheus_naming(ops_server):
    text = httpx.get(ops_server.url + "/metrics", timeout=10).text
    families = [l.split()[2:4] for l in text.splitlines() if l.startswith("# TYPE ")]
    assert families
    for name, kind in families:
        assert name.startswith("quantserve_"), name
        assert (kind == "counter") == name.endswith("_total"), (name, kind)
        for bad in ("_ms", "_milliseconds", "_kb", "_mb", "_gb", "_percent"):
            assert bad not in name, name


# --------------------------------------------------------------------------- dashboard


def test_every_dashboard_expression_names_exported_metrics(ops_server, monkeypatch):
    exported = exported_names(httpx.get(ops_server.url + "/metrics", timeout=10).text)
    exported |= cuda_only_names(monkeypatch)
    assert "quantserve_torch_reserved_bytes" in exported  # the CUDA names are really there
    exprs = dashboard_exprs()
    assert len(exprs) >= 30
    for title, expr in exprs:
        names = set(NAME.findall(expr))
        assert names, f"panel {title!r}: no quantserve metric in {expr}"
        missing = names - exported
        assert not missing, f"panel {title!r} uses {sorted(missing)}, not exported"
    used = {n for _, e in exprs for n in NAME.findall(e)}
    for must in ("quantserve_generation_tokens_total", "quantserve_time_to_first_token_seconds_bucket",
                 "quantserve_inter_token_latency_seconds_bucket", "quantserve_num_requests_waiting",
                 "quantserve_kv_cache_usage_ratio", "quantserve_device_memory_used_bytes",
                 "quantserve_quantization_info", "quantserve_kernel_backend_layers",
                 "quantserve_http_responses_total"):
        assert must in used, f"the dashboard has no panel with {must}"


# --------------------------------------------------------------------------- a real Prometheus


class Prometheus:
    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: quantserve\n    scrape_interval: 1s\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (workdir / "prometheus.log").read_text()
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("prometheus did not become ready")

    def query(self, promql: str) -> list[dict]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (promql, body)
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, ok, timeout: float = 20.0) -> float | None:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.scalar(promql)
            if value is not None and ok(value):
                return value
            time.sleep(0.25)
        return value

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def prometheus(ops_server, tmp_path_factory):
    binary = require_binary("prometheus")
    prom = Prometheus(binary, ops_server.url.removeprefix("http://"), tmp_path_factory.mktemp("prom"))
    yield prom
    prom.stop()


def test_prometheus_sees_token_rate_and_ttft_quantiles_under_load(ops_server, prometheus):
    assert prometheus.wait_for('up{job="quantserve"}', lambda v: v == 1) == 1
    start_tokens = _server_counter(ops_server.url, "quantserve_generation_tokens_total")
    summary, records = asyncio.run(run_load(LoadConfig(
        base_url=ops_server.url, concurrency=4, duration=4.0, max_tokens=16, chat=False,
        prompt="The history of the printing press")))
    assert summary.errors == 0 and summary.requests >= 4, summary.format()
    assert summary.completion_tokens == 16 * summary.requests  # ignore_eos: every request is full
    end_tokens = _server_counter(ops_server.url, "quantserve_generation_tokens_total")
    assert end_tokens - start_tokens == summary.completion_tokens

    # Prometheus has scraped the final value, and the rate over the load is positive
    scraped = prometheus.wait_for("quantserve_generation_tokens_total", lambda v: v == end_tokens)
    assert scraped == end_tokens
    rate = prometheus.scalar("sum(rate(quantserve_generation_tokens_total[15s]))")
    assert rate is not None and rate > 0
    p50 = prometheus.scalar("histogram_quantile(0.5, sum by (le) "
                            "(rate(quantserve_time_to_first_token_seconds_bucket[15s])))")
    p99 = prometheus.scalar("histogram_quantile(0.99, sum by (le) "
                            "(rate(quantserve_time_to_first_token_seconds_bucket[15s])))")
    assert p50 is not None and p99 is not None and 0 < p50 <= p99, (p50, p99)
    # the quantile is a bucket interpolation: it must lie within the buckets around the clients' own
    ttfts = sorted(r.ttft for r in records)
    assert p50 <= 2 * ttfts[-1] + 0.1, (p50, ttfts)
    itl = prometheus.scalar("histogram_quantile(0.99, sum by (le) "
                            "(rate(quantserve_inter_token_latency_seconds_bucket[15s])))")
    assert itl is not None and itl > 0


def test_dashboard_expressions_evaluate_in_prometheus(prometheus):
    prometheus.wait_for('up{job="quantserve"}', lambda v: v == 1)
    for title, expr in dashboard_exprs():
        prometheus.query(_grafana_to_promql(expr))  # asserts status "success" (parses, evaluates)
    # the quantization table has one row with the facts as labels
    rows = prometheus.query("max by (method, bits, group_size, desc_act, sym, checkpoint_format) "
                            "(quantserve_quantization_info)")
    assert [r["metric"]["bits"] for r in rows] == ["4"]


def _server_counter(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
