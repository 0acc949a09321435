"""Self-distillation (training/distill.py): inference-like noise, greedy trajectories checked
against a dense forward, and the whole stage end to end on a tiny slice (generation, a few
steps, export) with its loss falling, the export serving every mode, and an exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from server.model.loader import load_model
from server.model.model import DenseAttention
from server.model.tiny import tiny_nld_config
from tests.fixtures.tiny_models import write_random_checkpoint
from training.data import TokenData
from training.distill import (KIND_CHAT, KIND_SAMPLED, distill, distill_noise, generate_trajectories, make_prompts,
                              masked_token_loss, parse_args, teacher_engine)
from training.objective import causal_mask
from training.tokenizer import ASSISTANT_ID, BOS_ID, EOS_ID, USER_ID

MASK = 300  # tiny_nld_config's mask id


def _token_data(seed: int = 0) -> TokenData:
    rng = np.random.default_rng(seed)
    train = rng.integers(7, MASK, 6000).astype(np.uint16)
    heldout = rng.integers(7, MASK, 3000).astype(np.uint16)
    chat, starts = [], []
    for _ in range(60):
        starts.append(len(chat))
        chat += [BOS_ID, USER_ID, *rng.integers(7, MASK, int(rng.integers(4, 12))).tolist(), ASSISTANT_ID,
                 *rng.integers(7, MASK, 30).tolist(), EOS_ID]
    return TokenData(train, np.asarray(chat, dtype=np.uint16), np.asarray(starts, dtype=np.int64), heldout)


@pytest.fixture
def tiny_run(tmp_path: Path) -> tuple[Path, Path]:
    model_dir = write_random_checkpoint(tmp_path / "model", tiny_nld_config(block_size=8), seed=3)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS_ID}) + "\n")
    data = tmp_path / "data.npz"
    _token_data().save(data)
    return model_dir, data


def _args(model_dir: Path, data: Path, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return parse_args(["--model", str(model_dir), "--data", str(data), "--out", str(out), "--rows", "24", "--heldout-rows", "6",
                       "--seq-len", "32", "--block-sizes", "4", "8", "--traj-rows", "8", "--real-rows", "4", "--lr", "3e-3",
                       "--warmup-steps", "2", "--log-every", "5", "--eval-minutes", "1000", "--eval-windows", "4",
                       "--eval-prompts", "3", "--eval-prompt-len", "10", "--eval-new-tokens", "16", "--eval-block", "4",
                       "--gen-batch", "16", *extra])


def test_distill_noise_is_inference_like() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(4, 200, (64, 32))
    target_start = torch.randint(1, 30, (64,))
    for block, draft_prob in ((4, 0.5), (8, 0.5), (8, 1.0), (16, 0.0)):
        n = distill_noise(x0, target_start, block, MASK, draft_prob, gen)
        assert torch.equal(n.noisy, torch.where(n.masked, torch.full_like(x0, MASK), x0))
        for r in range(64):
            for b in range(32 // block):
                lo = b * block
                blk = n.masked[r, lo : lo + block]
                if lo < int(target_start[r]) - 1:
                    assert not blk.any()  # a block holding prompt tokens as targets is never noised
                    continue
                assert not blk[0]  # the seed stays clean
                assert blk[1:].any()  # at least one target per block
                if draft_prob == 1.0:
                    assert blk[1:].all()  # the [seed, MASK x (B-1)] draft layout
        if draft_prob == 0.5:  # both layouts occur
            full = n.masked.view(64, -1, block)[..., 1:].all(-1)
            partial = n.masked.view(64, -1, block)[..., 1:].any(-1) & ~full
            assert full.any() and partial.any()


def test_distill_noise_lookahead_masks_whole_blocks_of_greedy_tokens() -> None:
    """With lookahead_prob, some blocks are masked seed included (the all-mask canvas a
    lookahead commit proposes), only where every token of the block is a greedy target; the
    other blocks keep the plain layouts, drawn exactly as without lookahead."""
    x0 = torch.randint(4, 200, (64, 32))
    target_start = torch.randint(1, 30, (64,))
    plain = distill_noise(x0, target_start, 4, MASK, 0.5, torch.Generator().manual_seed(3))
    ahead = distill_noise(x0, target_start, 4, MASK, 0.5, torch.Generator().manual_seed(3), lookahead_prob=0.4)
    whole = ahead.masked.view(64, 8, 4).all(-1)
    starts = torch.arange(8) * 4
    assert whole.any()
    assert not (whole & (starts[None, :] < target_start[:, None])).any()  # never over a prompt token
    assert torch.equal(ahead.masked.view(64, 8, 4)[~whole], plain.masked.view(64, 8, 4)[~whole])
    assert (ahead.p_mask.view(64, 8, 4)[whole] == 1).all()
    assert torch.equal(ahead.noisy, torch.where(ahead.masked, torch.full_like(x0, MASK), x0))


def test_certainty_term_sharpens_only_the_proposals_already_right() -> None:
    """masked_token_loss = CE + w x (entropy of the rows whose argmax is the target) / rows,
    checked against a direct computation; a wrong row's gradient is the cross-entropy's alone,
    and a step along the gradient lowers a right row's entropy more than CE alone does."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(12, 40, generator=gen)
    target = logits.argmax(-1)
    target[6:] = (target[6:] + 1) % 40  # rows 0-5 right, the rest wrong
    right = logits.argmax(-1) == target
    assert right[:6].all() and not right[6:].any()
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1)
    ce = torch.nn.functional.cross_entropy(logits, target)
    for w in (0.0, 0.7):
        loss, stats = masked_token_loss(logits, target, w)
        assert loss.item() == pytest.approx(ce.item() + w * entropy[:6].sum().item() / 12, rel=1e-5)
        assert stats["distill_acc"] == 0.5
        assert stats["certainty"] == pytest.approx(entropy[:6].sum().item() / 12, rel=1e-5)

    def grad(w: float) -> torch.Tensor:
        x = logits.clone().requires_grad_(True)
        masked_token_loss(x, target, w)[0].backward()
        assert x.grad is not None
        return x.grad

    plain, forced = grad(0.0), grad(0.7)
    assert torch.equal(plain[6:], forced[6:])
    assert not torch.allclose(plain[:6], forced[:6])

    def entropy_after(g: torch.Tensor) -> torch.Tensor:
        p = (logits - 0.5 * g).softmax(-1)
        return -(p * p.log()).sum(-1)

    assert (entropy_after(forced)[:6] < entropy_after(plain)[:6]).all()


