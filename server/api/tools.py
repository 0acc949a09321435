"""Tool calling: ``tools`` + ``tool_choice`` -> a grammar, and the output -> ``tool_calls``.

Works with any model, because the call is constrained rather than parsed from free text:
``tool_choice`` ``"required"`` or ``{"type": "function", "function": {"name": ...}}``
constrains the output to one JSON object ``{"name": <a tool's name>, "arguments": <its
parameters schema>}`` (keys in that order, compact), which is returned as one OpenAI
``tool_call``. ``"auto"`` would need the model to choose between text and a call in its own
tool-call syntax; this server has no parser for any model's syntax, so ``"auto"`` (the
default when ``tools`` are given) is refused with a 400 naming ``tool_choice``. ``"none"``
renders the tools (when the template can) and generates text.

Finish reason: ``tool_calls`` for ``"required"``, ``stop`` for a named function (as OpenAI
does); an output cut by ``max_tokens`` is ``length`` and, not being a complete call, is
returned as text (streamed, its partial call deltas have already been sent).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.api.errors import bad_request
from server.api.protocol import ChatDelta, ChatResponseMessage, ToolCallOut
from server.engine.grammar import GrammarSpec

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CALL_PREFIX = re.compile(r'^\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')


@dataclass(frozen=True)
class ToolCallPlan:
    """A request whose output is a tool call."""

    grammar: GrammarSpec
    forced_name: str | None  # set when tool_choice names a function

    @property
    def finish_reason(self) -> str:
        return "stop" if self.forced_name else "tool_calls"


def _tool_schemas(tools: Any) -> dict[str, dict[str, Any]]:
    """name -> parameters schema; 400 naming ``tools`` if malformed."""
    if not isinstance(tools, list) or not tools:
        raise bad_request("'tools' must be a non-empty list of function tools.", param="tools")
    schemas: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': [A-Za-z0-9_-]{{1,64}}, ...}}}}.", param=f"tools[{i}]")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON Schema object.", param=f"tools[{i}].function.parameters")
        if name in schemas:
            raise bad_request(f"Two tools are named '{name}'.", param="tools")
        schemas[name] = params
    return schemas


def _call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def plan_tool_call(tools: Any, tool_choice: Any, response_format: Any) -> ToolCallPlan | None:
    """The tool-call plan of a chat request (None: generate text); 400 for what cannot run."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools'.", param="tool_choice")
        return None
    schemas = _tool_schemas(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return None
    if choice == "auto":
        raise bad_request(
            "tool_choice 'auto' is not supported: this server has no parser for the model's own tool-call syntax. "
            "Use tool_choice 'required' or {'type': 'function', 'function': {'name': ...}} (constrained calls), or 'none'.",
            param="tool_choice",
        )
    forced = None
    if choice == "required":
        names = list(schemas)
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        forced = choice["function"].get("name")
        if forced not in schemas:
            raise bad_request(f"tool_choice names a function that is not in 'tools': {forced!r}.", param="tool_choice")
        names = [forced]
    else:
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}.", param="tool_choice")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad_request("'response_format' cannot be combined with a forced tool call.", param="response_format")
    options = [_call_schema(n, schemas[n]) for n in names]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return ToolCallPlan(GrammarSpec.json_schema(schema), forced)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a complete generated call, or None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or "arguments" not in value:
        return None
    return value["name"], json.dumps(value["arguments"], ensure_ascii=False)


@dataclass
class ToolCallStreamer:
    """Turns the streamed text of one generated call into OpenAI ``tool_calls`` deltas: first
    ``{index, id, type, function: {name, arguments: ""}}`` once the name is complete, then
    ``{index, function: {arguments: <piece>}}`` as the arguments grow. The last character seen
    is held back (it may be the brace that closes the call object)."""

    call_id: str = field(default_factory=new_call_id)
    _text: str = ""
    _args_start: int | None = None
    _sent: int = 0

    @property
    def started(self) -> bool:
        """The call's name has been streamed."""
        return self._args_start is not None

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._text += text
        out: list[dict[str, Any]] = []
        if self._args_start is None:
            match = _CALL_PREFIX.match(self._text)
            if match is None:
                return out
            self._args_start = match.end()
            out.append({"index": 0, "id": self.call_id, "type": "function", "function": {"name": match.group(1), "arguments": ""}})
        return out + self._arguments(len(self._text) - 1)

    def finish(self, complete: bool) -> list[dict[str, Any]]:
        """The rest of the arguments (without the closing brace when the call is complete)."""
        if self._args_start is None:
            return []
        end = len(self._text)
        if complete:
            end = len(self._text.rstrip()) - 1
        return self._arguments(end)

    def _arguments(self, end: int) -> list[dict[str, Any]]:
        assert self._args_start is not None
        start = self._args_start + self._sent
        if end <= start:
            return []
        self._sent = end - self._args_start
        return [{"index": 0, "function": {"arguments": self._text[start:end]}}]


def chat_message(text: str, finish_reason: str, plan: ToolCallPlan | None) -> tuple[ChatResponseMessage, str]:
    """The response message of one choice and its finish reason."""
    call = parse_tool_call(text) if plan is not None and finish_reason == "stop" else None
    if call is None:
        return ChatResponseMessage(role="assistant", content=text), finish_reason
    name, arguments = call
    out = ToolCallOut.model_validate({"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}})
    return ChatResponseMessage(role="assistant", content=None, tool_calls=[out]), plan.finish_reason


def tool_call_deltas(streamer: ToolCallStreamer, event: Any, plan: ToolCallPlan | None) -> list[ChatDelta]:
    """The chunk deltas of one ``ChoiceEvent`` of a tool-call choice (text that is not a call,
    e.g. cut by max_tokens before the name, is not sent)."""
    parts = streamer.feed(event.text) if event.text else []
    if event.finish_reason is not None:
        parts += streamer.finish(complete=event.finish_reason == "stop")
    return [ChatDelta(tool_calls=[ToolCallOut.model_validate(part)]) for part in parts]
