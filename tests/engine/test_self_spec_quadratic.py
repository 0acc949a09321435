"""Quadratic (one-pass) self-speculation: exactly AR greedy at temperature 0 (alone, in mixed
batches, with and without the prefix cache, under forced preemption), equal to the naive dense
reference of the quadratic cycle (tokens, acceptance lengths), and distributed as AR sampling
at temperature > 0 (the same test as linear mode)."""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch

from tests.engine.helpers import Driver, make_engine, model_for, reference_for, run_all, to_params
from tests.engine.test_modes_reference import NEAR_TIE
from tests.engine.test_self_spec import N, _counts, _exact_joint, _sample, _with_lora, distribution_pvalue

QUAD = dict(mode="self_spec", variant="quadratic", ignore_eos=True)


def _prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(2, 20))] for _ in range(n)]


@functools.lru_cache(maxsize=None)
def _ar(seed: int, n: int, max_tokens: int) -> list[list[int]]:
    eng = make_engine(_with_lora(seed))
    p = to_params(dict(mode="ar", max_tokens=max_tokens, ignore_eos=True))
    return [o["token_ids"] for o in eng.generate(_prompts(seed, n), p)]


@pytest.mark.parametrize("block", [2, 4, 8, 16])
def test_greedy_quadratic_is_ar_greedy_alone(block: int) -> None:
    model = _with_lora(0)  # a draft LoRA: masks run with it, heads without
    prompts, ar = _prompts(0, 2), _ar(0, 2, 24)
    spec = dict(QUAD, block_length=block, max_tokens=24)
    for prompt, want in zip(prompts, ar):
        out = make_engine(model).generate([prompt], to_params(spec))[0]
        assert out["token_ids"] == want, (block, prompt)
        st = out["stats"]
        assert st.forward_passes["spec_cycle"] == len(st.acceptance_lengths)
        assert st.forward_passes["draft"] == st.forward_passes["verify"] == 0
        assert all(1 <= a <= block for a in st.acceptance_lengths)
        assert sum(st.acceptance_lengths) >= len(want) - 1  # all but the prefill's token came from cycles


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["cache", "nocache"])
def test_greedy_quadratic_in_mixed_batches(prefix_caching: bool) -> None:
    """Quadratic requests of every block next to linear, AR and diffusion ones, arriving in
    waves (later ones hit cached prompt pages when caching is on)."""
    seed = 3
    model = _with_lora(seed)
    prompts, ar = _prompts(seed, 3), _ar(seed, 3, 30)
    eng = make_engine(model, page_size=4, enable_prefix_caching=prefix_caching)
    reqs = []
    for (i, prompt), block in itertools.product(enumerate(prompts), (2, 4, 8)):
        reqs.append((f"q{block}-{i}", prompt, to_params(dict(QUAD, block_length=block, max_tokens=30))))
    for i, prompt in enumerate(prompts):
        reqs.append((f"l{i}", prompt, to_params(dict(mode="self_spec", block_length=4, max_tokens=30, ignore_eos=True))))
        reqs.append((f"a{i}", prompt, to_params(dict(mode="ar", max_tokens=30, ignore_eos=True))))
        reqs.append((f"d{i}", prompt, to_params(dict(mode="diffusion", block_length=4, refine_steps=2, max_tokens=9))))
    random.Random(seed).shuffle(reqs)
    done = run_all(eng, reqs, waves=3)
    for rid, got in done.items():
        if rid[0] in "qla":
            assert got.token_ids == ar[int(rid.split("-")[-1]) if "-" in rid else int(rid[1:])], rid
        if rid[0] == "q":
            block = int(rid[1:].split("-")[0])
            assert all(1 <= a <= block for a in got.stats.acceptance_lengths)
    if prefix_caching:
        assert sum(g.stats.cached_prompt_tokens for g in done.values()) > 0
    assert eng.kv.num_free_pages == eng.kv.num_pages


