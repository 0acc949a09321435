"""The draft-LoRA distillation: a few steps lower the draft loss on held-out trajectories, the
adapter it writes loads as the draft-only adapter, and self-speculation then still emits
exactly AR greedy; training examples draft only the base model's own continuation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from server.model.loader import load_model
from server.model.tiny import tiny_nld_config
from tests.fixtures.tiny_models import write_random_checkpoint
from tests.training.test_distill import _token_data
from training.data import TokenData
from training.distill import Trajectories
from training.draft_lora import attach_lora, base_trajectories, draft_batch, draft_mask, draft_metrics, main

MASK = 300  # tiny_nld_config's mask id
BLOCK = 6
WEIGHTS = torch.full((BLOCK - 1,), 1.0 / (BLOCK - 1))


def _loss(model, traj: Trajectories) -> float:  # type: ignore[no-untyped-def]
    rng = random.Random(1)
    with torch.no_grad():
        return sum(float(draft_metrics(model, *draft_batch(traj, 16, BLOCK, MASK, rng), MASK, WEIGHTS)[0]) for _ in range(8))


def test_draft_mask_is_causal_prefix_plus_bidirectional_block() -> None:
    m = draft_mask(3, 2)
    assert m[:3, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril()) and not m[:3, 3:].any()
    assert m[3:, :].all()


def test_draft_batch_drafts_only_the_continuation_after_the_whole_prefix() -> None:
    # prompts hold values < 100, continuations values >= 100: every target is continuation
    starts = (10, 14, 20)
    tokens = np.stack([np.r_[30 * i + np.arange(ts), 100 + 30 * i + np.arange(30 - ts)] for i, ts in enumerate(starts)])
    traj = Trajectories(tokens, np.array(starts), np.zeros(3, dtype=np.int64))
    rng, seen = random.Random(0), set()
    for _ in range(60):
        x, y = draft_batch(traj, 8, 5, 99, rng)
        c = x.shape[1] - 5
        seen.add(c)
        assert y.shape == (8, 4) and (y >= 100).all() and (x[:, c + 1 :] == 99).all()
        for row in range(8):  # the prefix is a trajectory from its start, the seed its token c
            matches = [i for i in range(3) if tokens[i, : c + 1].tolist() == x[row, : c + 1].tolist()]
            assert len(matches) == 1 and starts[matches[0]] - 1 <= c
            assert y[row].tolist() == tokens[matches[0], c + 1 : c + 5].tolist()
    assert min(seen) == 9 and max(seen) == 25  # from the shortest prompt's last token to the last full block
    with pytest.raises(ValueError, match="room"):
        draft_batch(Trajectories(tokens, np.array([28, 28, 28]), np.zeros(3, dtype=np.int64)), 1, 5, 99, rng)


def test_draft_metrics_acceptance_counts_leading_matches() -> None:
    # a model-free check of the acceptance arithmetic: argmax rows equal to the targets
    class Echo(torch.nn.Module):
        def forward(self, x, positions, attention, lora_rows):  # type: ignore[no-untyped-def]
            return torch.nn.functional.one_hot(self.rows, 8).float().expand(x.shape[0], -1, -1)

        def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
            return h.clone()

    echo = Echo()
    echo.rows = torch.tensor([0, 0, 1, 2, 5, 4])  # prefix 1, block 5: rows 2..5 predict the 4 drafts
    x = torch.zeros(1, 6, dtype=torch.long)
    _, accepted = draft_metrics(echo, x, torch.tensor([[1, 2, 3, 4]]), 7, torch.full((4,), 0.25))  # type: ignore[arg-type]
    assert accepted == 3.0  # drafts 1, 2 match, 3 does not: 2 accepted + the bonus token


def test_distillation_lowers_heldout_draft_loss_and_adapter_keeps_greedy_output(tmp_path: Path) -> None:
    model_dir = write_random_checkpoint(tmp_path / "model", tiny_nld_config(block_size=8), seed=3)
    data = tmp_path / "data.npz"
    _token_data().save(data)
    adapter = tmp_path / "adapter"
    args = ["--model", str(model_dir), "--data", str(data), "--out", str(adapter), "--rows", "32", "--heldout-rows", "8",
            "--seq-len", "32", "--block", str(BLOCK), "--rank", "4", "--batch-size", "16",
            "--max-steps", "40", "--lr", "1e-2", "--save-minutes", "0"]
    assert main(args) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["o_proj"] and config["r"] == 4

    # the loss the program optimised went down (on its own trajectories, regenerated: the
    # generation is deterministic; a random model has nothing to generalise to held-out text)
    train, _ = base_trajectories(load_model(model_dir, progress=False), str(model_dir), TokenData.load(data), 32, 8, 32, 0)
    fresh = load_model(model_dir, progress=False)
    attach_lora(fresh, rank=4, alpha=32.0)  # B = 0: exactly the base model
    trained_dir = tmp_path / "with_lora"
    trained_dir.mkdir()
    for f in model_dir.iterdir():
        (trained_dir / f.name).write_bytes(f.read_bytes())
    (trained_dir / "linear_spec_lora").mkdir()
    for f in adapter.iterdir():
        (trained_dir / "linear_spec_lora" / f.name).write_bytes(f.read_bytes())
    trained = load_model(trained_dir, progress=False)
    assert trained.has_draft_lora
    assert _loss(trained, train) < _loss(fresh, train)

    prompts = [[5, 9, 13, 17], [20, 21, 22]]
    params = lambda mode: RequestParams(SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), DecodeParams(mode=mode))  # noqa: E731
    eng = LLMEngine(trained, EngineConfig(model=str(trained_dir), kv_cache_tokens=2048, max_model_len=128))
    assert [o["token_ids"] for o in eng.generate(prompts, params("self_spec"))] == [
        o["token_ids"] for o in eng.generate(prompts, params("ar"))
    ]


def test_cli_needs_data_or_trajectories(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path)])