def test_trajectories_are_the_teachers_greedy_continuations(tiny_run: tuple[Path, Path]) -> None:
    model_dir, data_path = tiny_run
    data = TokenData.load(data_path)
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    prompts = make_prompts(data, 12, 32, seed=1, sampled_frac=0.3, chat_frac=0.3)
    assert {k for _, k, _ in prompts} >= {KIND_SAMPLED, KIND_CHAT}
    for p, kind, _ in prompts:
        if kind == KIND_CHAT:
            assert p[-1] == ASSISTANT_ID and p[0] == BOS_ID
    traj = generate_trajectories(teacher_engine(model, str(model_dir), 32), prompts, 32, seed=1)
    assert traj.tokens.shape == (12, 32)
    with torch.no_grad():
        for row, start, (p, kind, n_sampled) in zip(traj.tokens, traj.target_start, prompts):
            assert list(row[: len(p)]) == p and start == len(p) + n_sampled
            x = torch.from_numpy(row)[None]
            logits = model.compute_logits(model(x, torch.arange(32)[None], DenseAttention(causal_mask(32))))[0]
            logits[:, MASK] = float("-inf")
            # every token from target_start on is the argmax of the dense causal forward
            assert torch.equal(logits[start - 1 : -1].argmax(-1), x[0, start:])


