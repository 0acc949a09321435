"""A real Prometheus (Debian's ``prometheus`` binary) scrapes the real server every second;
after requests in each mode, its query API shows the per-mode series with the values the
server exposes. Skipped when the binary is absent (``apt-get install prometheus``)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.checkpoint import PROMPTS
from tests.integration.conftest import SERVED_NAME, ServerProcess, free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not installed")

MODES = ["ar", "diffusion", "self_spec"]
CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: nld
    metrics_path: /metrics
    static_configs:
      - targets: ["{target}"]
"""


class Prometheus:
    def __init__(self, target: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(CONFIG.format(target=target))
        self.log_path = workdir / "prometheus.log"
        log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(workdir),
        )
        log.close()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready:\n{self.log_path.read_text()[-3000:]}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def prometheus(served: ServerProcess, tmp_path: Path) -> Iterator[Prometheus]:
    prom = Prometheus(f"127.0.0.1:{served.port}", tmp_path)
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


def by_mode(result: list[dict[str, Any]]) -> dict[str, float]:
    return {s["metric"].get("mode", ""): float(s["value"][1]) for s in result}


def exposed_generation_tokens(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == "nld_generation_tokens_total":
                out[s.labels["mode"]] = out.get(s.labels["mode"], 0.0) + s.value
    return out


def test_prometheus_scrapes_per_mode_series(served: ServerProcess, prometheus: Prometheus) -> None:
    t0 = time.monotonic()
    with httpx.Client(timeout=60) as client:
        for mode in MODES:
            for i, prompt in enumerate(PROMPTS[:3]):
                body = {"model": SERVED_NAME, "max_tokens": 10, "temperature": 0, "mode": mode,
                        "messages": [{"role": "user", "content": prompt}]}
                if i == 1:
                    body["stream"] = True
                    body["stream_options"] = {"include_usage": True}
                r = client.post(f"{served.url}/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
    expected = exposed_generation_tokens(served.url)
    assert all(expected[m] > 0 for m in MODES), expected

    query = "sum by (mode) (nld_generation_tokens_total)"
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen = by_mode(prometheus.query(query))
        if all(seen.get(m) == expected[m] for m in MODES):
            break
        time.sleep(0.5)
    print(f"prometheus showed {seen} after {time.monotonic() - t0:.1f} s")
    assert {m: seen.get(m) for m in MODES} == {m: expected[m] for m in MODES}

    up = prometheus.query('up{job="nld"}')
    assert [float(s["value"][1]) for s in up] == [1.0]
    # the dashboards' token-weighted TPF by mode is computable from the scraped series
    tpf = by_mode(prometheus.query(
        "sum by (mode) (nld_generation_tokens_total) / sum by (mode) (nld_forward_passes_total)"
    ))
    assert set(tpf) >= set(MODES) and all(tpf[m] > 0 for m in MODES), tpf
    assert tpf["ar"] <= 1.0
    labels = prometheus.query('nld_request_success_total{finished_reason="length"}')
    assert {s["metric"]["model"] for s in labels} == {SERVED_NAME}
