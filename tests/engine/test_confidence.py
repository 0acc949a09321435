"""Diffusion ``confidence``: what ``threshold`` compares, a proposal's probability (the
default, HF's) or its margin over the runner-up. On the embedded model the engine's margin
decoding equals the dense reference's (tests/engine/reference.py), with and without lookahead;
the measure changes what gets revealed; a constrained request still honours its grammar.
The random tiny models of test_modes_reference cover margin with other knobs and batches."""

from __future__ import annotations

import re

import pytest
import torch

from server.config import DEFAULT_MODEL_DIR
from server.engine.engine import LLMEngine
from server.engine.grammar import GrammarSpec
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from server.model.loader import load_model
from tests.engine.helpers import embedded_fp32_engine, heldout_plain_prompts
from tests.engine.reference import diffusion_greedy

NEAR_TIE = 1e-5


@pytest.fixture(scope="module")
def embedded() -> tuple[LLMEngine, list[list[int]]]:
    eng = embedded_fp32_engine()
    return eng, heldout_plain_prompts(eng, 9, 12)


def _decode(eng: LLMEngine, prompts: list[list[int]], confidence: str, lookahead: bool, threshold: float = 0.5,
            **sampling: object) -> list[dict]:
    sampling = {"temperature": 0.0, **sampling}
    params = RequestParams(SamplingParams(max_tokens=32, ignore_eos=True, **sampling),  # type: ignore[arg-type]
                           DecodeParams(mode="diffusion", block_length=4, threshold=threshold, lookahead=lookahead,
                                        confidence=confidence, guess_seed=False))
    return eng.generate(prompts, params)


@pytest.mark.parametrize("lookahead", [False, True])
def test_margin_decoding_equals_the_reference(embedded, lookahead: bool) -> None:  # type: ignore[no-untyped-def]
    eng, prompts = embedded
    dense = load_model(str(DEFAULT_MODEL_DIR), dtype=torch.float32)
    compared = 0
    for prompt, got in zip(prompts, _decode(eng, prompts, "margin", lookahead)):
        ref = diffusion_greedy(dense, prompt, block_length=4, refine_steps=4, policy="threshold", threshold=0.5,
                               lookahead=lookahead, confidence="margin", max_tokens=32, max_model_len=512,
                               mask_id=eng.model_config.mask_token_id)
        if ref.min_margin > NEAR_TIE:
            compared += 1
            assert got["token_ids"] == ref.tokens
            assert got["stats"].denoise_steps_per_block == ref.denoise_steps_per_block
    assert compared >= 2
    eng.check_integrity()


def test_the_measure_changes_the_reveals(embedded) -> None:  # type: ignore[no-untyped-def]
    """A margin is never above its probability, so at one threshold margin reveals no more in
    a pass; over these prompts the decodings differ and margin takes more passes."""
    eng, prompts = embedded
    by_probability, by_margin = _decode(eng, prompts, "probability", True), _decode(eng, prompts, "margin", True)
    assert [o["token_ids"] for o in by_probability] != [o["token_ids"] for o in by_margin]
    passes = lambda outs: sum(o["stats"].total_forward_passes for o in outs)  # noqa: E731
    assert passes(by_margin) > passes(by_probability)


def test_margin_under_a_grammar_keeps_the_output_valid(embedded) -> None:  # type: ignore[no-untyped-def]
    eng, prompts = embedded
    pattern = r"(yes|no), [0-9]{2,4}!"
    out = _decode(eng, prompts[:1], "margin", False, grammar=GrammarSpec("regex", pattern))[0]
    assert re.fullmatch(pattern, eng.tokenizer.decode(out["token_ids"], skip_special_tokens=True))


def test_sampled_margin_decoding_is_reproducible(embedded) -> None:  # type: ignore[no-untyped-def]
    eng, prompts = embedded
    first = _decode(eng, prompts[:2], "margin", True, temperature=0.8, seed=7)
    assert [o["token_ids"] for o in first] == [o["token_ids"] for o in _decode(eng, prompts[:2], "margin", True,
                                                                                temperature=0.8, seed=7)]
    assert all(len(o["token_ids"]) == 32 for o in first)
