"""Self-speculation: lossless at temperature 0 (exactly AR greedy), with or without a draft
LoRA, and distributed exactly as AR sampling at temperature > 0 (rejection sampling)."""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch

from server.engine.modes.self_spec import SelfSpeculativeMode
from server.engine.sampler import SALT_SAMPLE, race, row_keys
from server.model.model import LoraDelta
from tests.engine.helpers import make_engine, model_for, reference_for, run_all, to_params
from tests.engine.reference import block_logits, causal_logits

BLOCKS = (2, 4, 8, 32)


def _prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(2, 24))] for _ in range(n)]


def _ar_greedy(model, prompts, max_tokens, eos_ignored=True):
    eng = make_engine(model)
    p = to_params(dict(mode="ar", max_tokens=max_tokens, ignore_eos=eos_ignored))
    return [o["token_ids"] for o in eng.generate(prompts, p)]


@pytest.mark.parametrize("seed", [0, 5])
def test_greedy_self_spec_is_ar_greedy_alone_and_mixed(seed: int) -> None:
    model = model_for(seed)
    prompts = _prompts(seed, 4)
    ar = _ar_greedy(model, prompts, 40)
    accepted_more_than_one = full_blocks = 0
    for block in BLOCKS:  # alone: one request per engine
        spec = dict(mode="self_spec", block_length=block, max_tokens=40, ignore_eos=True)
        for prompt, want in zip(prompts[:2], ar[:2]):
            out = make_engine(model).generate([prompt], to_params(spec))[0]
            assert out["token_ids"] == want, (block, prompt)
    # mixed: every block length, AR and diffusion requests in one engine, sharing prompts
    eng = make_engine(model, page_size=4)
    reqs = []
    for (i, prompt), block in itertools.product(enumerate(prompts), BLOCKS):
        reqs.append((f"s{block}-{i}", prompt, to_params(dict(mode="self_spec", block_length=block, max_tokens=40, ignore_eos=True))))
        reqs.append((f"d{block}-{i}", prompt, to_params(dict(mode="diffusion", block_length=block, refine_steps=2, max_tokens=9))))
    reqs += [(f"a{i}", p, to_params(dict(mode="ar", max_tokens=40, ignore_eos=True))) for i, p in enumerate(prompts)]
    random.Random(seed).shuffle(reqs)
    done = run_all(eng, reqs, waves=3)
    for (i, _), block in itertools.product(enumerate(prompts), BLOCKS):
        got = done[f"s{block}-{i}"]
        assert got.token_ids == ar[i], (block, i)
        acc = got.stats.acceptance_lengths
        assert all(1 <= a <= block for a in acc)
        accepted_more_than_one += sum(a > 1 for a in acc)
        full_blocks += sum(a == block for a in acc if block > 2)
    for i in range(len(prompts)):
        assert done[f"a{i}"].token_ids == ar[i]
    # the acceptance paths (partial and full) are really exercised
    assert accepted_more_than_one >= 10 and full_blocks >= 1, (accepted_more_than_one, full_blocks)
    assert eng.kv.num_free_pages == eng.kv.num_pages


def _with_lora(seed: int, scale: float = 3.0):
    """The model of ``seed`` plus a random draft-only LoRA on every layer's o_proj."""
    model = model_for.__wrapped__(seed)  # a private copy: the adapter must not leak into other tests
    gen = torch.Generator().manual_seed(100 + seed)
    cfg = model.config
    for layer in model.layers:
        lora = LoraDelta(cfg.num_heads * cfg.head_dim, cfg.hidden_size, rank=4, scale=scale)
        with torch.no_grad():
            for p in lora.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        layer.self_attn.draft_lora = lora
    return model


