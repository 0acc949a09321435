"""Incremental detokenization that never splits a UTF-8 character.

Each call decodes a small window of the token list (a few tokens already emitted, for
context, plus the new ones) and emits only the new suffix, once it is stable: text that ends
in U+FFFD (an incomplete byte sequence) is held back until the next tokens complete it, or
until ``flush`` at the end of the request.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"
_CONTEXT_TOKENS = 4  # tokens kept before the new ones so word-boundary spaces decode right


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # tokens before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _pending(self) -> tuple[str, str]:
        emitted = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        window = self._decode(self.token_ids[self._prefix_offset :])
        return emitted, window

    def _advance(self) -> None:
        self._read_offset = len(self.token_ids)
        self._prefix_offset = max(self._prefix_offset, self._read_offset - _CONTEXT_TOKENS)

    def add(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the newly stable text (possibly empty)."""
        self.token_ids.extend(new_token_ids)
        if not new_token_ids:
            return ""
        emitted, window = self._pending()
        if window.endswith(REPLACEMENT_CHAR) or not window.startswith(emitted):
            return ""
        self._advance()
        return window[len(emitted) :]

    def tokens_covering(self, num_chars: int) -> int:
        """The fewest leading tokens whose text is at least ``num_chars`` long (all of them if
        none is): how many tokens a request used to produce its first ``num_chars`` characters."""
        lo, hi = 1, len(self.token_ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._decode(self.token_ids[:mid])) >= num_chars:
                hi = mid
            else:
                lo = mid + 1
        return hi

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD)."""
        emitted, window = self._pending()
        self._advance()
        if window.startswith(emitted):
            return window[len(emitted) :]
        return window  # pragma: no cover - decoder not prefix-stable; best effort
