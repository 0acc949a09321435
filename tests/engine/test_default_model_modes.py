"""The embedded default model: loads with no network, every mode produces text, and
self-speculation at temperature 0 reproduces AR greedy decoding exactly."""

from __future__ import annotations

import pytest

from server.config import DEFAULT_MODEL_DIR, EngineConfig
from server.engine.engine import LLMEngine
from server.engine.params import DecodeParams, RequestParams, SamplingParams

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
