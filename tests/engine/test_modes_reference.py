"""Issue 2/3 acceptance: at temperature 0 the engine's tokens equal the naive dense reference's
(tests/engine/reference.py) for every mode and knob, in batches that mix the three modes, with
prefix caching on and off, and with a per-step token budget small enough to chunk prefills.

The dense reference and the paged engine compute the same math in a different order, so a
floating-point near-tie could in principle flip a greedy decision. The reference records the
smallest margin of every decision it took; a mismatch is tolerated only when that margin is
below ``NEAR_TIE`` (and must stay rare). With these seeds none occurs.
"""

from __future__ import annotations

import functools
import random

import pytest

from tests.engine.helpers import Driver, make_engine, model_for, reference_for, to_params

MAX_MODEL_LEN = 64
NEAR_TIE = 1e-5
# model seed -> EOS id chosen so that it shows up in some (not all) greedy outputs of these
# prompts, which exercises stop-token freezing inside diffusion blocks.
EOS = {0: 144, 1: 248, 2: 51}


def prompts_for(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(3, 20))] for _ in range(3)]
    prompts.append([rng.randrange(3, 300) for _ in range(29)])  # long: chunked under a small budget
    return prompts


def specs_for(seed: int) -> list[dict]:
    """Every diffusion knob combination (block 4/8/32, refine 1/4/B, three policies, seeded and
    unseeded canvas; lookahead at blocks 4/8; margin confidence), plus AR and self_spec with several draft lengths. max_tokens is rarely a
    multiple of the block; with MAX_MODEL_LEN = 64 some blocks are cut by the context limit."""
    rng = random.Random(1000 + seed)
    specs: list[dict] = []
    for block in (4, 8, 32):
        for steps in sorted({1, 4, block}):
            for policy in ("threshold", "low_confidence", "leftmost"):
                for seeded in (True, False):
                    spec = dict(
                        mode="diffusion",
                        block_length=block,
                        refine_steps=steps,
                        policy=policy,
                        seed_first_position=seeded,
                        threshold=rng.choice([0.9, 0.9, 0.5]),
                        max_tokens=rng.choice([5, 13, 27, 40, 60]),
                    )
                    specs.append(spec)
    # lookahead: the commit pass proposes the next block; thresholds around these random
    # models' typical confidence (0.1-0.3) reveal some proposals and not others
    for block in (4, 8):
        for policy in ("threshold", "low_confidence"):
            for seeded in (True, False):
                specs.append(dict(
                    mode="diffusion", block_length=block, refine_steps=rng.choice([2, block]), policy=policy,
                    seed_first_position=seeded, lookahead=True, threshold=rng.choice([0.15, 0.2, 0.25]),
                    max_tokens=rng.choice([5, 13, 27, 40, 60]),
                ))
    # guess_seed: the commit pass's canvas starts with the previous pass's guess of the seed
    for block, policy in ((4, "threshold"), (8, "low_confidence"), (4, "leftmost")):
        specs.append(dict(
            mode="diffusion", block_length=block, refine_steps=rng.choice([2, block]), policy=policy, lookahead=True,
            guess_seed=True, threshold=rng.choice([0.15, 0.2, 0.25]), max_tokens=rng.choice([13, 27, 40, 60]),
        ))
    # margin confidence (top-1 minus top-2 probability: a few hundredths on these models),
    # with and without lookahead, ranked by both policies that read it
    for block, lookahead, policy in ((4, True, "threshold"), (8, False, "threshold"), (8, True, "low_confidence")):
        specs.append(dict(
            mode="diffusion", block_length=block, refine_steps=block, policy=policy, lookahead=lookahead,
            confidence="margin", threshold=rng.choice([0.02, 0.04, 0.08]), max_tokens=rng.choice([13, 27, 40]),
        ))
    specs += [
        dict(mode="ar", max_tokens=30),
        dict(mode="ar", max_tokens=60),
        dict(mode="self_spec", block_length=4, max_tokens=30),
        dict(mode="self_spec", block_length=8, max_tokens=60),
        dict(mode="self_spec", block_length=32, max_tokens=45),
        dict(mode="self_spec", draft_length=2, max_tokens=17),
        dict(mode="self_spec", variant="quadratic", block_length=4, max_tokens=40),
        dict(mode="self_spec", variant="quadratic", draft_length=2, max_tokens=23),
    ]
    for i, spec in enumerate(specs):
        if i % 5 == 3:
            spec["ignore_eos"] = True
        if i % 7 == 2:
            spec["stop_token_ids"] = (EOS[seed] + 1,)
    return specs


