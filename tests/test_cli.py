"""The offline ``python -m server generate`` entry point prints one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", "generate", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("mode", ["ar", "diffusion", "self_spec"])
def test_generate_prints_json_per_mode(mode: str) -> None:
    block = ("--block-length", "8") if mode != "ar" else ()  # ar honours no block length
    proc = run_generate("--prompt", "To be, or not to be", "--max-tokens", "12", "--mode", mode, *block)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["mode"] == mode
    assert 1 <= len(out["token_ids"]) <= 12 and isinstance(out["text"], str)
    assert out["forward_passes"] == sum(out["forward_passes_by_kind"].values()) > 0
    assert out["tokens_per_forward"] == pytest.approx(out["completion_tokens"] / out["forward_passes"], abs=1e-3)
    if mode == "self_spec":
        assert out["acceptance_lengths"] and out["forward_passes_by_kind"]["draft"] == len(out["acceptance_lengths"])
    if mode == "diffusion":
        assert out["denoise_steps_per_block"]


def test_generate_refuses_a_field_the_mode_does_not_honour() -> None:
    proc = run_generate("--prompt", "hi", "--max-tokens", "2", "--mode", "ar", "--block-length", "8")
    assert proc.returncode == 2
    assert "'block_length' is not supported in mode 'ar'" in json.loads(proc.stderr.strip().splitlines()[-1])["error"]


def test_generate_is_deterministic_with_seed() -> None:
    args = ("--prompt", "Once upon a time", "--max-tokens", "10", "--temperature", "0.8", "--seed", "42")
    first, second = run_generate(*args), run_generate(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["token_ids"] == json.loads(second.stdout)["token_ids"]


def test_generate_rejects_bad_arguments() -> None:
    proc = run_generate("--prompt", "x", "--mode", "diffusion", "--refine-steps", "0")
    assert proc.returncode == 2
    assert "refine_steps" in proc.stderr
