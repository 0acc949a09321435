"""Penalties, logit_bias and min_tokens against a naive reference sampler.

The reference recomputes the dense causal logits of the whole sequence at every step
(``causal_logits``), applies each control with plain Python loops over the vocabulary, and
chooses the token the way the engine's sampler defines (argmax; or the exponential race on
the keyed uniforms of (seed, position, SALT_SAMPLE)).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from server.engine.penalties import LogitControls, apply_logit_controls
from server.engine.sampler import SALT_SAMPLE, row_keys, uniforms
from tests.engine.helpers import MASK_ID, make_engine, model_for, to_params
from tests.engine.reference import causal_logits

MODEL_SEED = 11
CONTROLS = [
    LogitControls(repetition_penalty=1.8),
    LogitControls(presence_penalty=1.5, frequency_penalty=0.7),
    LogitControls(frequency_penalty=-0.5, repetition_penalty=0.8),
    LogitControls(logit_bias=((7, 5.0), (159, -100.0), (11, 2.5))),
    LogitControls(presence_penalty=0.4, frequency_penalty=0.3, repetition_penalty=1.3, logit_bias=((5, 3.0),)),
]


def naive_controls(row: list[float], controls: LogitControls, history: list[int], num_prompt: int,
                   stop_ids: set[int], position: int) -> list[float]:
    """One row, one token at a time, straight from the definitions."""
    out = list(row)
    for token, bias in controls.logit_bias:
        out[token] += bias
    if position - num_prompt < controls.min_tokens:
        for t in stop_ids:
            out[t] = -math.inf
    seen = set(history)
    generated = history[num_prompt:]
    for t in range(len(out)):
        if t in seen and controls.repetition_penalty != 1:
            out[t] = out[t] / controls.repetition_penalty if out[t] > 0 else out[t] * controls.repetition_penalty
        count = generated.count(t)
        out[t] -= controls.frequency_penalty * count + controls.presence_penalty * (count > 0)
    return out


def naive_ar(model, prompt: list[int], controls: LogitControls, max_tokens: int, stop_ids: set[int],
             temperature: float = 0.0, seed: int = 0) -> list[int]:
    seq = list(prompt)
    while len(seq) - len(prompt) < max_tokens:
        raw = causal_logits(model, seq)[-1].float().clone()
        raw[MASK_ID] = -math.inf
        row = naive_controls(raw.tolist(), controls, seq, len(prompt), stop_ids, len(seq))
        if temperature == 0:
            token = max(range(len(row)), key=lambda t: (row[t], -t))
        else:
            probs = torch.softmax(torch.tensor(row, dtype=torch.float64) / temperature, dim=-1)
            u = uniforms(row_keys([seed], [len(seq)], [SALT_SAMPLE], torch.device("cpu")), len(row))[0]
            token = int(torch.argmax(probs / -torch.log(u)))
        if token in stop_ids:
            break
        seq.append(token)
    return seq[len(prompt):]


def test_controls_match_the_naive_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    rnd = random.Random(0)
    for controls in CONTROLS + [LogitControls(min_tokens=3, presence_penalty=1.0)]:
        sequence = [rnd.randrange(20) for _ in range(12)]
        positions = [8, 9, 10, 12]
        logits = torch.randn(len(positions), 200, generator=gen) * 3
        got = apply_logit_controls(logits, controls, sequence, 6, positions, frozenset({2, 4}), MASK_ID)
        for i, p in enumerate(positions):
            want = naive_controls(logits[i].tolist(), controls, sequence[:p], 6, {2, 4}, p)
            assert got[i].tolist() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("controls", CONTROLS, ids=range(len(CONTROLS)))
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_ar_matches_the_naive_sampler(controls: LogitControls, temperature: float) -> None:
    model = model_for(MODEL_SEED)
    engine = make_engine(model)
    stops = {2}
    for k, prompt in enumerate([[5, 6, 7, 8, 5, 6], [9, 9, 10, 11]]):
        params = to_params(dict(mode="ar", max_tokens=14), temperature=temperature, seed=100 + k, controls=controls)
        got = engine.generate([prompt], params)[0]["token_ids"]
        assert got == naive_ar(model, prompt, controls, 14, stops, temperature, seed=100 + k)


@pytest.mark.parametrize("controls", CONTROLS, ids=range(len(CONTROLS)))
def test_self_spec_greedy_equals_ar_with_controls(controls: LogitControls) -> None:
    model = model_for(MODEL_SEED)
    prompt = [5, 6, 7, 8, 5, 6]
    ar = make_engine(model).generate([prompt], to_params(dict(mode="ar", max_tokens=20), controls=controls))[0]
    spec = dict(mode="self_spec", max_tokens=20, draft_length=4, block_length=8)
    ss = make_engine(model).generate([prompt], to_params(spec, controls=controls))[0]
    assert ss["token_ids"] == ar["token_ids"]
    assert ar["token_ids"] != make_engine(model).generate([prompt], to_params(dict(mode="ar", max_tokens=20)))[0]["token_ids"]


MODES = [
    dict(mode="ar"),
    dict(mode="self_spec", block_length=8, draft_length=4),
    dict(mode="diffusion", block_length=8, refine_steps=4),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["mode"])
def test_min_tokens_and_logit_bias_in_every_mode(mode: dict) -> None:
    model = model_for(MODEL_SEED)
    prompt = [5, 6, 7, 8]
    free = make_engine(model).generate([prompt], to_params(dict(mode, max_tokens=12, ignore_eos=True)))[0]["token_ids"]
    stop = free[1]  # a token the free run emits early
    out = make_engine(model).generate(
        [prompt], to_params(dict(mode, max_tokens=12, stop_token_ids=(stop,), ignore_eos=True),
                            controls=LogitControls(min_tokens=6))
    )[0]
    assert stop not in out["token_ids"][:6] and len(out["token_ids"]) >= 6
    forced = make_engine(model).generate(
        [prompt], to_params(dict(mode, max_tokens=9, ignore_eos=True), controls=LogitControls(logit_bias=((42, 100.0),)))
    )[0]
    assert forced["token_ids"] == [42] * 9
    banned = set(free)
    out = make_engine(model).generate(
        [prompt], to_params(dict(mode, max_tokens=12, ignore_eos=True),
                            controls=LogitControls(logit_bias=tuple((t, -100.0) for t in banned)))
    )[0]
    assert not banned & set(out["token_ids"])


def test_diffusion_refuses_penalties() -> None:
    engine = make_engine(model_for(MODEL_SEED))
    params = to_params(dict(mode="diffusion", max_tokens=4), controls=LogitControls(presence_penalty=1.0))
    with pytest.raises(ValueError, match="presence_penalty"):
        engine.add_request("r", [5, 6], params)


def test_out_of_vocab_ids_are_refused() -> None:
    engine = make_engine(model_for(MODEL_SEED))
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("a", [5], to_params(dict(mode="ar", max_tokens=4), controls=LogitControls(logit_bias=((10**6, 1.0),))))
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request("b", [5], to_params(dict(mode="ar", max_tokens=4, stop_token_ids=(10**6,))))
    assert not engine.has_work
