"""benchmarks/attention_registers.py: the paged attention kernels compiled ahead of time for
sm_90 (H100/H200) on this GPU-less machine, registers and spills read from ``ptxas -v``. Run
in a subprocess: this test session imported Triton in interpreter mode, which cannot compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.attention_registers import CONFIGS, ptxas_path

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not os.path.exists(ptxas_path()), reason="Triton's NVIDIA backend (ptxas) is not installed")


def registers(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention_registers.py"), "--json", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tuned_configs_do_not_spill_at_launch_specialisation() -> None:
    """Every tuned tile config of the H200 compiles for sm_90 without register spills when the
    compile sees what a launch with the engine's tensors sees (divisible-by-16 strides)."""
    rows = registers()
    assert [r["config"] for r in rows] == [c.name for c in CONFIGS]
    for row in rows:
        assert 0 < row["registers"] <= 255
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row


def test_an_unspecialised_compile_spills() -> None:
    """The detector sees spills where they exist: without the divisibility hints the 128-key
    block tile runs out of registers (what Run 2 of docs/gpu-results.md had measured)."""
    (row,) = registers("--no-specialize", "--only", "block_32")
    assert row["registers"] == 255 and row["spill_stores"] > 0