def test_greedy_quadratic_under_forced_preemption() -> None:
    """Four long requests on a pool that holds one and a bit: they preempt each other (their
    drafts are dropped and the prefix recomputed) and still end with the AR tokens."""
    seed = 3
    model = _with_lora(seed)
    prompts, ar = _prompts(seed, 3), _ar(seed, 3, 30)
    eng = make_engine(model, max_model_len=64, kv_cache_tokens=72, page_size=4)
    d = Driver(eng)
    for i, prompt in enumerate(prompts):
        d.add(f"q{i}", prompt, to_params(dict(QUAD, block_length=4, max_tokens=30)))
    d.add("l0", prompts[0], to_params(dict(mode="self_spec", block_length=4, max_tokens=30, ignore_eos=True)))
    d.run()
    assert eng.scheduler.num_preemptions > 0
    for i in range(len(prompts)):
        assert d.done[f"q{i}"].token_ids == ar[i]
    assert d.done["l0"].token_ids == ar[0]
    assert sum(d.done[f"q{i}"].stats.preemptions for i in range(3)) > 0
    assert eng.kv.num_free_pages == eng.kv.num_pages


@pytest.mark.parametrize("block", [4, 8])
def test_quadratic_equals_naive_dense_cycle(block: int) -> None:
    """Tokens and acceptance lengths equal the dense reference's (which rebuilds every cycle
    from scratch with an explicit mask), so the drafts follow the documented layout."""
    seed = 3
    model = _with_lora(seed)
    spec = dict(QUAD, block_length=block, max_tokens=30)
    checked = 0
    for prompt in _prompts(seed, 3):
        ref = reference_for(model, prompt, spec, 256)
        got = make_engine(model).generate([prompt], to_params(spec))[0]
        assert got["token_ids"] == ref.tokens or ref.min_margin < NEAR_TIE
        if ref.draft_margin > NEAR_TIE:
            assert got["stats"].acceptance_lengths == ref.acceptance_lengths
            checked += 1
    assert checked >= 2


@functools.lru_cache(maxsize=None)
def _quad_samples():
    return _sample("self_spec", range(N, 2 * N), variant="quadratic")


def test_sampled_quadratic_matches_ar_distribution() -> None:
    joint = _exact_joint()
    spec = _quad_samples()
    assert distribution_pvalue(spec) > 1e-3
    c = _counts(spec) / len(spec)
    for dims in ((1, 2), (0, 2), (0, 1)):
        tv = 0.5 * float((c.sum(dims) - joint.sum(dims)).abs().sum())
        assert tv < 0.05, (dims, tv)
    # drafts are really accepted (by rejection sampling), not only bonus tokens emitted
    assert sum(a >= 2 for o in spec for a in o.stats.acceptance_lengths) > len(spec) // 20


@functools.lru_cache(maxsize=None)
def _default_model():
    from server.config import DEFAULT_MODEL_DIR
    from server.model.loader import load_model, load_tokenizer

    return load_model(str(DEFAULT_MODEL_DIR), dtype=torch.float32), load_tokenizer(str(DEFAULT_MODEL_DIR))


@pytest.mark.parametrize("block", [4, 8])
def test_trained_model_accepts_drafts_and_matches_dense_cycle(block: int) -> None:
    """On the embedded (trained) model drafts are accepted, so the acceptance path and the
    choice of the accepted sub-block's drafts are exercised: tokens and acceptance lengths
    equal the dense reference's, and the tokens equal AR greedy."""
    model, tok = _default_model()
    spec = dict(QUAD, block_length=block, max_tokens=24)
    accepted = 0
    for text in ("To be, or not to be, that is", "It is a truth universally acknowledged"):
        prompt = tok.encode(text)
        ref = reference_for(model, prompt, spec, 256)
        ar = reference_for(model, prompt, dict(mode="ar", max_tokens=24, ignore_eos=True), 256)
        got = make_engine(model).generate([prompt], to_params(spec))[0]
        assert got["token_ids"] == ar.tokens == ref.tokens or min(ref.min_margin, ar.min_margin) < NEAR_TIE
        if ref.draft_margin > NEAR_TIE:
            assert got["stats"].acceptance_lengths == ref.acceptance_lengths
        accepted += sum(a > 1 for a in got["stats"].acceptance_lengths)
    assert accepted >= 3, accepted
