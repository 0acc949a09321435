"""Engine ``TokenLogprob``s in OpenAI's two logprob shapes (chat and legacy completions)."""

from __future__ import annotations

from typing import Any

from server.api.protocol import ChatChoiceLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from server.engine.outputs import TokenLogprob


def token_text(tokenizer: Any, token_id: int) -> str:
    """The text of one token on its own (a partial UTF-8 character shows as U+FFFD)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer: Any, entries: list[TokenLogprob], top_n: int) -> ChatChoiceLogprobs:
    """``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for entry in entries:
        text = token_text(tokenizer, entry.token_id)
        top = [
            TopLogprob(token=(t := token_text(tokenizer, tid)), logprob=lp, bytes=list(t.encode()))
            for tid, lp in entry.top[:top_n]
        ]
        content.append(ChatTokenLogprob(token=text, logprob=entry.logprob, bytes=list(text.encode()), top_logprobs=top))
    return ChatChoiceLogprobs(content=content)


def completion_logprobs(
    tokenizer: Any, entries: list[TokenLogprob], top_n: int, text_offset: int
) -> CompletionLogprobs:
    """``{tokens, token_logprobs, top_logprobs, text_offset}``; offsets start at ``text_offset``."""
    tokens, values, tops, offsets = [], [], [], []
    offset = text_offset
    for entry in entries:
        text = token_text(tokenizer, entry.token_id)
        tokens.append(text)
        values.append(entry.logprob)
        tops.append({token_text(tokenizer, tid): lp for tid, lp in entry.top[:top_n]} if top_n else None)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops if top_n else None, text_offset=offsets
    )
