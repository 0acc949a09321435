"""``response_format`` -> the grammar a request's output must follow.

OpenAI's ``{"type": "text"}`` (no grammar), ``{"type": "json_object"}`` (any JSON object)
and ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``; plus two
extensions that llguidance gives for free: ``{"type": "regex", "regex": "..."}`` and
``{"type": "grammar", "grammar": "<Lark grammar>"}``. Whether the grammar itself is valid is
decided when the engine compiles it (a 400 naming ``response_format`` as well).
"""

from __future__ import annotations

from typing import Any

from server.api.errors import bad_request
from server.engine.grammar import GrammarSpec

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")


def _refuse(message: str) -> Exception:
    return bad_request(f"response_format: {message}", param="response_format")


def _string_field(value: dict[str, Any], name: str) -> str:
    text = value.get(name)
    if not isinstance(text, str) or not text:
        raise _refuse(f"type '{value['type']}' needs a non-empty string '{name}'.")
    return text


def grammar_of_response_format(value: Any) -> GrammarSpec | None:
    """The grammar of a ``response_format`` value (None for absent or text); 400 if malformed."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMAT_TYPES:
        raise _refuse(f"expected an object whose 'type' is one of {', '.join(RESPONSE_FORMAT_TYPES)}.")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "regex":
        return GrammarSpec("regex", _string_field(value, "regex"))
    if kind == "grammar":
        return GrammarSpec("lark", _string_field(value, "grammar"))
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _refuse("type 'json_schema' needs a 'json_schema' object.")
    schema = spec.get("schema")
    if schema is None:
        return GrammarSpec("json_object")
    if not isinstance(schema, dict):
        raise _refuse("'json_schema.schema' must be a JSON Schema object.")
    return GrammarSpec.json_schema(schema)
