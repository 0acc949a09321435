"""Diffusion ``lookahead``: the pass that commits a block (or ends the prompt) also proposes
the next block from an all-mask canvas.

* the batch gives such a pass two attention segments of one request: the committed rows
  (causal, written) and the canvas (bidirectional, reading the committed rows' fresh K/V);
* on the embedded model, whose proposals are often confident, the engine emits exactly the
  dense reference's tokens (tests/engine/reference.py) and takes fewer passes than without
  lookahead (the random tiny models of test_modes_reference cover the knob combinations);
* requests it cannot serve (a grammar, logit controls) fall back to the plain commit (image
  prompts' prefill: tests/engine/test_vlm_engine.py);
* the knob is validated, and a pass that would exceed the step budget is refused up front.
"""

from __future__ import annotations

import re

import pytest
import torch

from server.config import DEFAULT_MODEL_DIR
from server.engine.batch import HostBatch
from server.engine.engine import LLMEngine
from server.engine.grammar import GrammarSpec
from server.engine.modes.diffusion import COMMIT_LOOKAHEAD
from server.engine.params import DecodeParams, LogitControls, ParamError, RequestParams, SamplingParams
from server.engine.work import DECODE, Work
from server.model.loader import load_model
from tests.engine.helpers import embedded_fp32_engine, heldout_plain_prompts, make_engine, model_for, to_params
from tests.engine.reference import diffusion_greedy

NEAR_TIE = 1e-5


