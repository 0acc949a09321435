"""Sampling parameters: per-request seeds, top-k / top-p support, stop tokens, max_tokens and
the context limit, and validation of every user-settable knob."""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.params import DecodeParams, ParamError, RequestParams, SamplingParams
from tests.engine.helpers import make_engine, model_for, reference_for, run_all, to_params
from tests.engine.reference import block_logits, causal_logits

MODEL_SEED = 4
MODES = [
    dict(mode="ar"),
    dict(mode="diffusion", block_length=4, refine_steps=2, policy="low_confidence"),
    dict(mode="diffusion", block_length=8, refine_steps=8, policy="threshold", seed_first_position=False),
    dict(mode="self_spec", block_length=4),
    dict(mode="diffusion", block_length=4, lookahead=True, confidence="margin", threshold=0.05),
]
MODE_IDS = ["ar", "diffusion-4", "diffusion-8-unseeded", "self_spec", "diffusion-margin-lookahead"]


def _prompts(seed: int, n: int, lo: int = 2, hi: int = 20) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_seeded_request_is_reproducible_whatever_shares_the_batch(mode: dict) -> None:
    model = model_for(MODEL_SEED)
    prompt = _prompts(1, 1)[0]
    spec = dict(mode, max_tokens=24, ignore_eos=True)
    mine = to_params(spec, temperature=0.8, seed=1234, top_k=50)
    alone = make_engine(model).generate([prompt], mine)[0]["token_ids"]
    assert len(alone) == 24
    # again, in a crowd of other requests (all modes, temperatures, unseeded), in another order,
    # with a small budget and page size so the batch composition differs at every step
    rng = random.Random(5)
    others = []
    for i, p in enumerate(_prompts(2, 10)):
        m = dict(rng.choice(MODES), max_tokens=rng.randint(3, 30))
        others.append((f"o{i}", p, to_params(m, temperature=rng.choice([0.0, 0.7, 1.3]), seed=rng.choice([None, 1234, i]))))
    reqs = others[:4] + [("mine", prompt, mine)] + others[4:]
    eng = make_engine(model, max_num_batched_tokens=24, page_size=4)
    crowd = run_all(eng, reqs, waves=2)["mine"].token_ids
    assert crowd == alone
    other_seed = make_engine(model).generate([prompt], to_params(spec, temperature=0.8, seed=4321, top_k=50))[0]
    assert other_seed["token_ids"] != alone


