"""Tool calling on the wire (fake engine scripted to emit a call): the official ``openai``
client creates, streams and sends the tool result back; plan and error cases."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from server.api.tools import ToolCallStreamer, plan_tool_call
from tests.api.conftest import LiveServer, http
from tests.api.fake_engine import byte_token_ids
from tests.api.test_api_errors import error_of

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL_TEXT = '{"name":"get_weather","arguments":{"city":"Paris","unit":"C"}}'
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def script_call(server: LiveServer, text: str = CALL_TEXT) -> None:
    server.engine.knobs.script = byte_token_ids(server.engine.tokenizer, text)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "self_spec"])
def test_create_stream_and_send_the_result_back(server: LiveServer, mode: str) -> None:
    c = client(server)
    script_call(server)
    resp = c.chat.completions.create(model="fake-nld", messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required",
                                     max_tokens=200, extra_body={"mode": mode})
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}
    params = server.engine.submitted[-1][2]
    schema = json.loads(params.sampling.grammar.source)
    assert [o["properties"]["name"]["const"] for o in schema["anyOf"]] == ["get_weather", "get_time"]

    script_call(server)
    stream = c.chat.completions.create(model="fake-nld", messages=MESSAGES, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=200, stream=True, extra_body={"mode": mode})
    name, args, ids, finish = None, "", [], None
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                assert tc.index == 0
                ids += [tc.id] if tc.id else []
                name = tc.function.name or name
                args += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    assert name == "get_weather" and len(ids) == 1 and json.loads(args) == {"city": "Paris", "unit": "C"}
    assert finish == "stop"  # a named function: OpenAI answers stop

    server.engine.knobs.script = None
    back = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 C, sunny"},
    ]
    final = c.chat.completions.create(model="fake-nld", messages=back, tools=[WEATHER], tool_choice="none", max_tokens=20)
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None
    prompt = server.engine.tokenizer.decode(server.engine.submitted[-1][1])
    assert "Tool result (" + call.id + "): 21 C, sunny" in prompt and '"city": "Paris"' in prompt


def test_cut_by_length_is_text(server: LiveServer) -> None:
    script_call(server)
    body = {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 20}
    choice = http().post(server.url + "/v1/chat/completions", json=body, timeout=20).json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == CALL_TEXT[:20]


@pytest.mark.parametrize(
    "patch,param",
    [
        ({"tools": [WEATHER]}, "tool_choice"),  # auto (the default) needs a parser this server lacks
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"}, "tools[0]"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),
        ({"tools": "x", "tool_choice": "required"}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_tool_errors(server: LiveServer, patch: dict[str, Any], param: str) -> None:
    err = error_of(http().post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, **patch}, timeout=20), 400)
    assert err["param"] == param


def test_tool_choice_none_generates_text(server: LiveServer) -> None:
    body = {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 8}
    resp = http().post(server.url + "/v1/chat/completions", json=body, timeout=20)
    assert resp.status_code == 200 and server.engine.submitted[-1][2].sampling.grammar is None


def test_streamer_holds_back_the_closing_brace() -> None:
    streamer, parts = ToolCallStreamer(), []
    for i in range(0, len(CALL_TEXT), 3):
        parts += streamer.feed(CALL_TEXT[i : i + 3])
    parts += streamer.finish(complete=True)
    assert parts[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(p["function"]["arguments"] for p in parts[1:]) == '{"city":"Paris","unit":"C"}'
    plan = plan_tool_call([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None)
    assert plan is not None and plan.finish_reason == "stop"
