"""Prompts to token ids, and the context-length budget.

Chat messages go through the tokenizer's chat template (with the generation prompt);
legacy-completion prompts may be text, a list of texts, token ids or a list of token-id lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.api.errors import APIError, bad_request
from server.api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, TextContentPart
from server.api.tool_messages import render_message, template_tool_kwargs

MAX_PROMPTS = 16


@dataclass(frozen=True)
class Prompt:
    """One tokenized prompt; ``text`` is its text form (for ``echo``). ``images`` fill its
    image placeholder tokens in order (vision-language models)."""

    token_ids: list[int]
    text: str
    images: tuple[Any, ...] = ()


def _message_text(message: ChatMessage, image_text: str) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text if isinstance(part, TextContentPart) else image_text for part in content)


def _check_message(index: int, message: ChatMessage) -> None:
    """OpenAI's rules: content is required except on an assistant turn with tool calls;
    ``tool_calls`` only on assistant turns, ``tool_call_id`` required on tool turns."""
    param = f"messages[{index}]"
    if message.tool_calls is not None and message.role != "assistant":
        raise bad_request("Only assistant messages may carry 'tool_calls'.", param=f"{param}.tool_calls")
    if message.role == "tool" and not message.tool_call_id:
        raise bad_request("A message with role 'tool' needs a 'tool_call_id'.", param=f"{param}.tool_call_id")
    if message.content is None and not (message.role == "assistant" and message.tool_calls):
        raise bad_request(f"Message {index} has no 'content'.", param=f"{param}.content")


def _messages_for_template(messages: list[ChatMessage], template: str, image_text: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        _check_message(index, message)
        role = "system" if message.role == "developer" else message.role
        out.append(render_message(role, _message_text(message, image_text), message, template))
    return out


def chat_prompt(tokenizer: Any, request: ChatCompletionRequest, image_text: str = "") -> Prompt:
    """Apply the chat template (``add_generation_prompt=True``) and tokenize the result.
    Each image part is rendered as ``image_text`` (the image token, expanded later)."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("This model has no chat template; use /v1/completions.", param="messages")
    messages = _messages_for_template(request.messages, tokenizer.chat_template, image_text)
    try:
        text = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=False,
            **template_tool_kwargs(request, tokenizer.chat_template),
        )
    except Exception as exc:  # jinja2 TemplateError (e.g. the template refuses a role order)
        raise bad_request(f"The chat template could not render these messages: {exc}", param="messages") from exc
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise bad_request("The rendered prompt is empty.", param="messages")
    return Prompt(ids, text)


def completion_prompts(tokenizer: Any, request: CompletionRequest) -> list[Prompt]:
    """The prompts of a legacy-completions request (one choice set per prompt)."""
    raw = request.prompt
    items: list[str | list[int]]
    if isinstance(raw, str):
        items = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [list(raw)]  # type: ignore[arg-type]
    else:
        items = list(raw)  # type: ignore[arg-type]
    if not items:
        raise bad_request("prompt must not be empty.", param="prompt")
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"At most {MAX_PROMPTS} prompts per request.", param="prompt")
    vocab = len(tokenizer)
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = list(tokenizer.encode(item, add_special_tokens=True))
            text = item
        else:
            if any(not 0 <= t < vocab for t in item):
                raise bad_request(f"prompt contains a token id outside the vocabulary [0, {vocab}).", param="prompt")
            ids = list(item)
            text = tokenizer.decode(ids, skip_special_tokens=False)
        if not ids:
            raise bad_request("prompt must not be empty.", param="prompt")
        prompts.append(Prompt(ids, text))
    return prompts


def context_length_error(max_model_len: int, prompt_len: int, max_tokens: int | None, param: str) -> APIError:
    """OpenAI's 400 ``context_length_exceeded``."""
    if max_tokens is None:
        asked = f"{prompt_len} tokens in the prompt, which leaves no room for a completion"
    else:
        asked = f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion)"
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested {asked}. "
        "Please reduce the length of the prompt or of the completion.",
        param=param,
        code="context_length_exceeded",
    )


def resolve_max_tokens(
    requested: int | None, prompt_len: int, max_model_len: int, default_cap: int, prompt_param: str
) -> int:
    """The completion budget: as requested if it fits, else the remaining context (capped)."""
    remaining = max_model_len - prompt_len
    if remaining < 1:
        raise context_length_error(max_model_len, prompt_len, None, prompt_param)
    if requested is None:
        return min(remaining, default_cap)
    if requested > remaining:
        raise context_length_error(max_model_len, prompt_len, requested, "max_tokens")
    return requested
