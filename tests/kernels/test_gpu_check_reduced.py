"""benchmarks/gpu_check.py in its reduced CPU form: the script a lent GPU session runs must
run end to end against the current kernel and engine APIs (it drifted once, unnoticed, because
only a GPU session ran it), and every kernel check in it must pass under the interpreter."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.gpu_check import main


def test_gpu_check_reduced_runs_and_its_kernel_checks_pass(tmp_path: Path) -> None:
    assert main(["--reduced", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["kernels"] and all(r["ok"] for r in results["kernels"])
    kernels = {r["kernel"] for r in results["kernels"]}
    assert {"paged_attention", "store_kv", "rms_norm", "rotary_qk", "silu_mul", "paged_attention (tuned)"} <= kernels
    assert {r["shape"] for r in results["attention"]} == {"decode", "block_bidirectional", "prefill"}
    steps = {(r["step"], r["batch"]) for r in results["steps"]}
    assert {("ar_decode", 1), ("denoise_32", 8), ("verify_32", 32)} <= steps
    assert all(r["ms"] > 0 for r in results["steps"] if r["step"] != "graph_replays")
    profile = [r for r in results["steps"] if r["step"].startswith("profile:")]
    assert profile and abs(sum(r["fraction_of_floor"] for r in profile) - 1) < 0.5  # top ops: most of the time
    table = (tmp_path / "table.md").read_text()
    assert "| attention |" in table and "ar_decode batch 1, kernel" in table


def test_attention_splits_reduced_runs(tmp_path: Path) -> None:
    """benchmarks/attention_splits.py (the split-count sweep of a GPU session) in reduced form:
    every forced split count matches the reference (it returns 1 otherwise) and is reported."""
    from benchmarks.attention_splits import main as splits_main

    assert splits_main(["--reduced", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "splits.json").read_text())["rows"]
    assert {r["table"] for r in rows} == {"tight", "wide"}
    assert all(set(r["forced_ms"]) == {"1", "2", "4"} and r["best_splits"] in (1, 2, 4) for r in rows)