def test_host_batch_gives_a_lookahead_work_two_segments() -> None:
    eng = make_engine(model_for(0), page_size=4)
    params = to_params(dict(mode="diffusion", max_tokens=8))
    a, b = eng.add_request("a", [5, 6, 7, 8, 9], params), eng.add_request("b", [5, 6, 7], params)
    for r in (a, b):
        eng.kv.allocate(r.table, 32)
    a.num_computed, b.num_computed = 5, 2
    mask = eng.model_config.mask_token_id
    ahead = Work(COMMIT_LOOKAHEAD, [7, 21, 22] + [mask] * 4, logit_rows=[2, 4, 5, 6], kv_rows=[0, 1, 2], block_start=3)
    hb = HostBatch.build([(a, Work(DECODE, [11], [0])), (b, ahead)], page_size=4)
    assert hb.work_starts == [0, 1]
    assert hb.positions == [5, 2, 3, 4, 5, 6, 7, 8]
    # segments: a's decode row; b's committed rows (causal) after its 2 cached tokens; b's
    # canvas (bidirectional) whose cached prefix includes the 3 rows committed in this pass
    assert hb.context_lens == [5, 2, 5]
    assert hb.query_start_loc == [0, 1, 4, 8]
    assert hb.causal == [True, True, False]
    assert hb.query_lens == [1, 3, 4]
    assert hb.tables[1] == hb.tables[2] == list(b.table.pages)
    pages = b.table.pages
    assert hb.slots[1:4] == [pages[p // 4] * 4 + p % 4 for p in (2, 3, 4)]
    assert hb.slots[4:] == [-1] * 4  # the canvas writes nothing
    assert hb.logit_rows == [0, 3, 5, 6, 7]


@pytest.fixture(scope="module")
def embedded() -> tuple[LLMEngine, list[list[int]]]:
    eng = embedded_fp32_engine()
    return eng, heldout_plain_prompts(eng, 6, 9)


def _diffusion(eng: LLMEngine, prompts: list[list[int]], lookahead: bool, guess_seed: bool = False,
               **sampling: object) -> list[dict]:
    sampling = {"temperature": 0.0, **sampling}
    params = RequestParams(SamplingParams(max_tokens=32, ignore_eos=True, **sampling),  # type: ignore[arg-type]
                           DecodeParams(mode="diffusion", block_length=4, refine_steps=4, threshold=0.7, lookahead=lookahead,
                                        guess_seed=guess_seed))
    return eng.generate(prompts, params)


def test_embedded_model_lookahead_equals_reference_and_saves_passes(embedded) -> None:  # type: ignore[no-untyped-def]
    eng, prompts = embedded
    with_ahead, without = _diffusion(eng, prompts, True), _diffusion(eng, prompts, False)
    dense = load_model(str(DEFAULT_MODEL_DIR), dtype=torch.float32)
    mask = eng.model_config.mask_token_id
    for prompt, got in zip(prompts, with_ahead):
        ref = diffusion_greedy(dense, prompt, block_length=4, refine_steps=4, policy="threshold", threshold=0.7,
                               lookahead=True, max_tokens=32, max_model_len=512, mask_id=mask)
        if ref.min_margin > NEAR_TIE:
            assert got["token_ids"] == ref.tokens
            assert got["stats"].denoise_steps_per_block == ref.denoise_steps_per_block
    stats = [o["stats"] for o in with_ahead]
    assert all(s.forward_passes["commit"] == 0 and s.forward_passes["commit_lookahead"] > 0 for s in stats)
    assert any(0 in s.denoise_steps_per_block for s in stats)  # blocks wholly revealed by their proposer
    passes = sum(s.total_forward_passes for s in stats)
    assert passes < sum(o["stats"].total_forward_passes for o in without)
    eng.check_integrity()


def test_embedded_model_guess_seed_equals_reference_and_saves_passes(embedded) -> None:  # type: ignore[no-untyped-def]
    """guess_seed: the engine emits the dense reference's tokens, blocks and pass counts; on the
    embedded model many guesses are right, each saving the block's first denoise pass, so it
    takes fewer passes than decoding without lookahead."""
    eng, prompts = embedded
    guessed, without = _diffusion(eng, prompts, True, guess_seed=True), _diffusion(eng, prompts, False)
    dense = load_model(str(DEFAULT_MODEL_DIR), dtype=torch.float32)
    mask = eng.model_config.mask_token_id
    fused = right = compared = 0
    for prompt, got in zip(prompts, guessed):
        ref = diffusion_greedy(dense, prompt, block_length=4, refine_steps=4, policy="threshold", threshold=0.7,
                               lookahead=True, guess_seed=True, max_tokens=32, max_model_len=512, mask_id=mask)
        fused, right = fused + ref.fused_passes, right + ref.right_guesses
        if ref.min_margin > NEAR_TIE:
            compared += 1
            fp = got["stats"].forward_passes
            assert got["token_ids"] == ref.tokens
            assert got["stats"].denoise_steps_per_block == ref.denoise_steps_per_block
            assert fp["commit_lookahead"] == ref.fused_passes and fp["prefill_lookahead"] == 0
            assert fp["denoise"] == sum(ref.denoise_steps_per_block) - ref.right_guesses
    assert compared >= len(prompts) // 2
    assert 0 < right < fused
    passes = sum(o["stats"].total_forward_passes for o in guessed)
    assert passes < sum(o["stats"].total_forward_passes for o in without)
    eng.check_integrity()


def test_guess_seed_sampling_is_reproducible(embedded) -> None:  # type: ignore[no-untyped-def]
    eng, prompts = embedded
    first = _diffusion(eng, prompts[:2], True, guess_seed=True, temperature=0.8, seed=5)
    again = _diffusion(eng, prompts[:2], True, guess_seed=True, temperature=0.8, seed=5)
    assert [o["token_ids"] for o in first] == [o["token_ids"] for o in again]
    assert all(len(o["token_ids"]) == 32 for o in first)


def test_lookahead_falls_back_to_plain_commits_under_logit_controls(embedded) -> None:  # type: ignore[no-untyped-def]
    """Logit controls need the committed text before every position, which a proposed canvas
    does not have: such requests commit plainly (and still produce tokens)."""
    eng, prompts = embedded
    out = _diffusion(eng, prompts[:1], True, controls=LogitControls(logit_bias=((7, 0.5),)))[0]
    assert out["token_ids"] and out["stats"].forward_passes["commit"] > 0
    assert out["stats"].forward_passes["commit_lookahead"] == out["stats"].forward_passes["prefill_lookahead"] == 0


def test_lookahead_falls_back_to_plain_commits_under_a_grammar(embedded) -> None:  # type: ignore[no-untyped-def]
    """A constrained canvas is revealed left to right under the grammar, which a proposed
    canvas would bypass: such requests commit plainly, and the output still matches."""
    eng, prompts = embedded
    out = _diffusion(eng, prompts[:1], True, grammar=GrammarSpec("regex", r"(yes|no), [0-9]{2,4}!"))[0]
    text = eng.tokenizer.decode(out["token_ids"], skip_special_tokens=True)
    assert re.fullmatch(r"(yes|no), [0-9]{2,4}!", text), text
    assert out["stats"].forward_passes["commit_lookahead"] == out["stats"].forward_passes["prefill_lookahead"] == 0


def test_lookahead_sampling_is_reproducible(embedded) -> None:  # type: ignore[no-untyped-def]
    eng, prompts = embedded
    first = _diffusion(eng, prompts[:2], True, temperature=0.8, seed=5)
    again = _diffusion(eng, prompts[:2], True, temperature=0.8, seed=5)
    assert [o["token_ids"] for o in first] == [o["token_ids"] for o in again]
    assert all(len(o["token_ids"]) == 32 for o in first)


def test_lookahead_knob_is_validated() -> None:
    with pytest.raises(ParamError) as err:
        DecodeParams(mode="diffusion", lookahead="yes")  # type: ignore[arg-type]
    assert err.value.param == "lookahead"
    eng = make_engine(model_for(0), max_num_batched_tokens=12)
    eng.resolve_params(to_params(dict(mode="diffusion", block_length=8, max_tokens=4)))  # 8 tokens fit
    with pytest.raises(ParamError) as err:  # a commit of 8 carrying a canvas of 8 does not
        eng.resolve_params(to_params(dict(mode="diffusion", block_length=8, lookahead=True, max_tokens=4)))
    assert err.value.param == "block_length" and "16 tokens" in str(err.value)
    with pytest.raises(ParamError) as err:  # a diffusion knob
        eng.resolve_params(RequestParams(SamplingParams(max_tokens=4), DecodeParams(mode="ar", lookahead=True)))
    assert err.value.param == "lookahead"
    with pytest.raises(ParamError) as err:
        DecodeParams(mode="diffusion", guess_seed=1)  # type: ignore[arg-type]
    assert err.value.param == "guess_seed"
    # the guess row makes a lookahead pass one token longer: 8 + 8 fits a budget of 16, 8 + 8 + 1 does not
    eng = make_engine(model_for(0), max_num_batched_tokens=16)
    eng.resolve_params(to_params(dict(mode="diffusion", block_length=8, lookahead=True, max_tokens=4)))
    with pytest.raises(ParamError) as err:
        eng.resolve_params(to_params(dict(mode="diffusion", block_length=8, lookahead=True, guess_seed=True, max_tokens=4)))
    assert err.value.param == "block_length" and "17 tokens" in str(err.value)
