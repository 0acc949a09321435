"""Grammar-constrained decoding in the three modes (engine level, real tokenizers).

Checked on the embedded model (trained, literary) and on a tiny random checkpoint: outputs
parse and validate against their schema; constrained self_spec at temperature 0 equals
constrained AR token for token; every reveal of constrained diffusion keeps the text a valid
prefix, as judged by an independent matcher built here from the grammar.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server.config import EngineConfig  # noqa: E402
from server.engine.engine import LLMEngine  # noqa: E402
from server.engine.grammar import GrammarCompiler, GrammarSpec  # noqa: E402
from server.engine.params import DecodeParams, RequestParams, SamplingParams  # noqa: E402
from tests.integration.checkpoint import write_checkpoint  # noqa: E402

llguidance = pytest.importorskip("llguidance")

DEFAULT_MODEL = ROOT / "server" / "default_model"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 3},
        "alive": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "alive"],
    "additionalProperties": False,
}
POINT = {
    "type": "object", "properties": {"x": {"type": "number", "maximum": 1000}, "y": {"enum": [1, 2, "three"]}},
    "required": ["x", "y"], "additionalProperties": False,
}
MODES = [
    dict(mode="ar"),
    dict(mode="self_spec", draft_length=6),
    dict(mode="diffusion", block_length=8, policy="threshold", threshold=0.5),
    dict(mode="diffusion", block_length=8, refine_steps=3, policy="low_confidence"),
]


@pytest.fixture(scope="module", params=["default", "tiny"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    import torch

    torch.set_num_threads(1)
    if request.param == "default":
        path = DEFAULT_MODEL
    else:
        path = write_checkpoint(tmp_path_factory.mktemp("tiny-nld") / "tiny-nld")
    return LLMEngine.from_pretrained(EngineConfig(model=str(path), device="cpu", max_model_len=512))


def prompt_ids(engine: LLMEngine, text: str = "Describe a person.") -> list[int]:
    return list(engine.tokenizer.encode(text, add_special_tokens=False))


def params(spec: GrammarSpec, mode: dict, max_tokens: int = 90, temperature: float = 0.0, seed: int = 1) -> RequestParams:
    return RequestParams(
        SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, grammar=spec), DecodeParams(**mode)
    )


@pytest.mark.parametrize("mode", MODES, ids=["ar", "self_spec", "diffusion-threshold", "diffusion-lowconf"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_schema_output_validates(engine: LLMEngine, mode: dict, temperature: float) -> None:
    schema = PERSON if temperature == 0 else POINT
    for seed in (1, 2)[: 1 if temperature == 0 else 2]:
        out = engine.generate([prompt_ids(engine)], params(GrammarSpec.json_schema(schema), mode, 90, temperature, seed))[0]
        text = engine.tokenizer.decode(out["token_ids"])
        assert out["finish_reason"] == "stop", text
        jsonschema_rs.validator_for(schema).validate(json.loads(text))


@pytest.mark.parametrize("mode", MODES[:3], ids=["ar", "self_spec", "diffusion"])
def test_json_object_and_regex(engine: LLMEngine, mode: dict) -> None:
    out = engine.generate([prompt_ids(engine)], params(GrammarSpec("json_object"), mode, 60))[0]
    text = engine.tokenizer.decode(out["token_ids"])
    if out["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: a valid prefix of an object (possibly invalid JSON, as OpenAI)
        assert out["finish_reason"] == "length" and text.startswith("{")
    out = engine.generate([prompt_ids(engine)], params(GrammarSpec("regex", r"(yes|no), [0-9]{2,4}!"), mode, 30))[0]
    text = engine.tokenizer.decode(out["token_ids"])
    import re

    assert out["finish_reason"] == "stop" and re.fullmatch(r"(yes|no), [0-9]{2,4}!", text), text


def test_length_cut_is_length(engine: LLMEngine) -> None:
    for mode in MODES[:3]:
        out = engine.generate([prompt_ids(engine)], params(GrammarSpec.json_schema(PERSON), mode, 5))[0]
        assert out["finish_reason"] == "length" and len(out["token_ids"]) == 5


@pytest.mark.parametrize("temperature", [0.0])
def test_constrained_self_spec_greedy_equals_constrained_ar(engine: LLMEngine, temperature: float) -> None:
    for k, schema in enumerate((PERSON, POINT, {"type": "array", "items": {"type": "integer"}, "maxItems": 6})):
        prompt = prompt_ids(engine, ["Describe a person.", "A point:", "Numbers: 1 2 3"][k])
        spec = GrammarSpec.json_schema(schema)
        ar = engine.generate([prompt], params(spec, dict(mode="ar"), 70))[0]
        ss = engine.generate([prompt], params(spec, dict(mode="self_spec", draft_length=(3, 7, 5)[k]), 70))[0]
        assert ss["token_ids"] == ar["token_ids"]
        assert ss["finish_reason"] == ar["finish_reason"]


_LL_TOKENIZERS: dict[int, Any] = {}


def independent_matcher(engine: LLMEngine, schema: dict) -> Any:
    """A matcher built here, not by the engine's compiler (own tokenizer wrapper, own grammar)."""
    import llguidance.hf

    if id(engine) not in _LL_TOKENIZERS:
        _LL_TOKENIZERS[id(engine)] = llguidance.hf.from_tokenizer(engine.tokenizer, n_vocab=engine.model_config.vocab_size)
    tok = _LL_TOKENIZERS[id(engine)]
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
    return llguidance.LLMatcher(tok, grammar, log_level=0)


