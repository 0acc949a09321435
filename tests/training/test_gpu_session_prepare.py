"""scripts/gpu_session.sh --prepare: the carry folder a GPU session trains from (data copied,
trajectory runs merged in order, int32, the first run's held-out trajectories)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from training.distill import Trajectories

REPO = Path(__file__).resolve().parents[2]


def _run(folder: Path, rows: int, seed: int) -> Trajectories:
    rng = np.random.default_rng(seed)
    traj = Trajectories(rng.integers(0, 4096, (rows, 16)), rng.integers(4, 12, rows), rng.integers(0, 3, rows))
    folder.mkdir(parents=True)
    traj.save(folder / "trajectories.npz")
    Trajectories(traj.tokens[:2] + 1, traj.target_start[:2], traj.kind[:2]).save(folder / "heldout_trajectories.npz")
    return traj


def test_prepare_merges_trajectory_runs(tmp_path: Path) -> None:
    a, b = _run(tmp_path / "a", 5, 0), _run(tmp_path / "b", 3, 1)
    (tmp_path / "data.npz").write_bytes(b"data")
    carry = tmp_path / "carry"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_session.sh"), "--prepare", str(carry), str(tmp_path / "data.npz"),
                           str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, text=True,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert (carry / "data.npz").read_bytes() == b"data"
    merged = Trajectories.load(carry / "trajectories.npz")
    assert np.load(carry / "trajectories.npz")["tokens"].dtype == np.int32
    assert np.array_equal(merged.tokens, np.concatenate([a.tokens, b.tokens]))
    assert np.array_equal(merged.target_start, np.concatenate([a.target_start, b.target_start]))
    assert np.array_equal(merged.kind, np.concatenate([a.kind, b.kind]))
    held = Trajectories.load(carry / "heldout_trajectories.npz")
    assert np.array_equal(held.tokens, a.tokens[:2] + 1)
