"""deploy/kubernetes: every overlay renders with ``kubectl kustomize``, every built-in
resource validates offline against the Kubernetes schemas (kubernetes-validate, strict),
the PodMonitor field by field against the Prometheus Operator's, and the manifests agree
with the app: probe paths and ports exist, the container's environment is a valid
configuration binding the probed port, the autoscaler's metrics are gauges /metrics
exports, and the drain fits in the termination grace period."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.metrics import Metrics
from server.options import SERVE, resolve

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
K8S_VERSIONS = ("1.29.0", "1.37.0")  # the oldest release we claim and the newest schemas
# after the preStop sleep and the drain: uvicorn's graceful shutdown (5 s) + engine join (5 s)
SHUTDOWN_MARGIN_S = 10
IMAGE_CONFIGS = "/opt/nld/configs/"  # the Dockerfile copies configs/ there

DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                   "matchExpressions": {"type": "array"}},
}
# The fields of monitoring.coreos.com/v1 PodMonitor that a manifest here may use, as the
# operator's CRD types them (a subset: anything else is rejected as unknown).
PODMONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector"],
            "properties": {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "podMetricsEndpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


def kubectl_with_kustomize_v5() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (.ci/run installs Debian's kubernetes-client when it can)")
    out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=30)
    version = json.loads(out.stdout or "{}").get("kustomizeVersion", "v0")
    if int(version.lstrip("v").split(".")[0] or 0) < 5:
        pytest.skip(f"kubectl's kustomize is {version}; the manifests use kustomize v5 syntax (kubectl >= 1.27)")
    return kubectl


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = kubectl_with_kustomize_v5()
    proc = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, (kind, [d["kind"] for d in docs])
    return found[0]


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_overlays_exist() -> None:
    assert {"gpu", "cpu-demo"} <= set(OVERLAYS)


def test_resources_validate_against_the_schemas(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "PodMonitor"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            jsonschema.validate(doc, PODMONITOR_SCHEMA)
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_custom_resource_check_rejects_typos() -> None:
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {},
           "spec": {"selector": {}, "podMetricsEndpoints": [{"port": "http", "intervall": "15s"}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, PODMONITOR_SCHEMA)
    doc["spec"]["podMetricsEndpoints"] = [{"port": "http", "interval": "15 seconds"}]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, PODMONITOR_SCHEMA)


def container_settings(container: dict[str, Any]) -> Any:
    """The settings the server resolves from the container's environment (a preset path in
    the image is read from this checkout's configs/)."""
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = "nld-server-6d9f-abcde"
        else:
            env[item["name"]] = "from-a-secret"
    if env.get("NLD_CONFIG", "").startswith(IMAGE_CONFIGS):
        preset = REPO / "configs" / env["NLD_CONFIG"][len(IMAGE_CONFIGS):]
        assert preset.is_file(), env["NLD_CONFIG"]
        env["NLD_CONFIG"] = str(preset)
    return resolve(SERVE, {}, env)


def app_paths() -> set[str]:
    from server.api.app import create_app

    app = create_app(SimpleNamespace(model_name="m"), served_model_names=["m"], api_key="k", default_mode="ar",
                     max_body_bytes=1024, version="t")
    return {getattr(r, "path", "") for r in app.routes}


def test_probes_ports_and_environment_match_the_app(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    pod = one(docs, "Deployment")["spec"]["template"]
    container = server_container(docs)
    settings = container_settings(container)  # raises if the environment is not a valid configuration
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.port and settings.host == "0.0.0.0"
    assert settings.sources["replica_id"] == "environment variable NLD_REPLICA_ID"
    assert settings.sources["api_key"] == "environment variable NLD_API_KEY"
    routes = app_paths()
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["startupProbe"]["path"] == "/ready" and probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health"
    for probe in probes.values():
        assert probe["path"] in routes and probe["port"] in ports
    assert pod["spec"]["enableServiceLinks"] is False  # service links inject NLD_* variables

    service = one(docs, "Service")
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    labels = pod["metadata"]["labels"]
    selectors = [service["spec"]["selector"], one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                 one(docs, "PodMonitor")["spec"]["selector"]["matchLabels"]]
    for selector in selectors:
        assert selector.items() <= labels.items(), selector
    for endpoint in one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] in routes

    secret_ref = next(e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "NLD_API_KEY")
    secrets = [d for d in docs if d["kind"] == "Secret"]
    if overlay == "cpu-demo":  # the demo ships its Secret; the gpu overlay expects yours
        assert any(s["metadata"]["name"] == secret_ref["name"] and secret_ref["key"] in s.get("stringData", s.get("data", {}))
                   for s in secrets)
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert settings.model and any(settings.model.startswith(m + "/") for m in mounts), (settings.model, mounts)
        assert settings.device == "cuda"


def test_drain_fits_in_the_grace_period(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = server_container(docs)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = container_settings(container).drain_timeout
    assert pre_stop + drain + SHUTDOWN_MARGIN_S <= pod["terminationGracePeriodSeconds"], (pre_stop, drain)
    # the readiness probe notices the drain (503) within a few seconds of SIGTERM
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness.get("failureThreshold", 3) <= 10


def test_autoscaler_metrics_are_exported_gauges(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    metrics = Metrics(model_name="m")
    gauges = {f.name for f in metrics.registry.collect() if f.type == "gauge"}
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names and set(names) <= gauges, (names, gauges)
    assert {"nld_num_requests_waiting", "nld_kv_cache_usage_perc"} <= set(names)
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    rules = adapter["rules"]["custom"]
    served = {rule["name"]["as"] for rule in rules}
    assert set(names) <= served
    for rule in rules:  # each rule reads the series it serves, per pod
        assert rule["seriesQuery"].startswith(rule["name"]["as"] + "{") and rule["name"]["as"] in gauges
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
