"""Fixtures for the kernel tests.

The top-level ``tests/conftest.py`` has already set ``TRITON_INTERPRET=1`` when no GPU is
present; the guard below repeats it (idempotently) so this folder also works when collected
on its own from another rootdir.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """CUDA when present (compiled Triton), else the CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def force_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route ``kernels.ops`` to the Triton kernels even for CPU tensors."""
    monkeypatch.setenv("NLD_FORCE_TRITON", "1")


@pytest.fixture
def force_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route ``kernels.ops`` to the PyTorch reference for CPU tensors."""
    monkeypatch.delenv("NLD_FORCE_TRITON", raising=False)
