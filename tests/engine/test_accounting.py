"""Per-request accounting: forward passes by kind, denoise steps per block, acceptance lengths
and tokens per forward (TPF = emitted tokens / all forward passes of the request)."""

from __future__ import annotations

import math
import random

import pytest

from server.engine.modes import work_kind_names
from tests.engine.helpers import Driver, make_engine, model_for, to_params

MODEL_SEED = 1
EOS = 36  # shows up in some outputs of this model, so some requests end on a stop


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(2, 30))] for _ in range(n)]


SPECS = [
    dict(mode="ar", max_tokens=17),
    dict(mode="ar", max_tokens=40, ignore_eos=True),
    dict(mode="diffusion", block_length=4, refine_steps=4, policy="threshold", max_tokens=19),
    dict(mode="diffusion", block_length=8, refine_steps=3, policy="low_confidence", max_tokens=40),
    dict(mode="diffusion", block_length=8, refine_steps=8, policy="leftmost", max_tokens=24, seed_first_position=False),
    dict(mode="diffusion", block_length=1, refine_steps=1, max_tokens=5),  # seeded 1-blocks need no denoise
    # lookahead: commits (and the prompt's last pass) also propose the next block
    dict(mode="diffusion", block_length=3, refine_steps=3, threshold=0.2, lookahead=True, max_tokens=22),
    dict(mode="self_spec", block_length=4, max_tokens=23),
    dict(mode="self_spec", block_length=8, max_tokens=40, ignore_eos=True),
    dict(mode="self_spec", draft_length=1, max_tokens=9),
]