def test_distillation_end_to_end_on_a_tiny_slice(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, data = tiny_run
    out = tmp_path / "run"
    torch.manual_seed(0)
    summary = distill(_args(model_dir, data, out, "--max-steps", "40", "--keep-best"))
    info = json.loads((out / "trajectories.json").read_text())
    assert info["rows"] == 24 and sum(info["kinds"].values()) == 24
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(5, 41, 5)) and [r["step"] for r in evals] == [0, 40]
    assert np.mean([r["distill_ce"] for r in train[-2:]]) < np.mean([r["distill_ce"] for r in train[:2]]) - 0.5
    assert all(r["self_spec_equals_ar"] for r in evals)
    assert (out / "curves.png").stat().st_size > 0
    assert summary["steps"] == 40
    # --keep-best: the evaluated weights with the longest draft acceptance within the AR tolerance
    best = json.loads((out / "best.json").read_text())
    allowed = [r for r in evals if r["ar_ppl"] <= evals[0]["ar_ppl"] * 1.02]
    assert best["step"] in [r["step"] for r in allowed]
    assert best["draft_accept_len"] == max(r["draft_accept_len"] for r in allowed)
    assert (out / "best" / "model.safetensors").is_file()

    # the export loads and serves every mode; self_spec at temperature 0 is AR greedy
    final = out / "final"
    assert json.loads((final / "config.json").read_text()) == json.loads((model_dir / "config.json").read_text())
    engine = LLMEngine(load_model(final, progress=False), EngineConfig(model=str(final), max_model_len=128, kv_cache_tokens=2048))
    prompts = [[BOS_ID, 17, 29, 41], [BOS_ID, 99, 12]]
    outs = {}
    for mode in ("ar", "diffusion", "self_spec"):
        params = RequestParams(SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), DecodeParams(mode=mode))
        outs[mode] = [o["token_ids"] for o in engine.generate(prompts, params)]
        assert all(len(o) == 20 for o in outs[mode])
    assert outs["self_spec"] == outs["ar"]


