"""Unit tests of the text machinery: incremental detokenization and stop strings."""

from __future__ import annotations

from typing import Any

import pytest

from server.api.detokenize import IncrementalDetokenizer
from server.api.stop import StopStringMatcher
from tests.api.fake_engine import SENTENCES, byte_token_ids


def test_detokenizer_never_splits_a_character(tokenizer: Any) -> None:
    text = "h\u00e9llo \u65e5\u672c \u2713!"
    ids = byte_token_ids(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([t]) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_detokenizer_matches_full_decode(tokenizer: Any, chunk: int) -> None:
    ids = tokenizer.encode(" ".join(SENTENCES), add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    out = "".join(detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)) + detok.flush()
    assert out == tokenizer.decode(ids, skip_special_tokens=True)


def test_detokenizer_flush_emits_incomplete_tail(tokenizer: Any) -> None:
    ids = byte_token_ids(tokenizer, "a\u00e9")[:-1]  # 'a' + first byte of 'é'
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(ids) == ""  # text ending in U+FFFD is held back whole
    assert detok.flush() == "a\ufffd"


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    out = []
    for piece in pieces:
        result = matcher.feed(piece)
        out.append(result.text)
        if result.stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_string_split_across_pieces_never_leaks() -> None:
    out, stopped = feed_all(StopStringMatcher(["STOP"]), ["abc S", "T", "O", "P tail"])
    assert stopped and "".join(out) == "abc "
    assert all("S" not in piece for piece in out)


def test_stop_prefix_that_does_not_complete_is_released() -> None:
    out, stopped = feed_all(StopStringMatcher(["STOP"]), ["abc ST", "AR", "t"])
    assert not stopped and "".join(out) == "abc STARt"
    assert out[0] == "abc "  # 'ST' held back until decided


def test_earliest_of_several_stops_wins() -> None:
    out, stopped = feed_all(StopStringMatcher(["yz", "b"]), ["axyzb"])
    assert stopped and "".join(out) == "ax"


def test_held_prefix_at_end_is_flushed() -> None:
    out, stopped = feed_all(StopStringMatcher(["dog.x"]), ["the dog", "."])
    assert not stopped and "".join(out) == "the dog."
