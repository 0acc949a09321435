"""Tool turns of a conversation, as the chat template gets them.

A template that knows tools (it mentions ``tool_calls``) gets OpenAI's structure: assistant
messages with ``tool_calls`` (arguments parsed to objects, as Hugging Face templates
expect), ``tool`` messages with their ``tool_call_id``, and the ``tools`` list. A template
that does not (the embedded model's) would drop them, so they are folded into text it does
render: an assistant turn's calls become the JSON the server itself generates for calls
(``{"name": ..., "arguments": {...}}`` per line), and a tool result becomes a user turn
introduced by ``Tool result (<id>):``.
"""

from __future__ import annotations

import json
from typing import Any

from server.api.protocol import ChatCompletionRequest, ChatMessage


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tool_calls" in str(template)


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def render_message(role: str, text: str, message: ChatMessage, template: str | None) -> dict[str, Any]:
    """The template's view of one (already checked) message."""
    calls = message.tool_calls or []
    if template_knows_tools(template):
        out: dict[str, Any] = {"role": role, "content": text if message.content is not None else None}
        if calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in calls
            ]
        if message.tool_call_id is not None:
            out["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            out["name"] = message.name
        return out
    if role == "tool":
        return {"role": "user", "content": f"Tool result ({message.tool_call_id}): {text}"}
    if calls:
        lines = [json.dumps({"name": c.function.name, "arguments": _arguments(c.function.arguments)}) for c in calls]
        text = "\n".join(([text] if text else []) + lines)
    return {"role": role, "content": text}


def template_tool_kwargs(request: ChatCompletionRequest, template: str | None) -> dict[str, Any]:
    """``tools=[...]`` for a template that renders them (OpenAI's tool list as given)."""
    tools = (request.model_extra or {}).get("tools")
    if tools and template_knows_tools(template) and isinstance(tools, list):
        return {"tools": tools}
    return {}