def test_draft_lora_changes_drafts_not_output() -> None:
    seed = 0
    base, lora = model_for(seed), _with_lora(seed)
    assert lora.has_draft_lora
    prompts = _prompts(seed, 4)
    ar = _ar_greedy(base, prompts, 40)
    ar_lora = _ar_greedy(lora, prompts, 40)  # AR never uses the adapter
    assert ar_lora == ar
    spec = dict(mode="self_spec", block_length=8, max_tokens=40, ignore_eos=True)
    base_out = make_engine(base).generate(prompts, to_params(spec))
    lora_out = make_engine(lora).generate(prompts, to_params(spec))
    changed_drafts = changed_acceptance = 0
    for i, prompt in enumerate(prompts):
        assert base_out[i]["token_ids"] == ar[i]
        assert lora_out[i]["token_ids"] == ar[i]  # the verifier stays the base model
        ref_base = reference_for(base, prompt, spec, 256)
        ref_lora = reference_for(lora, prompt, spec, 256)
        # the engine applies the adapter exactly on the draft rows: its acceptance matches the
        # reference's, which runs the adapter only on the [seed, MASK...] block
        assert lora_out[i]["stats"].acceptance_lengths == ref_lora.acceptance_lengths
        assert base_out[i]["stats"].acceptance_lengths == ref_base.acceptance_lengths
        changed_drafts += ref_base.drafts != ref_lora.drafts
        changed_acceptance += ref_base.acceptance_lengths != ref_lora.acceptance_lengths
    assert changed_drafts == len(prompts) and changed_acceptance >= 1


# --------------------------------------------------------------------------- temperature > 0
VOCAB, MASK, TEMP = 16, 15, 1.0
STAT_PROMPT = [3, 7, 1, 9, 4]
N = 2000


@functools.lru_cache(maxsize=None)
def _stat_model():
    return model_for(2, vocab_size=VOCAB, mask_id=MASK, std=0.3)


def _probs(logits: torch.Tensor) -> torch.Tensor:
    l = logits.double().clone()
    l[MASK] = float("-inf")
    return torch.softmax(l / TEMP, dim=-1)


@functools.lru_cache(maxsize=None)
def _exact_joint() -> torch.Tensor:
    """P(t1, t2, t3) of AR sampling at TEMP, from the dense reference's causal logits."""
    m = _stat_model()
    joint = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.float64)
    p1 = _probs(causal_logits(m, STAT_PROMPT)[-1])
    for t1 in range(VOCAB - 1):
        p2 = _probs(causal_logits(m, STAT_PROMPT + [t1])[-1])
        for t2 in range(VOCAB - 1):
            p3 = _probs(causal_logits(m, STAT_PROMPT + [t1, t2])[-1])
            joint[t1, t2] = p1[t1] * p2[t2] * p3
    assert abs(float(joint.sum()) - 1) < 1e-9
    return joint


def _first_draft_acceptance() -> tuple[float, float]:
    """Exact probability that the first draft token is accepted: with rejection sampling
    (sum min(p, q)) and with plain equality matching of independent samples (sum p * q)."""
    m = _stat_model()
    p1 = _probs(causal_logits(m, STAT_PROMPT)[-1])
    rs = eq = 0.0
    for t1 in range(VOCAB - 1):
        p2 = _probs(causal_logits(m, STAT_PROMPT + [t1])[-1])
        q2 = _probs(block_logits(m, STAT_PROMPT, [t1, MASK, MASK], lora=True)[1])
        rs += float(p1[t1] * torch.minimum(p2, q2).sum())
        eq += float(p1[t1] * (p2 * q2).sum())
    return rs, eq


def _sample(mode: str, seeds: range, **knobs):
    n = len(seeds)
    eng = make_engine(
        _stat_model(), max_num_seqs=n, max_waiting=n, max_num_batched_tokens=16384, kv_cache_tokens=16 * n, page_size=8
    )
    spec = dict(mode=mode, max_tokens=3, ignore_eos=True, draft_length=2, **knobs)
    reqs = [(f"r{s}", STAT_PROMPT, to_params(spec, temperature=TEMP, seed=s)) for s in seeds]
    done = run_all(eng, reqs)
    outs = [done[f"r{s}"] for s in seeds]
    assert all(len(o.token_ids) == 3 for o in outs)
    return outs


