"""Mutated requests against the real engine (embedded model): never a 5xx, and the KV pool
is back to its initial free count after each answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.test_api_fuzz import FIELDS, check_answer, json_values, messages, texts
from tests.integration.conftest import Stack, model_dir_for, wait_until, SERVED_NAME

PATHS = ("/v1/chat/completions", "/v1/completions")
CAPS = {"max_tokens": 6, "max_completion_tokens": 6, "block_length": 8, "draft_length": 4, "refine_steps": 4, "n": 2}
# valid values of the fields that change what the engine does, so mutations reach it
VALID = {
    "mode": st.sampled_from(["ar", "diffusion", "self_spec"]),
    "temperature": st.floats(0, 2),
    "top_k": st.integers(0, 50),
    "seed": st.integers(0, 2**63 - 1),
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
    "block_length": st.integers(1, 8),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "min_tokens": st.integers(0, 6),
    "stop_token_ids": st.lists(st.integers(0, 5000), max_size=3),
    "logit_bias": st.dictionaries(st.integers(0, 5000).map(str), st.floats(-100, 100), max_size=3),
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.sampled_from(["f", "g", "bad name"]), "parameters": json_values})}), max_size=2),
    "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function", "function": {"name": "f"}}]),
    "response_format": st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
        {"name": st.just("x"), "schema": st.dictionaries(st.sampled_from(["type", "properties", "enum", "maxLength", "items"]),
                                                         json_values, max_size=3)})})
    | st.fixed_dictionaries({"type": st.sampled_from(["regex", "grammar"]), "regex": texts, "grammar": texts})
    | st.sampled_from([{"type": "json_object"}, {"type": "text"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]),
}


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path) -> Iterator[Stack]:
    s = Stack(model_dir_for("default", tiny_checkpoint), SERVED_NAME).start(max_num_seqs=8)
    try:
        yield s
    finally:
        s.stop()


def capped(body: dict[str, Any]) -> dict[str, Any]:
    """Keep the generation short: large counts are cut (invalid values stay as they are)."""
    for name, cap in CAPS.items():
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[name] = cap
    body.setdefault("max_tokens", CAPS["max_tokens"])
    return body


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(PATHS),
    valid=st.dictionaries(st.sampled_from(sorted(VALID)), st.none(), max_size=4).flatmap(
        lambda d: st.fixed_dictionaries({k: VALID[k] for k in d})
    ),
    patch=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=2),
    msgs=messages,
)
def test_mutated_requests_real_engine(stack: Stack, path: str, valid: dict, patch: dict, msgs: list) -> None:
    engine = stack.engine
    free_before = engine.kv.num_pages
    body: dict[str, Any] = {**valid, **patch}
    if path == PATHS[0]:
        body.setdefault("messages", msgs)
    else:
        body.setdefault("prompt", "Once upon a time")
    content = json.dumps(capped(body)).encode("utf-8", "surrogatepass")
    try:
        resp = httpx.post(stack.url + path, content=content, headers={"content-type": "application/json"}, timeout=120)
    except httpx.TimeoutException:
        pytest.fail(f"no answer in 120 s to {path} {content[:2000]!r}")
    check_answer(resp)
    assert wait_until(lambda: not engine.requests and engine.kv.num_free_pages == free_before, 15), (
        engine.kv.num_free_pages, free_before
    )