@pytest.mark.parametrize("policy", ["threshold", "low_confidence", "leftmost"])
def test_diffusion_reveals_keep_a_valid_prefix(engine: LLMEngine, policy: str) -> None:
    spec = GrammarSpec.json_schema(PERSON)
    prompt = prompt_ids(engine)
    engine.add_request("d", prompt, params(spec, dict(mode="diffusion", block_length=8, refine_steps=4, policy=policy, threshold=0.3), 90, 1.0, 5))
    req = engine.requests["d"]
    checked = 0
    while engine.has_work:
        engine.step()
        st = req.mode_state
        if st is None or st.canvas is None:
            continue
        n = sum(st.revealed)
        assert st.revealed == [True] * n + [False] * (len(st.revealed) - n), "constrained reveals form a prefix"
        text = req.output_ids + st.canvas[:n]
        assert independent_matcher(engine, PERSON).validate_tokens(text) == len(text)
        checked += 1
    assert checked > 0 and req.finish_reason == "stop"
    jsonschema_rs.validator_for(PERSON).validate(json.loads(engine.tokenizer.decode(req.output_ids)))


def test_compiled_once_and_cached(engine: LLMEngine) -> None:
    compiler = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size, engine.eos_ids, cache_size=2)
    a = compiler.compile(GrammarSpec.json_schema(PERSON))
    assert compiler.compile(GrammarSpec.json_schema(json.loads(json.dumps(PERSON)))) is a  # same schema, new dict
    assert compiler.compilations == 1
    compiler.compile(GrammarSpec.json_schema(POINT))
    compiler.compile(GrammarSpec("json_object"))
    assert compiler.compilations == 3
    compiler.compile(GrammarSpec.json_schema(PERSON))  # evicted (LRU of 2): compiled again
    assert compiler.compilations == 4
    m1, m2 = a.matcher(), a.matcher()
    ids = prompt_ids(engine, '{"')
    assert m1.accept(ids[0]) and m2.count_valid([ids[0]]) == 1  # independent states


def test_invalid_grammars_are_value_errors(engine: LLMEngine) -> None:
    for spec in (GrammarSpec("regex", "(unclosed"), GrammarSpec("lark", "start: nothing_defined"),
                 GrammarSpec("json_schema", '{"type": "no-such-type"}'), GrammarSpec("regex", "a{99999999}"), GrammarSpec("lark", 'start: "a"~99999'),
                 GrammarSpec.json_schema({"type": "string", "pattern": "^x{1,20000}$"})):
        with pytest.raises(ValueError, match="response_format"):
            engine.add_request("bad", prompt_ids(engine), params(spec, dict(mode="ar")))
    assert "bad" not in engine.requests and not engine.has_work
