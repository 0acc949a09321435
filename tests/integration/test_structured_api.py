"""response_format through the real server, in every mode, streamed and not, on both the
embedded model and the tiny random checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import jsonschema_rs
import pytest

from tests.engine.test_grammar import PERSON
from tests.integration.conftest import SERVED_NAME, Stack, model_dir_for, wait_until

MODES = {"ar": {}, "self_spec": {"draft_length": 5}, "diffusion": {"block_length": 8, "threshold": 0.5}}


@pytest.fixture(scope="module", params=["tiny", "default"])
def stack(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> Iterator[Stack]:
    s = Stack(model_dir_for(request.param, tiny_checkpoint), SERVED_NAME).start()
    try:
        yield s
    finally:
        s.stop()


def chat(stack: Stack, body: dict[str, Any], stream: bool) -> tuple[str, str | None]:
    body = {"messages": [{"role": "user", "content": "Describe a person as JSON."}], "max_tokens": 90, **body}
    if not stream:
        resp = httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    text, finish = "", None
    with httpx.stream("POST", stack.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
    return text, finish


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_json_schema_output_validates(stack: Stack, mode: str, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    text, finish = chat(stack, {"mode": mode, **MODES[mode], "response_format": fmt, "temperature": 0.7, "seed": 4}, stream)
    assert finish == "stop", text
    jsonschema_rs.validator_for(PERSON).validate(json.loads(text))
    engine = stack.engine
    assert wait_until(lambda: not engine.requests and engine.kv.num_free_pages == engine.kv.num_pages, 10)


def test_cut_by_max_tokens_is_length(stack: Stack) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    text, finish = chat(stack, {"response_format": fmt, "max_tokens": 3}, False)
    assert finish == "length" and text.startswith('{"')


def test_invalid_schema_is_a_400(stack: Stack) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    resp = httpx.post(stack.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "x"}], "response_format": fmt})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "response_format", resp.text


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}
NOTE = {"type": "function", "function": {"name": "take_note", "parameters": {
    "type": "object", "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["stars"],
    "additionalProperties": False}}}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_tool_call_round_trip_with_the_openai_client(stack: Stack, mode: str) -> None:
    import openai

    c = openai.OpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    extra = {"mode": mode, **MODES[mode]}
    resp = c.chat.completions.create(model=SERVED_NAME, messages=messages, tools=[WEATHER, NOTE], tool_choice="required",
                                     max_tokens=80, temperature=0, extra_body=extra)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    schema = {"get_weather": WEATHER, "take_note": NOTE}[call.function.name]["function"]["parameters"]
    jsonschema_rs.validator_for(schema).validate(json.loads(call.function.arguments))

    stream = c.chat.completions.create(model=SERVED_NAME, messages=messages, tools=[WEATHER], max_tokens=80,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       stream=True, temperature=0, extra_body=extra)
    name, args, finish = None, "", None
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    assert name == "get_weather" and finish == "stop"
    jsonschema_rs.validator_for(WEATHER["function"]["parameters"]).validate(json.loads(args))

    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
                 {"role": "tool", "tool_call_id": call.id, "content": "21 C and sunny"}]
    final = c.chat.completions.create(model=SERVED_NAME, messages=messages, tools=[WEATHER], tool_choice="none",
                                      max_tokens=8, extra_body=extra)
    assert final.choices[0].message.tool_calls is None and final.choices[0].finish_reason in ("stop", "length")
