"""Property tests of the wire layer: no body, however broken, gets a 5xx.

Arbitrary bytes, arbitrary JSON and mutated valid requests are thrown at both generation
endpoints of the live app (fake engine); every answer is a 200 or a 4xx in the OpenAI
error shape, and every KV page is back in the pool afterwards.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.conftest import LiveServer, http, wait_until
from tests.api.fake_engine import FakeEngine

PATHS = ("/v1/chat/completions", "/v1/completions")
CHAT = {"model": "fake-nld", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
COMP = {"model": "fake-nld", "prompt": "hello", "max_tokens": 4}
FIELDS = (
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
    "n", "stop", "stream", "stream_options", "user", "mode", "refine_steps", "block_length", "threshold", "policy",
    "draft_length", "ignore_eos", "logprobs", "top_logprobs", "echo", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "min_tokens", "stop_token_ids", "response_format", "tools", "tool_choice",
    "suffix", "best_of", "functions", "function_call",
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# text with lone surrogates and other odd code points
texts = st.text(alphabet=st.characters(codec=None, blacklist_categories=()), max_size=12)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | texts
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=12
)


ROLES = ("system", "developer", "user", "assistant", "tool", "wizard")
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
tool_calls = st.lists(
    st.fixed_dictionaries(
        {"id": texts, "type": st.just("function"), "function": st.fixed_dictionaries({"name": texts, "arguments": texts | json_values})}
    )
    | json_values,
    max_size=2,
)
message_values = {"role": st.sampled_from(ROLES), "content": texts | json_values, "tool_calls": tool_calls}
messages = st.lists(
    st.dictionaries(st.sampled_from(MESSAGE_KEYS), json_values, max_size=4).flatmap(
        lambda d: st.fixed_dictionaries({k: message_values.get(k, st.just(v)) for k, v in d.items()})
    ),
    min_size=1,
    max_size=3,
)


def check_answer(resp: httpx.Response) -> None:
    """200, or a 4xx with the OpenAI error body."""
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if resp.status_code != 200:
        body = resp.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str)


def send(server: LiveServer, path: str, content: bytes) -> httpx.Response:
    return http().post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)


def pool_is_back(engine: FakeEngine) -> bool:
    return wait_until(lambda: engine.kv_pages_free() == engine.kv_pages_total() and not engine.running)


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


@FUZZ
@given(path=st.sampled_from(PATHS), body=st.binary(max_size=200))
def test_arbitrary_bytes(server: LiveServer, path: str, body: bytes) -> None:
    check_answer(send(server, path, body))
    assert pool_is_back(server.engine)


@FUZZ
@given(path=st.sampled_from(PATHS), value=json_values)
def test_arbitrary_json(server: LiveServer, path: str, value: Any) -> None:
    check_answer(send(server, path, dumps(value)))
    assert pool_is_back(server.engine)


@FUZZ
@given(
    path=st.sampled_from(PATHS),
    patch=st.dictionaries(st.sampled_from(FIELDS) | texts, json_values, min_size=1, max_size=3),
    drop=st.sets(st.sampled_from(FIELDS), max_size=2),
)
def test_mutated_requests(server: LiveServer, path: str, patch: dict[str, Any], drop: set[str]) -> None:
    base = dict(CHAT if path == PATHS[0] else COMP)
    for name in drop:
        base.pop(name, None)
    base.update(patch)
    check_answer(send(server, path, dumps(base)))
    assert pool_is_back(server.engine)


@FUZZ
@given(msgs=messages, extra=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=2))
def test_mutated_messages(server: LiveServer, msgs: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    body = {**CHAT, **extra, "messages": msgs}
    check_answer(send(server, PATHS[0], dumps(body)))
    assert pool_is_back(server.engine)


def test_lone_surrogate_bytes_are_a_400(server: LiveServer) -> None:
    """Bytes ED A0 80 (an encoded lone surrogate) inside a JSON string."""
    for path, field in ((PATHS[0], b'"messages": [{"role": "user", "content": "a\xed\xa0\x80b"}]'), (PATHS[1], b'"prompt": "a\xed\xa0\x80b"')):
        resp = send(server, path, b'{"model": "fake-nld", ' + field + b"}")
        assert resp.status_code == 400, resp.text
        check_answer(resp)
    resp = send(server, PATHS[1], b'{"model": "fake-nld", "prompt": "\\ud800x"}')
    assert resp.status_code == 400, resp.text
