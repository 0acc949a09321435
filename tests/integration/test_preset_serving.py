"""The CPU preset served for real: ``python -m server --config configs/cpu-embedded.yaml``
with an environment variable and flags layered on top; the replica identity shows in the
log and as a label on every /metrics series."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ROOT, SUBPROCESS_ENV, ServerProcess, free_port

PRESET = ROOT / "configs" / "cpu-embedded.yaml"


def test_cpu_preset_serves_with_layered_settings(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, **SUBPROCESS_ENV, "NLD_MAX_NUM_SEQS": "4", "NLD_REPLICA_ID": "replica-a",
           "NLD_PORT": "1", "NLD_SERVED_MODEL_NAME": "preset-nld"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:  # the flag --port beats NLD_PORT
        proc = subprocess.Popen([sys.executable, "-m", "server", "--config", str(PRESET), "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, port, log, time.monotonic())
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["preset-nld"]
            r = client.post("/v1/completions", json={"model": "preset-nld", "prompt": "Once upon a time",
                                                     "max_tokens": 4, "mode": "diffusion"})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
            families = list(text_string_to_metric_families(client.get("/metrics").text))
        samples = [s for f in families for s in f.samples]
        assert samples and all(s.labels.get("replica") == "replica-a" for s in samples)
        assert any(s.name == "nld_generation_tokens_total" and s.labels["mode"] == "diffusion" and s.value >= 1
                   for s in samples)
        text = server.log()
        assert "[replica-a]" in text
        assert f"max_num_seqs=4 (environment variable NLD_MAX_NUM_SEQS)" in text
        assert f"kv_cache_tokens=32768 (config file {PRESET})" in text
        assert f"port={port} (flag --port)" in text
    finally:
        assert server.stop() == 0, server.log()[-3000:]