def check_accounting(
    stats, spec: dict, tokens: list[int], reason: str, prompt_len: int, budget: int, alone: bool
) -> None:
    fp = stats.forward_passes
    n = len(tokens)
    assert set(fp) == set(work_kind_names())
    assert stats.completion_tokens == n and stats.prompt_tokens == prompt_len
    assert stats.total_forward_passes == sum(fp.values())
    assert math.isclose(stats.tokens_per_forward, n / stats.total_forward_passes)
    chunks = math.ceil((prompt_len - stats.cached_prompt_tokens) / budget)
    # alone, a prompt takes ceil(uncached / budget) chunks; sharing the budget can only add some
    mode = spec["mode"]
    ahead = spec.get("lookahead", False)
    if ahead:  # the prompt's last pass carries the first block; the chunks before it leave it a token
        assert fp["prefill_lookahead"] == 1 and fp["prefill"] + 1 >= chunks
    else:
        assert fp["prefill"] == chunks if alone else fp["prefill"] >= chunks
    other = {k for k in work_kind_names() if fp[k]} - {"prefill", "prefill_lookahead"}
    stopped = reason == "stop"
    if mode == "ar":
        assert other <= {"decode"}
        assert 1 + fp["decode"] == n + stopped  # every pass after prefill samples one token
    elif mode == "diffusion":
        commit = "commit_lookahead" if ahead else "commit"
        assert other <= {"denoise", commit}
        steps = stats.denoise_steps_per_block
        blocks = len(steps)
        assert sum(steps) == fp["denoise"]
        assert fp[commit] == blocks - 1  # no commit after the block that ends the request
        b = spec["block_length"]
        assert all(s <= spec["refine_steps"] for s in steps)
        # a block may be wholly revealed by the seed, a stop, or the pass that proposed it
        assert all(s >= 1 for s in steps) or b == 1 or stopped or ahead
        assert blocks == (math.ceil(n / b) if not stopped else n // b + 1)
    else:
        assert other <= {"draft", "verify"}
        acc = stats.acceptance_lengths
        assert fp["draft"] == fp["verify"] == len(acc)
        d = spec.get("draft_length", spec.get("block_length", 8) - 1)
        assert all(1 <= a <= d + 1 for a in acc)
        # one token from the prefill, acceptance length per cycle, cut at a stop / max_tokens
        assert n <= 1 + sum(acc) and (stopped or n == spec["max_tokens"])
        if acc:
            assert n > sum(acc[:-1])
    assert stats.preemptions == 0


@pytest.mark.parametrize("budget", [4096, 7])
def test_forward_pass_accounting(budget: int) -> None:
    model = model_for(MODEL_SEED, eos=EOS)
    specs = SPECS if budget >= 8 else [s for s in SPECS if s.get("block_length", 1) <= 4 and s.get("draft_length", 1) <= 6]
    eng = make_engine(model, max_num_batched_tokens=budget, enable_prefix_caching=False)
    d = Driver(eng)
    cases = []
    for i, (spec, prompt) in enumerate(zip(specs * 2, _prompts(2 * len(specs)))):
        d.add(f"r{i}", prompt, to_params(spec))
        cases.append((f"r{i}", spec, prompt))
    d.run()
    reasons = set()
    for rid, spec, prompt in cases:
        got = d.done[rid]
        reasons.add(got.finish_reason)
        check_accounting(got.stats, spec, got.token_ids, got.finish_reason, len(prompt), budget, alone=budget > 1000)
        assert got.stats.first_token_time is not None or not got.token_ids
        assert got.stats.finished_time is not None
    assert reasons == {"stop", "length"}


@pytest.mark.parametrize("spec", SPECS[::2], ids=lambda s: s["mode"])
def test_accounting_alone_with_chunked_prefill(spec: dict) -> None:
    model = model_for(MODEL_SEED, eos=EOS)
    prompt = _prompts(1)[0] + list(range(100, 120))
    budget = 8
    out = make_engine(model, max_num_batched_tokens=budget).generate([prompt], to_params(spec))[0]
    check_accounting(out["stats"], spec, out["token_ids"], out["finish_reason"], len(prompt), budget, alone=True)
    fp, chunks = out["stats"].forward_passes, math.ceil(len(prompt) / budget)
    if spec.get("lookahead"):  # the last pass also holds the first canvas: at most one pass more
        assert chunks <= fp["prefill"] + fp["prefill_lookahead"] <= chunks + 1 and fp["prefill"] > 1
    else:
        assert fp["prefill"] == chunks > 1


def test_cached_prompt_tokens_are_not_recomputed() -> None:
    model = model_for(MODEL_SEED, eos=EOS)
    eng = make_engine(model, page_size=4, max_num_batched_tokens=8)
    prompt = _prompts(1)[0] + list(range(40, 60))
    first = eng.generate([prompt], to_params(dict(mode="ar", max_tokens=3)))[0]["stats"]
    assert first.cached_prompt_tokens == 0
    again = eng.generate([prompt], to_params(dict(mode="ar", max_tokens=3)))[0]["stats"]
    cached = again.cached_prompt_tokens
    assert cached == (len(prompt) - 1) // 4 * 4
    assert again.forward_passes["prefill"] == math.ceil((len(prompt) - cached) / 8)


def test_offline_generate_takes_more_prompts_than_the_waiting_queue_holds() -> None:
    from server.config import EngineConfig
    from server.engine.engine import LLMEngine
    from server.engine.params import DecodeParams, RequestParams, SamplingParams
    from server.model.tiny import tiny_nld_config
    from tests.fixtures.tiny_models import random_model

    eng = LLMEngine(random_model(tiny_nld_config(), seed=2), EngineConfig(model="tiny", kv_cache_tokens=2048, max_model_len=64, max_waiting=3))
    prompts = [[5, 6, 7 + i] for i in range(10)]
    outs = eng.generate(prompts, RequestParams(SamplingParams(max_tokens=2, temperature=0), DecodeParams()))
    assert len(outs) == 10 and all(len(o["token_ids"]) >= 1 or o["finish_reason"] == "stop" for o in outs)
    assert eng.kv.num_free_pages == eng.kv.num_pages
