"""Parameter resolution: the order of defaults (request > server setting > the model folder's
``generation_config.json`` ``nld_decoding`` > the mode's built-in), the load-time validation
of that entry, and the resolved type."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from server.config import DEFAULT_MODEL_DIR, EngineConfig
from server.engine.engine import LLMEngine
from server.engine.modes import load_model_defaults
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from server.model.tiny import tiny_nld_config
from tests.engine.helpers import reference_for
from tests.fixtures.tiny_models import random_model, write_random_checkpoint

MODEL_DEFAULTS = {"diffusion": {"block_length": 4, "threshold": 0.7, "refine_steps": 3}, "self_spec": {"draft_length": 5}}


def model_folder(path: Path, nld_decoding: Any) -> Path:
    """A tiny loadable checkpoint whose generation_config.json carries ``nld_decoding``."""
    write_random_checkpoint(path, tiny_nld_config(), seed=7)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "nld_decoding": nld_decoding}))
    return path


def engine(folder: Path, **config: Any) -> LLMEngine:
    return LLMEngine.from_pretrained(EngineConfig(model=str(folder), device="cpu", kv_cache_tokens=2048,
                                                  max_model_len=128, page_size=8, **config))


def decode_of(eng: LLMEngine, mode: str, **knobs: Any) -> Any:
    return eng.resolve_params(RequestParams(decode=DecodeParams(mode=mode, **knobs))).decode


def test_defaults_come_in_order(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m", MODEL_DEFAULTS)
    eng = engine(folder)
    block = eng.model_config.block_size
    d = decode_of(eng, "diffusion")
    assert (d.block_length, d.threshold, d.refine_steps) == (4, 0.7, 3)  # the model's
    assert (d.policy, d.seed_first_position) == ("threshold", True)  # the mode's built-in
    assert decode_of(eng, "diffusion", refine_steps=5, threshold=0.95).refine_steps == 5  # the request's
    s = decode_of(eng, "self_spec")
    assert (s.block_length, s.draft_length) == (block, 5)
    assert decode_of(eng, "self_spec", draft_length=2).draft_length == 2
    with_server = engine(folder, default_refine_steps=6)  # a server setting beats the model
    assert decode_of(with_server, "diffusion").refine_steps == 6
    assert decode_of(with_server, "diffusion", refine_steps=2).refine_steps == 2
    plain = LLMEngine(eng.model, EngineConfig(model="tiny", device="cpu", kv_cache_tokens=2048, max_model_len=128))
    d = decode_of(plain, "diffusion")
    assert (d.block_length, d.threshold, d.refine_steps) == (block, 0.9, block)  # built-in only


def test_resolved_params_are_frozen_and_complete(tmp_path: Path) -> None:
    eng = engine(model_folder(tmp_path / "m", MODEL_DEFAULTS))
    for mode in ("ar", "diffusion", "self_spec"):
        d = decode_of(eng, mode)
        assert all(getattr(d, f.name) is not None for f in dataclasses.fields(d)), d
        with pytest.raises(dataclasses.FrozenInstanceError):
            d.mode = "x"


def test_model_defaults_drive_decoding(tmp_path: Path) -> None:
    """A request that leaves the knobs out decodes exactly as the naive reference given the
    model folder's values."""
    eng = engine(model_folder(tmp_path / "m", MODEL_DEFAULTS))
    prompt = [5, 9, 14, 3, 22, 7]
    for mode, spec in (("diffusion", MODEL_DEFAULTS["diffusion"]), ("self_spec", MODEL_DEFAULTS["self_spec"])):
        out = eng.generate([prompt], RequestParams(SamplingParams(max_tokens=10, temperature=0.0), DecodeParams(mode=mode)))[0]
        ref = reference_for(eng.model, prompt, {"mode": mode, "max_tokens": 10, **spec}, 128)
        assert out["token_ids"] == ref.tokens, mode
        if mode == "diffusion":
            assert out["stats"].denoise_steps_per_block == ref.denoise_steps_per_block


@pytest.mark.parametrize(
    "entry,key",
    [
        ({"turbo": {"block_length": 4}}, "nld_decoding.turbo"),
        ({"diffusion": {"threshold": 1.5}}, "nld_decoding.diffusion.threshold"),
        ({"diffusion": {"policy": "random"}}, "nld_decoding.diffusion.policy"),
        ({"diffusion": {"draft_length": 3}}, "nld_decoding.diffusion.draft_length"),
        ({"ar": {"block_length": 8}}, "nld_decoding.ar.block_length"),
        ({"self_spec": {"draft_length": 0}}, "nld_decoding.self_spec.draft_length"),
        ({"self_spec": [4]}, "nld_decoding.self_spec"),
        ([1, 2], "nld_decoding"),
    ],
)
def test_a_bad_model_entry_fails_at_load_naming_the_key(tmp_path: Path, entry: Any, key: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"nld_decoding": entry}))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_model_defaults(folder)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        LLMEngine(random_model(tiny_nld_config()), EngineConfig(model=str(folder), device="cpu", kv_cache_tokens=2048, max_model_len=128))


def test_the_embedded_model_entry_is_valid() -> None:
    defaults = load_model_defaults(DEFAULT_MODEL_DIR)
    assert set(defaults) <= {"ar", "diffusion", "self_spec"}


@pytest.mark.parametrize("decode", [dict(mode="self_spec", variant="quadratic"), dict(mode="auto")])
def test_passes_without_one_sequence_refuse_grammar_and_logit_controls(tmp_path: Path, decode: dict) -> None:
    """Quadratic self_spec (and auto, which may pick it) lays out several continuations in one
    pass, so row-wise grammar masks and logit controls are refused, naming the field."""
    from server.engine.grammar import GrammarSpec
    from server.engine.params import LogitControls, ParamError

    eng = engine(model_folder(tmp_path / "m", {}))
    cases = {
        "response_format": SamplingParams(grammar=GrammarSpec.json_schema({"type": "object"})),
        "presence_penalty": SamplingParams(controls=LogitControls(presence_penalty=0.5)),
        "logit_bias": SamplingParams(controls=LogitControls(logit_bias=((5, 1.0),))),
        "min_tokens": SamplingParams(max_tokens=8, controls=LogitControls(min_tokens=2)),
    }
    for param, sampling in cases.items():
        with pytest.raises(ParamError) as err:
            eng.resolve_params(RequestParams(sampling, DecodeParams(**decode)))
        assert err.value.param == param
    linear = eng.resolve_params(RequestParams(cases["logit_bias"], DecodeParams(mode="self_spec", variant="linear")))
    assert linear.decode.variant == "linear"  # linear self_spec honours them
