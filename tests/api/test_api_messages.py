"""Message rules: content required (except assistant tool calls), tool turns, optional model."""

from __future__ import annotations

from typing import Any

from tests.api.conftest import LiveServer, http
from tests.api.test_api_errors import error_of

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_TURNS = [
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def chat(server: LiveServer, body: dict[str, Any]) -> Any:
    return http().post(server.url + "/v1/chat/completions", json={"max_tokens": 3, **body}, timeout=20)


def test_message_without_content_is_a_400(server: LiveServer) -> None:
    for msg in ({"role": "user"}, {"role": "user", "content": None}, {"role": "assistant"}, {"role": "system"}):
        err = error_of(chat(server, {"model": "fake-nld", "messages": [msg]}), 400)
        assert err["param"] == "messages[0].content"
    assert not server.engine.submitted


def test_empty_string_content_is_accepted(server: LiveServer) -> None:
    assert chat(server, {"model": "fake-nld", "messages": [{"role": "user", "content": ""}]}).status_code == 200


def test_model_may_be_omitted(server: LiveServer) -> None:
    resp = chat(server, {"messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "fake-nld"
    resp = http().post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=20)
    assert resp.status_code == 200 and resp.json()["model"] == "fake-nld"


def test_tool_turns_are_accepted_and_rendered(server: LiveServer, tokenizer: Any) -> None:
    resp = chat(server, {"messages": TOOL_TURNS})
    assert resp.status_code == 200, resp.text
    _, prompt_ids, _ = server.engine.submitted[-1]
    text = tokenizer.decode(prompt_ids)
    # the test template knows no tools: the call and its result are folded into text it renders
    assert '"name": "get_weather"' in text and '"city": "Paris"' in text
    assert "Tool result (call_1): sunny, 21 C" in text


def test_tool_turn_rules(server: LiveServer) -> None:
    no_id = [TOOL_TURNS[0], {"role": "tool", "content": "x"}]
    assert error_of(chat(server, {"messages": no_id}), 400)["param"] == "messages[1].tool_call_id"
    calls_on_user = [{"role": "user", "content": "x", "tool_calls": [CALL]}]
    assert error_of(chat(server, {"messages": calls_on_user}), 400)["param"] == "messages[0].tool_calls"
    bad_call = [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": 3}}]}]
    assert error_of(chat(server, {"messages": bad_call}), 400)["param"].startswith("messages[0].tool_calls")


def test_template_with_tools_gets_structured_messages() -> None:
    from server.api.protocol import ChatMessage
    from server.api.tool_messages import render_message

    template = "{% for m in messages %}{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.city }}{% endif %}{% endfor %}"
    msg = ChatMessage.model_validate(TOOL_TURNS[1])
    out = render_message("assistant", "", msg, template)
    assert out["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert out["content"] is None
    tool = render_message("tool", "sunny", ChatMessage.model_validate(TOOL_TURNS[2]), template)
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
