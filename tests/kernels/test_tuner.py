"""The attention launch tuner: the generic ``LaunchTuner`` with a fake timer, the candidate
pruning, and ``block_attention(autotune=True)`` end to end under the interpreter (a fake timer
stands in for CUDA events; every candidate still really runs once and is checked)."""

from __future__ import annotations

import os

import pytest
import torch

import kernels.block_attention as ba
from kernels.block_attention import (
    ATTENTION_TUNER, TileConfig, block_attention, default_tile_config, plan_launch,
    query_len_bucket, stage_variants, tile_candidates,
)
from kernels.reference import paged_attention_reference
from kernels.tuner import LaunchTuner

from tests.kernels.test_block_attention import assert_close, make_batch


class FakeCompiled:
    def __init__(self, ptx: str) -> None:
        self.asm = {"ptx": ptx}


def test_tuner_picks_fastest_valid_and_caches():
    buf = torch.zeros(4)
    times = {"a": 3.0, "b": 1.0, "c": 0.5, "d": 0.1, "e": 2.0}
    launches: list[str] = []
    timed: list[str] = []

    def launch(cfg):  # type: ignore[no-untyped-def]
        launches.append(cfg)
        if cfg == "c":
            raise RuntimeError("out of resources")
        buf.fill_(99.0 if cfg == "d" else 1.0)  # "d" computes the wrong thing
        return None

    def timer(fn, device):  # type: ignore[no-untyped-def]
        timed.append(launches[-1])
        return times[launches[-1]]

    tuner = LaunchTuner("t", timer=timer)
    best = tuner.tune("k", ["a", "b", "c", "d"], lambda cfg: ["e"], launch, lambda: buf,
                      torch.device("cpu"))
    assert best == "b"
    rec = tuner.records["k"]
    assert set(rec.timings) == {"a", "b", "e"}
    assert "RuntimeError" in rec.rejected["c"] and "differs" in rec.rejected["d"]
    assert timed == ["a", "b", "e"]
    n = len(launches)
    assert tuner.tune("k", ["a"], None, launch, lambda: buf, torch.device("cpu")) == "b"
    assert len(launches) == n and tuner.lookup("k") == "b"
    assert rec.as_dict()["best"] == "b"


def test_tuner_skips_variants_with_identical_binary():
    buf = torch.zeros(1)
    ptx = {"x1": "A", "y1": "B", "x2": "A", "x3": "C"}

    def launch(cfg):  # type: ignore[no-untyped-def]
        return FakeCompiled(ptx[cfg])

    times = iter([2.0, 1.0, 0.5, 5.0])  # x1, y1, (x2 is x1's binary but y1 won), x3 ...
    tuner = LaunchTuner("t", timer=lambda fn, device: next(times))
    best = tuner.tune("k", ["x1", "y1"], lambda b: ["x2", "x3"], launch, lambda: buf,
                      torch.device("cpu"))
    # y1 won round one; x2 and x3 are timed as variants (their PTX differs from y1's)
    assert best == "x2"
    times2 = iter([2.0, 1.0, 0.5])
    tuner2 = LaunchTuner("t2", timer=lambda fn, device: next(times2))
    best2 = tuner2.tune("k", ["y1", "x1"], lambda b: ["x2"], launch, lambda: buf,
                        torch.device("cpu"))
    # x1 won; x2 compiles to x1's PTX: not timed, x1 stays
    assert best2 == "x1" and "same PTX" in tuner2.records["k"].rejected["x2"]


def test_tuner_raises_when_nothing_runs():
    def launch(cfg):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"broken {cfg}")

    with pytest.raises(RuntimeError, match="broken a"):
        LaunchTuner("t").tune("k", ["a", "b"], None, launch, lambda: torch.zeros(1),
                              torch.device("cpu"))


def _pairs(cands):  # type: ignore[no-untyped-def]
    return {(c.block_n, c.num_warps) for c in cands}


def test_candidates_pruned_for_head_dim():
    c128 = tile_candidates(128)
    assert c128[0] == default_tile_config(128) == TileConfig(64, 4, 3)
    assert _pairs(c128) == {(32, 2), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)}
    assert _pairs(tile_candidates(96)) == _pairs(c128)  # padded to BLOCK_D 128
    c256 = tile_candidates(256)
    assert c256[0] == TileConfig(32, 4, 3)
    assert _pairs(c256) == {(32, 4), (32, 8), (64, 8)}
    assert len(tile_candidates(16)) == 9  # small heads: the whole BLOCK_N x warps grid
    assert all(c.num_stages == 3 for c in c128)
    assert {c.num_stages for c in stage_variants(TileConfig(32, 8, 3))} == {1, 2}