def test_distillation_resumes_where_it_stopped(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Stopping at a checkpoint and running again reproduces the uninterrupted run (with the
    certainty term on, which is logged)."""
    model_dir, data = tiny_run
    straight = distill(_args(model_dir, data, tmp_path / "a", "--max-steps", "12", "--certainty-weight", "0.5"))
    stopped = distill(_args(model_dir, data, tmp_path / "b", "--max-steps", "12", "--stop-at-step", "6",
                            "--certainty-weight", "0.5"))
    assert stopped["stopped"] and not (tmp_path / "b" / "final").exists()
    assert torch.load(tmp_path / "b" / "ckpt" / "last.pt", weights_only=False)["step"] == 6
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # as if killed after logging past the checkpoint
        f.write(json.dumps({"kind": "train", "step": 8}) + "\n")
    resumed = distill(_args(model_dir, data, tmp_path / "b", "--max-steps", "12", "--certainty-weight", "0.5"))
    assert resumed["steps"] == 12
    logged = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["kind"] == "train"] == [5, 10, 12]
    # the log carries the certainty term and the diffusion text's perplexity against AR's
    assert all("certainty" in r for r in logged if r["kind"] == "train")
    assert all(math.isfinite(r["diffusion_ppl_ratio"]) for r in logged if r["kind"] == "eval")
    for key in ("ar_ce", "draft_ce"):
        assert resumed["final_eval"][key] == pytest.approx(straight["final_eval"][key], rel=1e-5)


def test_decoding_defaults_selection_rule() -> None:
    """benchmarks/decoding_sweep.py: the fastest diffusion setting that agrees with AR and
    keeps its perplexity; else the fastest that keeps its perplexity; else the best text."""
    from benchmarks.decoding_sweep import choose

    def row(block: int, threshold: float, tpf: float, agreement: float, ppl: float) -> dict:
        return {"block_length": block, "threshold": threshold, "tpf": tpf, "agreement": agreement, "ppl": ppl}

    spec = [{"draft_length": 3, "tpf": 1.5}, {"draft_length": 7, "tpf": 2.0}, {"draft_length": 15, "tpf": 2.0}]
    rows = [row(4, 0.9, 1.5, 0.95, 4.0), row(8, 0.9, 2.5, 0.92, 4.3), row(8, 0.5, 3.5, 0.5, 4.3), row(16, 0.5, 5.0, 0.3, 9.0)]
    chosen = choose(rows, spec, ar_ppl=4.0)
    assert chosen["diffusion"] == {"block_length": 8, "threshold": 0.9}
    assert chosen["self_spec"] == {"draft_length": 7, "block_length": 8}  # ties go to the shorter draft
    assert choose(rows[2:], spec, ar_ppl=4.0)["diffusion"] == {"block_length": 8, "threshold": 0.5}
    assert choose(rows[3:], spec, ar_ppl=4.0)["diffusion"] == {"block_length": 16, "threshold": 0.5}
    ahead = dict(row(4, 0.7, 2.6, 0.93, 4.2), lookahead=True)  # the lookahead setting is written with the rest
    assert choose(rows + [ahead], spec, ar_ppl=4.0)["diffusion"] == {"block_length": 4, "threshold": 0.7, "lookahead": True}
    margin = dict(row(4, 0.5, 2.7, 0.93, 4.1), lookahead=True, confidence="margin")  # so is the confidence measure
    assert choose(rows + [ahead, margin], spec, ar_ppl=4.0)["diffusion"] == {
        "block_length": 4, "confidence": "margin", "threshold": 0.5, "lookahead": True}
    # guessed seeds are written only where the chosen setting used them
    guessed = dict(row(4, 0.6, 2.8, 0.93, 4.1), lookahead=True, guess_seed=True)
    assert choose(rows + [ahead, guessed], spec, ar_ppl=4.0)["diffusion"] == {
        "block_length": 4, "threshold": 0.6, "lookahead": True, "guess_seed": True}
    assert "guess_seed" not in choose(rows + [dict(ahead, guess_seed=False)], spec, ar_ppl=4.0)["diffusion"]


def test_sweep_heldout_windows_are_plain_held_out_text(tmp_path: Path) -> None:
    """benchmarks/decoding_sweep.py --heldout-windows: 16-48 tokens of the held-out stream,
    special tokens dropped, the same windows on every call."""
    from benchmarks.decoding_sweep import heldout_windows

    data = _token_data(1)
    data.heldout[::7] = EOS_ID  # special tokens sprinkled through the stream
    path = tmp_path / "data.npz"
    data.save(path)
    windows = heldout_windows(str(path), 20)
    assert windows == heldout_windows(str(path), 20) and len(windows) == 20
    held = data.heldout.tolist()
    for w in windows:
        assert 16 <= len(w) <= 48 and min(w) > 6
        starts = [i for i, t in enumerate(held) if t == w[0]]  # each is a run of the stream, special tokens skipped
        assert any([t for t in held[i : i + 2 * len(w)] if t > 6][: len(w)] == w for i in starts)


def test_compare_times_modes_interleaved_and_reports_medians(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/decoding_sweep.py compare: every round times each mode at batch 1 and 8 once,
    in turn (so drift hits all modes), and the median of the rounds is reported."""
    from benchmarks import decoding_sweep

    calls: list[tuple[str, int]] = []

    def fake_run(engine, prompts, max_tokens, batch, **decode):  # type: ignore[no-untyped-def]
        calls.append((decode["mode"], batch))
        return {"tok_s": float(len(calls))}

    monkeypatch.setattr(decoding_sweep, "run", fake_run)
    decodes = {m: {"mode": m} for m in ("ar", "diffusion")}
    speeds = decoding_sweep.timed_rounds(None, [[1]], 4, decodes, rounds=3)
    assert calls == [("ar", 1), ("ar", 8), ("diffusion", 1), ("diffusion", 8)] * 3
    assert speeds == {"ar": {1: 5.0, 8: 6.0}, "diffusion": {1: 7.0, 8: 8.0}}  # calls 1/5/9, 2/6/10, ...
