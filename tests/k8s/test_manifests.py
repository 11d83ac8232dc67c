"""docker/k8s renders with kustomize, validates against the Kubernetes 1.37 schemas, and agrees with
the server it deploys: env names are real serve flags (server.cli's parser, server.config's
env_name) and their values parse; probes, ports and the scrape path are routes of the real FastAPI
app; the HPA's metric is one the server exports, served by a prometheus-adapter rule; the grace
period outlasts preStop plus the drain."""

from __future__ import annotations

import argparse
import os
import copy
import re

import kubernetes_validate
import pytest
import yaml

from server.cli import build_parser
from server.config import ENV_PREFIX, EngineConfig, ModelConfig, ServerConfig, env_name
from tests.k8s.manifests import (KUBERNETES_VERSION, env_values, one, render,
                                 server_container)

# Kinds with no schema in kubernetes-validate (CRDs): checked structurally in this file instead.
CRD_KINDS = {"ServiceMonitor"}
EXPECTED_KINDS = {
    "base": {"Namespace", "PersistentVolumeClaim", "Deployment", "Service",
             "HorizontalPodAutoscaler", "PodDisruptionBudget"},
    "gpu-overlay": {"Namespace", "PersistentVolumeClaim", "Deployment", "Service",
            "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"},
    "prometheus-adapter": {"ConfigMap"},
}
DRAIN_MARGIN_S = 10  # what the grace period must leave beyond preStop + --shutdown-timeout


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def serve_env_names() -> dict[str, argparse.Action]:
    """QUANTSERVE_<FLAG> -> the serve flag's argparse action, for every long flag."""
    out = {}
    for action in serve_parser()._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and not opt.startswith("--no-") and opt != "--help":
                out[env_name(opt)] = action
    return out


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    """The real FastAPI app around the tiny model, with an API key set (engine not started)."""
    from server.api.app import create_app
    from server.serve import build_engine

    loaded, engine = build_engine(ModelConfig(model=str(tiny_checkpoint), device="cpu"),
                                  EngineConfig(kv_cache_gb=0.02))
    return create_app(loaded, engine, ServerConfig(api_keys=("sk-k8s-test",)))


def get_routes(app) -> set[str]:
    return {r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or ())}


def exported_metric_names(app) -> set[str]:
    text = app.state.qs.metrics.render().decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


# ---------------------------------------------------------------------- render + schemas

@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_renders_and_validates_against_kubernetes_schemas(name):
    objects = render(name)
    kinds = {o["kind"] for o in objects}
    assert kinds == EXPECTED_KINDS[name]
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} "
                        f"at {'.'.join(map(str, exc.path))}")
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert namespaces == ({"monitoring"} if name == "prometheus-adapter" else {"quantserve"})


def test_schema_validation_is_strict():
    """The validator rejects what a typo in our Deployment would produce (so the test above can
    fail): an unknown field, and a wrong type."""
    deployment = one(render("base"), "Deployment")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    typo = copy.deepcopy(deployment)
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "90s"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", ["base", "gpu-overlay"])
def test_selectors_and_references_line_up(name):
    objects = render(name)
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"].get("sessionAffinity", "None") == "None"  # stateless replicas
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    hpa = one(objects, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", "quantserve")
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pvc = one(objects, "PersistentVolumeClaim", "quantserve-models")
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "quantserve-models"}} in volumes
    mounts = {m["name"]: m["mountPath"] for m in server_container(objects)["volumeMounts"]}
    env = env_values(server_container(objects))
    assert mounts["models"] == env["QUANTSERVE_CACHE_DIR"]
    assert pvc["spec"]["accessModes"] == (["ReadWriteMany"] if name == "gpu-overlay" else ["ReadWriteOnce"])


def test_service_monitor_structure(app):
    """ServiceMonitor is a CRD (no schema in kubernetes-validate): checked structurally against
    the Service it selects and the route it scrapes."""
    objects = render("gpu-overlay")
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme",
                                 "authorization"}
        assert endpoint["port"] in port_names
        assert endpoint["path"] in get_routes(app)
        assert re.fullmatch(r"\d+s", endpoint["interval"])
        assert int(endpoint["scrapeTimeout"][:-1]) < int(endpoint["interval"][:-1])


# ---------------------------------------------------------------------- agreement with the server