def test_query_len_buckets():
    assert [query_len_bucket(n) for n in (1, 2, 8, 9, 32, 33, 4096)] == \
        ["1", "<=8", "<=8", "<=32", "<=32", ">32", ">32"]


def _batch(device, seed=0):  # type: ignore[no-untyped-def]
    return make_batch([(20, 1, True), (37, 3, False), (0, 2, True)], num_kv_heads=2, group=2,
                      head_dim=16, page_size=16, dtype=torch.float32, device=device, seed=seed)


def test_autotune_off_by_default_under_interpreter(device):
    if device.type == "cuda":
        pytest.skip("on CUDA tuning is on by default")
    b = _batch(device)
    plan = plan_launch(b.q, b.k, b.k_cache, b.block_tables, b.max_query_len)
    assert plan.tune_key is None and plan.config == default_tile_config(16)
    with pytest.raises(ValueError, match="conflicts"):
        plan_launch(b.q, b.k, b.k_cache, b.block_tables, b.max_query_len, block_n=32,
                    autotune=True)


@pytest.fixture
def fresh_tuner(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """An empty tuner cache and a deterministic fake timer (later candidates are 'faster')."""
    ATTENTION_TUNER.clear()
    counter = iter(range(1000, 0, -1))
    monkeypatch.setattr(ATTENTION_TUNER, "timer", lambda fn, device: float(next(counter)))
    yield ATTENTION_TUNER
    ATTENTION_TUNER.clear()


@pytest.mark.parametrize("num_splits", [1, 3])
def test_block_attention_autotune_end_to_end(num_splits, device, fresh_tuner, monkeypatch):
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the interpreter")
    b = _batch(device, seed=1)
    expected = paged_attention_reference(*b.args())
    out = block_attention(*b.args(), num_splits=num_splits, autotune=True)
    assert_close(out, expected, torch.float32)
    kernel = "main" if num_splits == 1 else "split"
    key = (kernel, "<=8", 16, 2, "float32")
    rec = fresh_tuner.records[key]
    assert not rec.rejected, rec.rejected
    assert len(rec.timings) == len(tile_candidates(16)) + 2  # + stage variants of the winner
    assert rec.best == min(rec.timings, key=rec.timings.__getitem__)
    plan = plan_launch(b.q, b.k, b.k_cache, b.block_tables, b.max_query_len,
                       num_splits=num_splits, autotune=True)
    assert plan.tuned and plan.config == rec.best and plan.tune_key == key

    # a second call with the same key is a lookup: no tuning
    def no_tuning(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("tuned twice")

    monkeypatch.setattr(fresh_tuner, "tune", no_tuning)
    b2 = _batch(device, seed=2)
    assert_close(block_attention(*b2.args(), num_splits=num_splits, autotune=True),
                 paged_attention_reference(*b2.args()), torch.float32)


def test_no_tuning_during_graph_capture(device, fresh_tuner, monkeypatch):
    """A capture with an untuned key launches the default config and leaves the key untuned."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the interpreter")
    monkeypatch.setattr(ba, "capturing", lambda: True)
    b = _batch(device, seed=3)
    out = block_attention(*b.args(), num_splits=1, autotune=True)
    assert_close(out, paged_attention_reference(*b.args()), torch.float32)
    assert not fresh_tuner.best and not fresh_tuner.records


@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_every_candidate_tile_is_correct(head_dim, num_splits, device):
    """Each BLOCK_N the tuner can pick for real head dims (the interpreter ignores warps and
    stages; on a GPU the tuner's own output check covers those)."""
    b = make_batch([(150, 1, True), (40, 9, True), (70, 5, False)], num_kv_heads=1, group=4,
                   head_dim=head_dim, page_size=16, dtype=torch.float16, device=device, seed=7)
    expected = paged_attention_reference(*b.args())
    configs = tile_candidates(head_dim)
    for block_n in sorted({c.block_n for c in configs}):
        cfg = next(c for c in configs if c.block_n == block_n)
        out = block_attention(*b.args(), num_splits=num_splits, block_n=cfg.block_n,
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        assert_close(out, expected, torch.float16)
