"""Stop strings over streamed text: never emit any part of a stop string.

Text that could be the beginning of a stop string is held back until the next text
decides it; when a stop string appears, the text is cut right before it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopResult:
    text: str  # text that is safe to emit now
    stopped: bool = False  # a stop string was found; nothing after ``text`` may be emitted


class StopStringMatcher:
    """Feeds text through a hold-back buffer and reports the first stop string."""

    def __init__(self, stop_strings: list[str]) -> None:
        self._stops = [s for s in stop_strings if s]
        self._held = ""
        self.stopped = False
        self._emitted_chars = 0  # length of all text returned so far
        self.stop_end: int | None = None  # once stopped: offset just past the stop string in the full text

    def feed(self, text: str) -> StopResult:
        """Add ``text``; return what can be emitted now."""
        if self.stopped:
            return StopResult("", True)
        if not self._stops:
            return StopResult(text)
        buffer = self._held + text
        found = [(i, len(s)) for i, s in ((buffer.find(s), s) for s in self._stops) if i >= 0]
        if found:
            cut, length = min(found)
            self.stopped = True
            self._held = ""
            self.stop_end = self._emitted_chars + cut + length
            return self._emit(buffer[:cut], stopped=True)
        keep = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return self._emit(buffer[: len(buffer) - keep])

    def _emit(self, text: str, stopped: bool = False) -> StopResult:
        self._emitted_chars += len(text)
        return StopResult(text, stopped)

    def flush(self) -> str:
        """At the end of the request: the held-back text was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
