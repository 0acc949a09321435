"""The embedded default model: loads with no network, every mode produces text, and
self-speculation at temperature 0 reproduces AR greedy decoding exactly."""

from __future__ import annotations

import json

import pytest

from server.config import DEFAULT_MODEL_DIR, EngineConfig
from server.engine.engine import LLMEngine
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from tests.engine.helpers import REPO, heldout_plain_prompts

PROMPTS = ["To be, or not to be, that is", "It is a truth universally acknowledged", "In the beginning", "ROMEO.\nBut soft"]


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    with pytest.MonkeyPatch.context() as mp:  # any attempt to reach a hub would fail loudly
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        return LLMEngine.from_pretrained(EngineConfig(model=str(DEFAULT_MODEL_DIR), max_model_len=512, kv_cache_tokens=8192))


def run(engine: LLMEngine, mode: str, **decode: object) -> list[list[int]]:
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    params = RequestParams(SamplingParams(max_tokens=40, temperature=0.0), DecodeParams(mode=mode, **decode))  # type: ignore[arg-type]
    return [o["token_ids"] for o in engine.generate(prompts, params)]


def test_every_mode_generates_text(engine: LLMEngine) -> None:
    mask = engine.model_config.mask_token_id
    for mode in ("ar", "diffusion", "self_spec"):
        outs = run(engine, mode)
        texts = [engine.tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        assert all(t.strip() for t in texts), (mode, texts)
        assert all(mask not in o for o in outs)
    engine.check_integrity()


@pytest.mark.parametrize("draft_length", [31, 7, 3])
def test_self_spec_equals_ar_greedy(engine: LLMEngine, draft_length: int) -> None:
    assert run(engine, "self_spec", draft_length=draft_length) == run(engine, "ar")


def shipped_decoding(mode: str) -> dict[str, object]:
    """The shipped decoding settings of a mode (generation_config.json ``nld_decoding``),
    passed explicitly so these tests do not depend on how the server resolves defaults."""
    cfg = json.loads((DEFAULT_MODEL_DIR / "generation_config.json").read_text())
    settings = dict(cfg["nld_decoding"][mode])
    if mode == "self_spec":
        settings.pop("block_length", None)  # a self_spec pass is sized by draft_length
    return settings


def heldout_prompts(engine: LLMEngine) -> list[list[int]]:
    """Fixed prompts cut from the corpus' held-out split (never trained or distilled on)."""
    spec = json.loads((REPO / "benchmarks" / "heldout_prompts.json").read_text())
    plain = heldout_plain_prompts(engine, 0, 6)
    chat = [engine.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                                 return_dict=False) for t in spec["chat"][:2]]
    return plain + chat


# The target for this guard: TPF > 2 at the shipped defaults. Measured 2.19 on these
# prompts (64 new tokens, the sweep's length) at block 4 / threshold 0.6 with lookahead and
# guessed seeds, the fastest setting whose output keeps AR perplexity within 10% on the sweep's
# 72 held-out prompts (TPF 2.20 there; docs/model-card.md, "Guessed seeds"). The former
# defaults (threshold 0.8, lookahead without guesses) give 1.90 here.
DIFFUSION_TPF_FLOOR = 2.0
NEW_TOKENS = 64


def test_diffusion_tpf_at_shipped_defaults_stays_above_floor(engine: LLMEngine) -> None:
    """Regression guard for the self-distilled model: at the shipped diffusion settings,
    greedy decoding of held-out prompts emits more tokens per forward pass than the floor
    (TPF is a count of passes, so this is deterministic, not a timing)."""
    params = RequestParams(SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
                           DecodeParams(mode="diffusion", **shipped_decoding("diffusion")))  # type: ignore[arg-type]
    outs = engine.generate(heldout_prompts(engine), params)
    tokens = sum(o["stats"].completion_tokens for o in outs)
    passes = sum(o["stats"].total_forward_passes for o in outs)
    assert tokens == NEW_TOKENS * len(outs)
    assert tokens / passes > DIFFUSION_TPF_FLOOR


def test_self_spec_at_shipped_defaults_equals_ar_greedy(engine: LLMEngine) -> None:
    prompts = heldout_prompts(engine)
    sampling = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    ar = engine.generate(prompts, RequestParams(sampling, DecodeParams(mode="ar")))
    spec = engine.generate(prompts, RequestParams(sampling, DecodeParams(mode="self_spec", **shipped_decoding("self_spec"))))  # type: ignore[arg-type]
    assert [o["token_ids"] for o in spec] == [o["token_ids"] for o in ar]