@pytest.mark.parametrize("name", ["base", "gpu-overlay"])
def test_env_names_are_serve_flags_and_values_parse(name, monkeypatch):
    container = server_container(render(name))
    flags = serve_env_names()
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), f"duplicate env entries: {names}"
    ours = [n for n in names if n.startswith(ENV_PREFIX)]
    unknown = [n for n in ours if n not in flags]
    assert not unknown, f"not `quantserve serve` flags: {unknown}"
    # The literal values, read the way the server reads them (defaults are built from the
    # environment when the parser is built; argparse checks no choices on defaults, so we do).
    for var in [v for v in list(os.environ) if v.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(var)
    literal = {k: v for k, v in env_values(container).items() if k.startswith(ENV_PREFIX)}
    for k, v in literal.items():
        monkeypatch.setenv(k, v)
    args = build_parser().parse_args(["serve"])
    for k, v in literal.items():
        action = flags[k]
        got = getattr(args, action.dest)
        if action.choices is not None:
            assert got in action.choices, f"{k}={v!r} is not one of {list(action.choices)}"
        expected = type(got)(v) if not isinstance(got, bool) else v.lower() in ("1", "true")
        assert got == expected, f"{k}={v!r} parsed as {got!r}"
    assert args.device == ("cuda" if name == "gpu-overlay" else "cpu")
    assert args.host == "0.0.0.0"
    if name == "gpu-overlay":
        assert "QUANTSERVE_KV_CACHE_GB" not in names  # would override --gpu-memory-utilization


@pytest.mark.parametrize("name", ["base", "gpu-overlay"])
def test_probes_ports_and_scrape_path_match_the_app(name, app, monkeypatch):
    from starlette.testclient import TestClient

    objects = render(name)
    container = server_container(objects)
    routes = get_routes(app)
    port = next(p for p in container["ports"] if p["name"] == "http")
    assert port["containerPort"] == int(env_values(container)["QUANTSERVE_PORT"])
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health"
    assert probes["startupProbe"]["path"] == "/health"
    for probe in probes.values():
        assert probe["path"] in routes
        assert probe["port"] == "http"
    # first boot may quantize: the startup probe waits at least 10 minutes
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    assert annotations["prometheus.io/path"] in routes
    service = one(objects, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    # the kubelet and Prometheus send no API key: these routes must not ask for one
    client = TestClient(app)
    for path in {p["path"] for p in probes.values()} | {annotations["prometheus.io/path"]}:
        assert client.get(path).status_code != 401, path
    assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 401


@pytest.mark.parametrize("name", ["base", "gpu-overlay"])
def test_grace_period_outlasts_prestop_and_drain(name, monkeypatch):
    objects = render(name)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 5 <= pre_stop <= 30
    monkeypatch.setenv("QUANTSERVE_SHUTDOWN_TIMEOUT", env_values(container)["QUANTSERVE_SHUTDOWN_TIMEOUT"])
    shutdown_timeout = build_parser().parse_args(["serve"]).shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + shutdown_timeout + DRAIN_MARGIN_S
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= pre_stop


@pytest.mark.parametrize("name", ["base", "gpu-overlay"])
def test_hpa_metric_is_exported_and_served_by_an_adapter_rule(name, app):
    hpa = one(render(name), "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    metric_name = metric["pods"]["metric"]["name"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    exported = exported_metric_names(app)
    assert metric_name in exported
    config = yaml.safe_load(one(render("prometheus-adapter"), "ConfigMap",
                                "prometheus-adapter")["data"]["config.yaml"])
    served = {}
    for rule in config["rules"]:
        (series,) = re.findall(r"^(\w+)\{", rule["seriesQuery"])
        assert series in exported, f"adapter rule for {series}, which the server does not export"
        assert re.fullmatch(rule["name"]["matches"], series)
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                                  "pod": {"resource": "pod"}}
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"]
        served[rule["name"]["as"]] = series
    assert served.get(metric_name) == metric_name


def test_gpu_overlay_asks_for_one_gpu_and_gpu_nodes():
    base = server_container(render("base"))
    gpu_objects = render("gpu-overlay")
    gpu = server_container(gpu_objects)
    assert "nvidia.com/gpu" not in base["resources"].get("limits", {})
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == 1
    pod = one(gpu_objects, "Deployment")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    omp = next(e for e in gpu["env"] if e["name"] == "OMP_NUM_THREADS")
    assert omp == {"name": "OMP_NUM_THREADS", "value": "4"}
    assert "cpu" not in gpu["resources"]["limits"]