def _nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches top_p."""
    order = torch.argsort(probs, descending=True).tolist()
    keep, mass = set(), 0.0
    for t in order:
        if mass >= top_p - 1e-6:
            break
        keep.add(t)
        mass += float(probs[t])
    return keep


def _support(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set[int]:
    l = logits.double().clone()
    l[model_for(MODEL_SEED).config.mask_token_id] = float("-inf")
    allowed = set(torch.argsort(l, descending=True)[: top_k if top_k else len(l)].tolist())
    if top_p < 1:
        probs = torch.softmax(l / temperature, dim=-1)
        allowed &= _nucleus(probs, top_p)
    return allowed


@pytest.mark.parametrize("mode", ["ar", "self_spec", "diffusion"])
@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (5, 0.8)])
def test_top_k_top_p_restrict_the_support(mode: str, top_k: int, top_p: float) -> None:
    """Every sampled token lies in the filtered support of the distribution it was drawn from
    (AR and self_spec: the causal distribution given the emitted prefix; diffusion with one
    refine step and an unseeded canvas: the denoise distribution of the first block); and
    without filtering some token would fall outside it (the check has teeth)."""
    model = model_for(MODEL_SEED)
    prompt = _prompts(3, 1)[0]
    temperature, n_tok, n_req = 1.5, 6, 24
    if mode == "diffusion":
        spec = dict(mode="diffusion", block_length=n_tok, refine_steps=1, seed_first_position=False, max_tokens=n_tok, ignore_eos=True)
    else:
        spec = dict(mode=mode, block_length=4, max_tokens=n_tok, ignore_eos=True)

    def sample(k: int, p: float) -> list[list[int]]:
        eng = make_engine(model)
        params = [to_params(spec, temperature=temperature, seed=s, top_k=k, top_p=p) for s in range(n_req)]
        return [o["token_ids"] for o in eng.generate([prompt] * n_req, params)]

    def outside(outs: list[list[int]], k: int, p: float) -> int:
        bad = 0
        block = block_logits(model, prompt, [model.config.mask_token_id] * n_tok) if mode == "diffusion" else None
        for toks in outs:
            for i, t in enumerate(toks):
                logits = block[i] if block is not None else causal_logits(model, prompt + toks[:i])[-1]
                bad += t not in _support(logits, temperature, k, p)
        return bad

    filtered = sample(top_k, top_p)
    assert all(len(t) == n_tok for t in filtered)
    assert outside(filtered, top_k, top_p) == 0
    assert outside(sample(0, 1.0), top_k, top_p) > 0


def _greedy(model, prompt, spec) -> dict:
    return make_engine(model).generate([prompt], to_params(spec))[0]


STOP_MODES = [  # modes where stopping early leaves the tokens before the stop unchanged
    dict(mode="ar"),
    dict(mode="self_spec", block_length=8),
    dict(mode="diffusion", block_length=8, refine_steps=8, policy="leftmost"),  # reveals left to right
]


@pytest.mark.parametrize("mode", STOP_MODES, ids=["ar", "self_spec", "diffusion-leftmost"])
def test_stop_token_ids_end_the_request(mode: dict) -> None:
    model = model_for(MODEL_SEED)
    for prompt in _prompts(6, 3):
        full = _greedy(model, prompt, dict(mode, max_tokens=30, ignore_eos=True))["token_ids"]
        for idx in (0, 3, 11):
            stop = full[idx]
            out = _greedy(model, prompt, dict(mode, max_tokens=30, ignore_eos=True, stop_token_ids=(stop,)))
            first = full.index(stop)
            assert out["token_ids"] == full[:first], (mode, idx)
            assert out["finish_reason"] == "stop"
            if idx == 0 and mode["mode"] == "diffusion":  # the seed itself stops: no denoise pass
                assert out["stats"].forward_passes["denoise"] == 0


def test_eos_is_a_stop_unless_ignored() -> None:
    base = model_for(MODEL_SEED)
    prompt = _prompts(6, 1)[0]
    full = _greedy(base, prompt, dict(mode="ar", max_tokens=30, ignore_eos=True))["token_ids"]
    eos = full[5]
    model = model_for(MODEL_SEED, eos=eos)
    out = _greedy(model, prompt, dict(mode="ar", max_tokens=30))
    assert out["token_ids"] == full[: full.index(eos)] and out["finish_reason"] == "stop"
    out = _greedy(model, prompt, dict(mode="ar", max_tokens=30, ignore_eos=True))
    assert out["token_ids"] == full and out["finish_reason"] == "length"


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_max_tokens_and_context_limit(mode: dict) -> None:
    """Exactly max_tokens tokens (finish 'length'). AR and self_spec outputs are prefixes of a
    longer run; diffusion never reveals past the length budget (the schedule of the last block
    changes), so it is checked against the reference decoder instead."""
    model = model_for(MODEL_SEED)
    prompt = _prompts(8, 1)[0]
    longest = _greedy(model, prompt, dict(mode, max_tokens=29, ignore_eos=True))
    assert len(longest["token_ids"]) == 29 and longest["finish_reason"] == "length"
    for n in (1, 2, 3, 7, 13):
        spec = dict(mode, max_tokens=n, ignore_eos=True)
        out = _greedy(model, prompt, spec)
        assert len(out["token_ids"]) == n and out["finish_reason"] == "length"
        if mode["mode"] == "diffusion":
            assert out["token_ids"] == reference_for(model, prompt, spec, 256).tokens
        else:
            assert out["token_ids"] == longest["token_ids"][:n]
    # the context limit: prompt + output == max_model_len
    max_len = len(prompt) + 11
    eng = make_engine(model, max_model_len=max_len)
    spec = dict(mode, max_tokens=100, ignore_eos=True)
    out = eng.generate([prompt], to_params(spec))[0]
    assert len(out["token_ids"]) == 11 and out["finish_reason"] == "length"
    if mode["mode"] == "diffusion":
        assert out["token_ids"] == reference_for(model, prompt, spec, max_len).tokens
    else:
        assert out["token_ids"] == longest["token_ids"][:11]


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(temperature=2.5),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(max_tokens=0),
        dict(max_tokens=2.5),
        dict(logprobs=21),
        dict(logprobs=-1),
        dict(seed=-1),
        dict(seed=2**63),
    ],
)
def test_invalid_sampling_params(kwargs: dict) -> None:
    with pytest.raises(ParamError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == next(iter(kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="diffusion", policy="random"),
        dict(mode="diffusion", refine_steps=0),
        dict(mode="diffusion", refine_steps=-3),
        dict(mode="diffusion", block_length=0),
        dict(mode="diffusion", threshold=0.0),
        dict(mode="diffusion", threshold=1.01),
        dict(mode="diffusion", seed_first_position=1),
        dict(mode="diffusion", confidence="entropy"),
        dict(mode="self_spec", draft_length=0),
    ],
)
def test_invalid_decode_params(kwargs: dict) -> None:
    with pytest.raises(ParamError) as info:
        DecodeParams(**kwargs)
    assert info.value.param == list(kwargs)[1]


def test_unknown_mode_is_refused_when_resolved() -> None:
    eng = make_engine(model_for(MODEL_SEED))
    with pytest.raises(ParamError) as info:
        eng.resolve_params(RequestParams(decode=DecodeParams(mode="beam")))
    assert info.value.param == "mode" and "ar, diffusion, self_spec" in str(info.value)


def test_valid_boundaries_are_accepted() -> None:
    SamplingParams(temperature=0.0)
    SamplingParams(temperature=2.0, top_p=1.0, top_k=0, logprobs=20, seed=0)
    DecodeParams(mode="diffusion", threshold=1.0, refine_steps=1, block_length=1)


def test_engine_rejects_what_cannot_run() -> None:
    model = model_for(MODEL_SEED)
    eng = make_engine(model, max_model_len=32, max_num_batched_tokens=16)
    ok = to_params(dict(mode="diffusion", block_length=8, max_tokens=4))
    bad = [
        (to_params(dict(mode="diffusion", block_length=33, max_tokens=4)), "block_length"),  # larger than the context
        (to_params(dict(mode="diffusion", block_length=17, max_tokens=4)), "block_length"),  # over a step's budget
        (to_params(dict(mode="self_spec", draft_length=32, max_tokens=4)), "draft_length"),  # draft + seed > context
        (to_params(dict(mode="self_spec", draft_length=16, max_tokens=4)), "draft_length"),  # over the budget
        (RequestParams(decode=DecodeParams(mode="ar", block_length=4)), "block_length"),  # not an ar field
        (RequestParams(decode=DecodeParams(mode="self_spec", threshold=0.5)), "threshold"),
        (RequestParams(SamplingParams(logprobs=1), DecodeParams(mode="diffusion")), "logprobs"),
    ]
    for i, (params, field) in enumerate(bad):
        with pytest.raises(ParamError) as info:
            eng.add_request(f"bad{i}", [5, 6], params)
        assert info.value.param == field, (i, str(info.value))
    for prompt in ([], [5, model.config.vocab_size], [-1], list(range(3, 35))):
        with pytest.raises(ValueError):
            eng.add_request("p", prompt, ok)
    eng.add_request("dup", [5, 6], ok)
    with pytest.raises(ValueError):
        eng.add_request("dup", [5, 6], ok)
    assert not eng.requests.keys() - {"dup"}
    eng.abort("dup")
    assert eng.kv.num_free_pages == eng.kv.num_pages
    # defaults resolve from the checkpoint: block = config block_size, refine steps = block
    resolved = eng.resolve_params(RequestParams(SamplingParams(), DecodeParams(mode="diffusion")))
    assert resolved.decode.block_length == model.config.block_size
    assert resolved.decode.refine_steps == model.config.block_size
    assert eng.resolve_params(RequestParams(decode=DecodeParams(mode="self_spec"))).decode.draft_length == model.config.block_size - 1


def test_margin_is_the_lead_over_the_best_other_non_mask_id() -> None:
    from server.engine.sampler import RowSpec, select_tokens

    mask = 5
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=gen) * 3
    logits[0, mask] = 50.0  # the mask id dominates the softmax but is neither chosen nor the runner-up
    logits[1, 7] = logits[1, 9] = 20.0  # an exact tie on top: margin 0
    specs = [RowSpec(0.0, 0, 1.0, 1, i, 0, margin=True) for i in range(4)]
    specs += [RowSpec(1.5, 0, 1.0, 3, 10 + i, 0, margin=True) for i in range(2)]  # sampled rows
    results = select_tokens(logits, specs, mask)
    probs = torch.softmax(logits.double(), dim=-1)  # mask id in the denominator, as confidence
    for row, r in enumerate(results):
        others = [t for t in range(40) if t not in (r.token, mask)]
        expected = float(probs[row, r.token] - probs[row, others].max())
        assert r.margin == pytest.approx(expected, abs=1e-6)
        assert r.margin <= r.confidence
    assert results[0].token != mask and results[0].margin < 1e-3  # tiny shares once the mask takes the mass
    assert results[1].margin == pytest.approx(0.0, abs=1e-9)
    # not asked for: not computed
    assert all(r.margin is None for r in select_tokens(logits, [RowSpec(0.0, 0, 1.0, 1, 0, 0)] * 6, mask))
