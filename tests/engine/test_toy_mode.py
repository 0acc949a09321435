"""A fourth mode added through the registry alone (``tests/engine/toy_mode.py``) runs in the
engine like the built-in ones: same tokens as the naive AR reference, its own pass kind in
the statistics, its pass size checked against the budget, its fields refused elsewhere."""

from __future__ import annotations

from typing import Iterator

import pytest

from server.engine.modes import get_mode, mode_names, register, unregister, work_kind_names
from server.engine.params import DecodeParams, ParamError, RequestParams, SamplingParams
from tests.engine.helpers import make_engine, model_for, reference_for, run_all
from tests.engine.toy_mode import STRIDE, FixedStrideMode

MODEL_SEED = 3


@pytest.fixture
def toy_mode() -> Iterator[str]:
    register(FixedStrideMode())
    try:
        yield FixedStrideMode.name
    finally:
        unregister(FixedStrideMode.name)


def params(mode: str, max_tokens: int, **decode: object) -> RequestParams:
    return RequestParams(SamplingParams(max_tokens=max_tokens, temperature=0.0), DecodeParams(mode=mode, **decode))  # type: ignore[arg-type]


def test_registry_lists_the_toy_mode(toy_mode: str) -> None:
    assert mode_names() == ("ar", "diffusion", "self_spec", "auto", toy_mode)
    assert work_kind_names()[-1] == "restride"
    assert isinstance(get_mode(toy_mode), FixedStrideMode)


@pytest.mark.parametrize("prefix_caching,budget,kv_tokens", [(True, 4096, 4096), (False, 7, 4096), (True, 64, 96)],
                         ids=["cache", "chunked", "preempting"])
def test_toy_mode_matches_the_ar_reference(toy_mode: str, prefix_caching: bool, budget: int, kv_tokens: int) -> None:
    model = model_for(MODEL_SEED)
    eng = make_engine(model, enable_prefix_caching=prefix_caching, max_num_batched_tokens=budget,
                      kv_cache_tokens=kv_tokens, max_model_len=64)
    prompts = [[5 + i, 17, 40 + 3 * i, 9, 11 + i][: 2 + i % 4] * (1 + i % 3) for i in range(8)]
    reqs = [(f"r{i}", p, params(toy_mode, 6 + 3 * i)) for i, p in enumerate(prompts)]
    done = run_all(eng, reqs, waves=2)
    assert eng.kv.num_free_pages == eng.kv.num_pages
    for rid, prompt, p in reqs:
        ref = reference_for(model, prompt, {"mode": "ar", "max_tokens": p.sampling.max_tokens}, 64)
        assert (done[rid].token_ids, done[rid].finish_reason) == (ref.tokens, ref.finish_reason), rid
        passes = done[rid].stats.forward_passes
        assert set(passes) == set(work_kind_names())
        emitted_by_restride = len(ref.tokens) - 1 + (ref.finish_reason == "stop")  # the first comes from the prefill
        if done[rid].stats.preemptions == 0:  # (a recompute prefill samples one token itself)
            assert passes["restride"] == emitted_by_restride
        assert 0 < passes["restride"] <= emitted_by_restride
        assert passes["decode"] == 0
    if kv_tokens < 4096:
        assert eng.scheduler.num_preemptions > 0, "the small pool never preempted"


def test_toy_mode_params_are_checked_by_the_registry(toy_mode: str) -> None:
    eng = make_engine(model_for(MODEL_SEED), max_num_batched_tokens=STRIDE - 1)
    with pytest.raises(ParamError, match="per-step token budget"):
        eng.add_request("a", [5, 6], params(toy_mode, 4))
    eng = make_engine(model_for(MODEL_SEED))
    with pytest.raises(ParamError) as info:
        eng.add_request("b", [5, 6], params(toy_mode, 4, block_length=4))
    assert info.value.param == "block_length" and "only in: diffusion, self_spec" in str(info.value)