@functools.lru_cache(maxsize=None)
def scenario(seed: int) -> tuple:
    """Requests (id, prompt, spec, wave) and the reference results; computed once per model.

    Wave 0 runs first; wave 1 joins a few steps later (sharing prompt pages with running
    requests); wave 2 joins after everything finished, with prompts that extend a wave-0 prompt
    by its generated tokens (so the prefix cache serves pages written by decode, commit and
    verify passes)."""
    model = model_for(seed, eos=EOS[seed])
    prompts = prompts_for(seed)
    specs = specs_for(seed)
    reqs = []
    for i, spec in enumerate(specs):
        reqs.append((f"r{i}", prompts[i % len(prompts)], spec, i % 2))
    refs = {rid: reference_for(model, p, s, MAX_MODEL_LEN) for rid, p, s, _ in reqs}
    rng = random.Random(2000 + seed)
    extra = []
    for rid, p, s, _ in reqs:
        out = refs[rid].tokens
        if len(p) + len(out) >= 24 and rng.random() < 0.35 and len(extra) < 12:
            cut = rng.randint(len(out) // 2, len(out))
            prompt = (p + out[:cut] + [rng.randrange(3, 300)])[: MAX_MODEL_LEN - 10]
            spec = dict(specs[len(extra) * 5 % len(specs)])
            extra.append((f"x{len(extra)}", prompt, spec, 2))
    for rid, p, s, _ in extra:
        refs[rid] = reference_for(model, p, s, MAX_MODEL_LEN)
    return reqs + extra, refs


def run_scenario(seed: int, prefix_caching: bool, budget: int):
    model = model_for(seed, eos=EOS[seed])
    reqs, refs = scenario(seed)
    eng = make_engine(
        model,
        max_model_len=MAX_MODEL_LEN,
        kv_cache_tokens=8192,
        page_size=4,
        enable_prefix_caching=prefix_caching,
        max_num_batched_tokens=budget,
    )
    d = Driver(eng)
    for wave in (0, 1, 2):
        for rid, prompt, spec, w in reqs:
            if w == wave:
                d.add(rid, prompt, to_params(spec))
        if wave == 0:
            for _ in range(3):
                d.step()
        elif wave == 1:
            d.run()
    d.run()
    return reqs, refs, d.done, eng


def check_against_reference(reqs, refs, done) -> None:
    near_ties = 0
    for rid, prompt, spec, _ in reqs:
        ref, got = refs[rid], done[rid]
        if got.token_ids == ref.tokens and got.finish_reason == ref.finish_reason:
            if spec["mode"] == "diffusion":
                assert got.stats.denoise_steps_per_block == ref.denoise_steps_per_block, (rid, spec)
            if spec.get("guess_seed") and ref.min_margin > NEAR_TIE:
                # a right guess's commit pass stood for the block's first denoise pass
                fp = got.stats.forward_passes
                assert fp["commit_lookahead"] == ref.fused_passes and fp["prefill_lookahead"] == 0, (rid, spec)
                assert fp["denoise"] == sum(ref.denoise_steps_per_block) - ref.right_guesses, (rid, spec)
            if spec["mode"] == "self_spec" and ref.draft_margin > NEAR_TIE:
                assert got.stats.acceptance_lengths == ref.acceptance_lengths, (rid, spec)
            continue
        assert ref.min_margin < NEAR_TIE, (
            f"{rid} {spec} prompt={prompt}: engine {got.token_ids} ({got.finish_reason}) != "
            f"reference {ref.tokens} ({ref.finish_reason}); smallest decision margin {ref.min_margin:.3g}"
        )
        near_ties += 1
    assert near_ties <= len(reqs) // 20, f"{near_ties} near-tie mismatches out of {len(reqs)}"


@pytest.mark.parametrize("seed", sorted(EOS))
@pytest.mark.parametrize(
    "prefix_caching,budget", [(True, 4096), (False, 4096), (True, 32)], ids=["cache", "nocache", "cache-chunked"]
)
def test_engine_matches_reference(seed: int, prefix_caching: bool, budget: int) -> None:
    reqs, refs, done, eng = run_scenario(seed, prefix_caching, budget)
    check_against_reference(reqs, refs, done)
    assert eng.kv.num_free_pages == eng.kv.num_pages
    stats = {rid: done[rid].stats for rid, *_ in reqs}
    if prefix_caching:
        assert sum(s.cached_prompt_tokens for s in stats.values()) > 0
        # some wave-2 prompt was served cached pages holding generated tokens
        wave0_len = {rid: len(p) for rid, p, *_ in reqs}
        assert any(
            stats[rid].cached_prompt_tokens > min(wave0_len.values()) for rid, _, _, w in reqs if w == 2
        )
    if budget < 64:
        assert any(s.forward_passes["prefill"] > 1 for s in stats.values()), "no prefill was chunked"
    ahead = [stats[rid] for rid, _, spec, _ in reqs if spec.get("lookahead") and not spec.get("guess_seed")]
    assert all(s.forward_passes["prefill_lookahead"] == 1 for s in ahead)
    assert all(s.forward_passes["commit"] == 0 for s in ahead)
    # some block was wholly revealed by the pass that committed the one before it
    assert any(0 in s.denoise_steps_per_block[1:] for s in ahead)
    guessed = [refs[rid] for rid, _, spec, _ in reqs if spec.get("guess_seed")]
    assert sum(r.right_guesses for r in guessed) > 0 and sum(r.fused_passes - r.right_guesses for r in guessed) > 0


def test_scenarios_exercise_the_edge_cases() -> None:
    """The fixed scenarios do reach stops inside blocks, blocks cut by the context limit and
    max_tokens cuts (so the equality above covers them)."""
    reasons = {"stop": 0, "length": 0}
    ctx_cut = stop_in_diffusion = max_tokens_cut = 0
    for seed in EOS:
        reqs, refs = scenario(seed)
        for rid, prompt, spec, _ in reqs:
            ref = refs[rid]
            reasons[ref.finish_reason] += 1
            if spec["mode"] == "diffusion":
                stop_in_diffusion += ref.finish_reason == "stop" and len(ref.tokens) % spec["block_length"] != 0
                if len(prompt) + len(ref.tokens) == MAX_MODEL_LEN and (MAX_MODEL_LEN - len(prompt)) % spec["block_length"]:
                    ctx_cut += 1
                if len(ref.tokens) == spec["max_tokens"] and spec["max_tokens"] % spec["block_length"]:
                    max_tokens_cut += 1
    assert reasons["stop"] >= 10 and reasons["length"] >= 10, reasons
    assert stop_in_diffusion >= 5 and ctx_cut >= 2 and max_tokens_cut >= 5, (stop_in_diffusion, ctx_cut, max_tokens_cut)
