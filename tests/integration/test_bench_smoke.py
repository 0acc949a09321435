"""``python -m server bench`` against the real server (a ``python -m server`` subprocess on
the tiny checkpoint): one run per mode, result.json and the PNGs written, TPF per mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ROOT, SUBPROCESS_ENV, ServerProcess

MODES = ["ar", "diffusion", "self_spec"]
NUM_PROMPTS = 6
MAX_TOKENS = 16


def _success_by_mode(url: str) -> dict[str, float]:
    out = {m: 0.0 for m in MODES}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "nld_request_success_total" and s.labels.get("mode") in out:
                out[s.labels["mode"]] += s.value
    return out


def test_bench_smoke(served: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    before = _success_by_mode(served.url)
    argv = [sys.executable, "-m", "server", "bench", "--base-url", served.url, "--modes", ",".join(MODES),
            "--num-prompts", str(NUM_PROMPTS), "--max-tokens", str(MAX_TOKENS), "--out", str(out), "--no-progress"]
    env = {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("OPENAI_API_KEY", None)
    proc = subprocess.run(argv, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=240)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    result = json.loads((out / "result.json").read_text())
    assert result["config"]["model"] == "tiny-nld"
    runs = {r["label"]: r for r in result["runs"]}
    assert list(runs) == MODES
    for mode, run in runs.items():
        assert run["mode"] == mode and run["request_fields"] == {"mode": mode}
        summary = run["summary"]
        assert summary["completed"] == NUM_PROMPTS and summary["failed"] == 0, summary["errors"]
        assert summary["total_output_tokens"] == NUM_PROMPTS * MAX_TOKENS  # the tiny model never stops early
        assert summary["output_tokens_from_usage"] is True
        tpf = run["tpf"]
        assert tpf is not None and tpf["source"] == "usage", tpf
        assert tpf["tpf_mean"] > 0 and tpf["tpf_weighted"] > 0
        assert (tpf["mean_acceptance_length"] is not None) == (mode == "self_spec")
        for rec in run["requests"]:
            assert rec["ok"] and rec["usage"]["tokens_per_forward"] > 0
        # the mode column of the table
        assert mode in proc.stdout
    # AR commits at most one token per pass beyond the prefill
    assert runs["ar"]["tpf"]["tpf_weighted"] <= 1.0

    for name in ("throughput_tpf.png", "latency.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    assert set(result["plots"]) >= {"throughput_tpf.png", "latency.png"}

    after = _success_by_mode(served.url)
    assert {m: after[m] - before[m] for m in MODES} == {m: NUM_PROMPTS for m in MODES}
