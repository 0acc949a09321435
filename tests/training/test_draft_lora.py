"""The draft-LoRA distillation: a few steps lower the draft loss, the adapter it writes loads
as the draft-only adapter, and self-speculation then still emits exactly AR greedy."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from server.model.loader import load_model
from server.model.model import DenseAttention
from server.model.tiny import tiny_nld_config
from tests.fixtures.tiny_models import write_random_checkpoint
from training.draft_lora import attach_lora, draft_batch, draft_mask, main


def draft_loss(model, seqs, mask_id: int, seed: int = 1) -> float:  # type: ignore[no-untyped-def]
    prefix, block = 8, 6
    x, y = draft_batch(seqs, 16, prefix, block, mask_id, random.Random(seed))
    rows = torch.zeros(prefix + block, dtype=torch.bool)
    rows[prefix:] = True
    with torch.no_grad():
        hidden = model(x, torch.arange(prefix + block).expand_as(x), DenseAttention(draft_mask(prefix, block)), rows.expand_as(x))
        logits = model.compute_logits(hidden[:, prefix + 1 :])
        logits[..., mask_id] = float("-inf")
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))


def test_draft_mask_is_causal_prefix_plus_bidirectional_block() -> None:
    m = draft_mask(3, 2)
    assert m[:3, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril()) and not m[:3, 3:].any()
    assert m[3:, :].all()


def test_distillation_lowers_draft_loss_and_adapter_keeps_greedy_output(tmp_path: Path) -> None:
    cfg = tiny_nld_config(vocab_size=64, mask_token_id=60, eos_token_id=61, block_size=8)
    model_dir = write_random_checkpoint(tmp_path / "model", cfg, seed=3)
    stream = np.random.default_rng(0).integers(3, 50, size=4000).astype(np.uint16)
    np.savez(tmp_path / "data.npz", train=stream)
    adapter = tmp_path / "adapter"
    args = ["--model", str(model_dir), "--data", str(tmp_path / "data.npz"), "--out", str(adapter), "--sequences", "24",
            "--prompt-len", "12", "--new-tokens", "24", "--prefix-len", "8", "--block", "6", "--rank", "4",
            "--batch-size", "16", "--max-steps", "40", "--lr", "1e-2"]
    assert main(args) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["o_proj"] and config["r"] == 4

    # the loss the program optimised went down: compare the trained adapter with a fresh one
    from training.draft_lora import distillation_sequences

    seqs = distillation_sequences(str(model_dir), stream, 24, 12, 24, seed=0)
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
    assert draft_loss(trained, seqs, 60) < draft_loss(fresh, seqs, 60)

    prompts = [[5, 9, 13, 17], [20, 21, 22]]
    params = lambda mode: RequestParams(SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), DecodeParams(mode=mode))  # noqa: E731
    eng = LLMEngine(trained, EngineConfig(model=str(trained_dir), kv_cache_tokens=2048, max_model_len=128))
    assert [o["token_ids"] for o in eng.generate(prompts, params("self_spec"))] == [
        o["token_ids"] for o in eng.generate(prompts, params("ar"))
    ]