def _counts(outs) -> torch.Tensor:
    c = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.float64)
    for o in outs:
        c[tuple(o.token_ids)] += 1
    return c


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson goodness of fit; cells expecting fewer than ``min_expected`` samples are pooled."""
    n = float(counts.sum())
    c, e = counts.flatten(), probs.flatten() * n
    big = e >= min_expected
    cells_c = torch.cat([c[big], c[~big].sum()[None]])
    cells_e = torch.cat([e[big], e[~big].sum()[None]])
    stat = float(((cells_c - cells_e) ** 2 / cells_e.clamp_min(1e-12)).sum())
    df = int(big.sum())  # (big cells + pooled cell) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def distribution_pvalue(outs) -> float:
    """Bonferroni-combined p-value of four goodness-of-fit tests against the exact AR law:
    the joint of (t1, t2, t3), the joint of (t1, t2), and the marginals of t2 and t3."""
    c, j = _counts(outs), _exact_joint()
    ps = [
        chi2_pvalue(c, j),
        chi2_pvalue(c.sum(2), j.sum(2)),
        chi2_pvalue(c.sum((0, 2)), j.sum((0, 2))),
        chi2_pvalue(c.sum((0, 1)), j.sum((0, 1))),
    ]
    return min(1.0, 4 * min(ps))


@functools.lru_cache(maxsize=None)
def _spec_samples():
    return _sample("self_spec", range(N, 2 * N))


def test_sampled_self_spec_matches_ar_distribution() -> None:
    joint = _exact_joint()
    ar = _sample("ar", range(N))
    spec = _spec_samples()
    p_ar, p_spec = distribution_pvalue(ar), distribution_pvalue(spec)
    assert p_ar > 1e-3 and p_spec > 1e-3, (p_ar, p_spec)
    # total variation of the per-position marginals, against the exact ones
    for outs in (ar, spec):
        c = _counts(outs) / len(outs)
        for dims in ((1, 2), (0, 2), (0, 1)):
            tv = 0.5 * float((c.sum(dims) - joint.sum(dims)).abs().sum())
            assert tv < 0.05, (dims, tv)


def _accept_all(self, req, drafts, q, p):  # a WRONG sampler: drafts are never rejected
    keys = row_keys([req.seed], [req.num_computed + 1 + len(drafts)], [SALT_SAMPLE], p.device)
    return len(drafts), int(race(p[len(drafts)][None], keys)[0])


def _no_residual(self, req, drafts, q, p):  # a subtly WRONG sampler: resample from p, not max(0, p - q)
    accepted, last = SelfSpeculativeMode._orig(self, req, drafts, q, p)
    if accepted < len(drafts):
        keys = row_keys([req.seed], [req.num_computed + 1 + accepted], [SALT_SAMPLE], p.device)
        last = int(race(p[accepted][None], keys)[0])
    return accepted, last


@pytest.mark.parametrize("wrong,n", [(_accept_all, N // 4), (_no_residual, N)], ids=["accept-all", "no-residual"])
def test_distribution_test_detects_a_wrong_sampler(monkeypatch, wrong, n: int) -> None:
    """Power: the same test rejects broken samplers (accepting every draft is caught with a
    quarter of the samples; forgetting the residual distribution needs all of them)."""
    monkeypatch.setattr(SelfSpeculativeMode, "_orig", SelfSpeculativeMode._rejection_sample, raising=False)
    monkeypatch.setattr(SelfSpeculativeMode, "_rejection_sample", wrong)
    outs = _sample("self_spec", range(N, N + n))
    assert distribution_pvalue(outs) < 1e-6


def test_rejection_sampling_acceptance() -> None:
    """The first draft token is accepted at the exact rejection-sampling rate sum(min(p, q)),
    which beats what equality matching of independent samples would get (sum(p * q))."""
    rs, eq = _first_draft_acceptance()
    assert rs > eq
    spec = _spec_samples()
    rate = sum(o.stats.acceptance_lengths[0] >= 2 for o in spec) / len(spec)
    sigma = (rs * (1 - rs) / len(spec)) ** 0.5
    assert abs(rate - rs) < 4 * sigma, (rate, rs, eq)
    mean_acc = sum(o.stats.mean_acceptance_length for o in spec) / len(spec)
    assert mean_acc > 1 + eq, (mean_acc, eq)
