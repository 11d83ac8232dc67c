"""The Docker image, compose file, Prometheus config and Grafana provisioning, checked by reading
(no Docker engine here): hadolint, YAML that parses, every referenced file present, the settings
that make the image correct (CUDA stages, kernels built for the right GPUs, non-root, health
check, model volume, env vars that are real flags)."""

from __future__ import annotations

import fnmatch
import re
import subprocess

import yaml

from server.cli import build_parser
from server.config import env_name
from tests.ops.conftest import ROOT, venv_binary

DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"


def _serve_env_names() -> set[str]:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {s for a in serve._actions for s in a.option_strings if s.startswith("--")}
    return {env_name(f) for f in flags if not f.startswith("--no-")}


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_hadolint_is_clean():
    hadolint = venv_binary("hadolint")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_builds_kernels_on_cuda_and_runs_slim_as_non_root():
    ins = _instructions()
    froms = [rest for op, rest in ins if op == "FROM"]
    assert len(froms) == 2
    assert froms[0].startswith("nvidia/cuda:") and "-devel-" in froms[0] and froms[0].endswith("AS build")
    assert froms[1].startswith("nvidia/cuda:") and "-runtime-" in froms[1]
    text = DOCKERFILE.read_text()
    arch = re.search(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', text).group(1)
    assert arch.split(";") == ["8.0", "8.6", "8.9", "9.0a"]
    assert "python -m quant.build_ext --only cuda --expect quantserve_cuda" in " ".join(text.split())
    runtime = ins[[i for i, (op, _) in enumerate(ins) if op == "FROM"][1]:]
    assert not any("g++" in rest or "nvcc" in rest for op, rest in runtime if op == "RUN")
    assert any(op == "COPY" and rest.startswith("--from=build /opt/venv") for op, rest in runtime)
    users = [rest for op, rest in runtime if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    health = [rest for op, rest in runtime if op == "HEALTHCHECK"]
    assert health and "/health" in health[0]
    assert any(op == "VOLUME" and "/models" in rest for op, rest in runtime)
    env = " ".join(rest for op, rest in runtime if op == "ENV")
    assert "QUANTSERVE_HOST=0.0.0.0" in env and "QUANTSERVE_CACHE_DIR=/models" in env
    for name in re.findall(r"\b(QUANTSERVE_[A-Z_]+)=", env):
        assert name in _serve_env_names(), f"{name} is not a serve flag"
    assert ("ENTRYPOINT", '["quantserve", "serve"]') in runtime


def test_build_context_keeps_what_the_image_copies():
    """.dockerignore is an allow-list: what the build stage needs is in, the rest is out."""
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for p in patterns:
            neg = p.startswith("!")
            pat = p.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or fnmatch.fnmatch(path, pat.replace("**/", "*/")):
                keep = neg
        return keep

    for needed in ("pyproject.toml", "constraints.txt", "README.md", "quant/ext.py",
                   "quant/build_ext.py", "server/cli.py", "csrc/bindings.cpp"):
        assert included(needed), needed
    for excluded in (".venv/bin/python", ".git/HEAD", ".cache/test/x", "tests/conftest.py",
                     "quant/__pycache__/ext.cpython-311.pyc", "bench/results/x.json"):
        assert not included(excluded), excluded


def test_compose_wires_server_prometheus_and_grafana():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"quantserve", "prometheus", "grafana"}
    server = services["quantserve"]
    context = (DOCKER / server["build"]["context"]).resolve()
    assert context == ROOT and (context / server["build"]["dockerfile"]).is_file()
    gpu = server["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["count"] == 1 and "gpu" in gpu["capabilities"]
    for name in server["environment"]:
        if name.startswith("QUANTSERVE_"):
            assert name in _serve_env_names(), f"{name} is not a serve flag"
    port = server["ports"][0].rsplit(":", 1)[1]
    named = set(compose.get("volumes") or {})
    for svc in services.values():  # bind mounts exist, named volumes are declared
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), source
            else:
                assert source in named, source

    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"quantserve:{port}"] and prom["scrape_configs"][0]["metrics_path"] == "/metrics"
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert mounted["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"

    grafana_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    prov = DOCKER / grafana_mounts["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dashboards = yaml.safe_load((prov / "dashboards" / "quantserve.yaml").read_text())
    path = dashboards["providers"][0]["options"]["path"]
    host_dir = DOCKER / grafana_mounts[path]
    board = host_dir / "quantserve.json"
    assert board.is_file()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/quantserve.json"
    uids = set(re.findall(r'"uid": "([^"]+)"', board.read_text())) - {"quantserve"}
    assert uids == {ds["uid"]}, "the dashboard must use the provisioned datasource's uid"
