"""Wire-level tests of the SSE rules, reading raw lines with httpx."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.api.conftest import LiveServer, http, wait_until
from tests.api.fake_engine import byte_token_ids

CHAT = {"model": "fake-nld", "messages": [{"role": "user", "content": "Tell me a story."}]}
FOX = " The quick brown fox jumps over the lazy dog."


def stream_lines(server: LiveServer, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[str]:
    """All non-empty lines of an SSE response (asserting the framing on the way)."""
    with http().stream("POST", server.url + path, json=body, headers=headers) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    assert raw.endswith("\n\n")
    frames = raw.split("\n\n")[:-1]
    assert all(frame.count("\n") == 0 for frame in frames), "one line per frame"
    return frames


def payloads(lines: list[str]) -> list[Any]:
    """Decoded ``data:`` payloads; ``[DONE]`` stays a string; comments are dropped."""
    out: list[Any] = []
    for line in lines:
        if line.startswith(":"):
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def content_of(chunks: list[Any], index: int = 0) -> list[str]:
    return [
        c["choices"][0]["delta"].get("content", "")
        for c in chunks
        if isinstance(c, dict) and c.get("choices") and c["choices"][0]["index"] == index
    ]


def test_chat_stream_order_and_usage(server: LiveServer) -> None:
    lines = stream_lines(server, "/v1/chat/completions", {**CHAT, "stream": True, "n": 2, "stream_options": {"include_usage": True}})
    chunks = payloads(lines)
    assert chunks[-1] == "[DONE]" and lines[-1] == "data: [DONE]"
    body = chunks[:-1]
    # role chunk per choice first, content "" and no finish reason
    for i in range(2):
        assert body[i]["choices"] == [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
    # exactly one finish chunk per choice, after all of its content
    for i in range(2):
        finishes = [k for k, c in enumerate(body) if c["choices"] and c["choices"][0]["index"] == i and c["choices"][0]["finish_reason"]]
        assert len(finishes) == 1
        later = [c for c in body[finishes[0] + 1 :] if c["choices"] and c["choices"][0]["index"] == i]
        assert later == []
        assert body[finishes[0]]["choices"][0]["delta"] == {}
    # usage: last chunk, empty choices; every other chunk has usage null
    assert body[-1]["choices"] == [] and body[-1]["usage"]["total_tokens"] > 0
    assert all("usage" in c and c["usage"] is None for c in body[:-1])
    assert len({c["id"] for c in body}) == 1 and body[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in body)


def test_no_usage_key_without_include_usage(server: LiveServer) -> None:
    chunks = payloads(stream_lines(server, "/v1/chat/completions", {**CHAT, "stream": True}))
    assert all("usage" not in c for c in chunks[:-1])
    assert all(c["choices"] for c in chunks[:-1])


@pytest.mark.parametrize("mode,size", [("diffusion", 4), ("self_spec", None), ("ar", 1)])
def test_one_delta_per_engine_output(server: LiveServer, mode: str, size: int | None) -> None:
    script = server.engine.tokenizer.encode(FOX, add_special_tokens=False)
    server.engine.knobs.script = script
    body = {**CHAT, "stream": True, "mode": mode, "max_tokens": 100}
    deltas = [d for d in content_of(payloads(stream_lines(server, "/v1/chat/completions", body))) if d]
    _, prompt_ids, _ = server.engine.submitted[-1]
    sizes = server.engine.chunk_sizes(server.engine.resolved[-1], len(script), prompt_ids)
    if size is not None:
        assert set(sizes[:-1]) == {size}
    assert len(deltas) == len(sizes)
    assert "".join(deltas) == FOX


def test_stop_string_split_across_tokens_never_leaks(server: LiveServer) -> None:
    tok = server.engine.tokenizer
    server.engine.knobs.script = tok.encode(FOX, add_special_tokens=False)
    body = {**CHAT, "stream": True, "stop": ["brown fox", "zzz"], "max_tokens": 100, "stream_options": {"include_usage": True}}
    chunks = payloads(stream_lines(server, "/v1/chat/completions", body))
    deltas = content_of(chunks)
    assert "".join(deltas) == " The quick "
    assert not any("brown" in d or "fox" in d for d in deltas)
    finish = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == ["stop"]
    rid = server.engine.submitted[-1][0]
    assert rid in server.engine.aborted  # the engine request was aborted at the stop string
    assert wait_until(lambda: server.engine.kv_pages_free() == server.engine.kv_pages_total())
    usage = chunks[-2]["usage"]
    assert usage["completion_tokens"] < len(server.engine.knobs.script)


def test_stop_string_in_diffusion_block_is_cut(server: LiveServer) -> None:
    server.engine.knobs.script = server.engine.tokenizer.encode(FOX, add_special_tokens=False)
    body = {**CHAT, "stream": True, "stop": "lazy", "mode": "diffusion", "block_length": 8, "max_tokens": 100}
    assert "".join(content_of(payloads(stream_lines(server, "/v1/chat/completions", body)))) == " The quick brown fox jumps over the "


def test_stop_strings_apply_without_streaming(server: LiveServer) -> None:
    server.engine.knobs.script = server.engine.tokenizer.encode(FOX, add_special_tokens=False)
    r = http().post(server.url + "/v1/completions", json={"model": "fake-nld", "prompt": "x", "stop": ["jumps"], "max_tokens": 100})
    assert r.status_code == 200
    assert r.json()["choices"][0] == {"index": 0, "text": " The quick brown fox ", "logprobs": None, "finish_reason": "stop"}


def test_utf8_never_split_across_deltas(server: LiveServer) -> None:
    text = "h\u00e9llo \u65e5\u672c\u8a9e \u2713"
    server.engine.knobs.script = byte_token_ids(server.engine.tokenizer, text)
    deltas = content_of(payloads(stream_lines(server, "/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 100})))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_keepalive_comments_while_waiting(server: LiveServer) -> None:
    # keep-alive interval of the "main" server is 0.2 s
    server.engine.knobs.first_delay = 0.7
    server.engine.knobs.chunk_override = 100
    lines = stream_lines(server, "/v1/chat/completions", {**CHAT, "stream": True})
    keepalives = [i for i, line in enumerate(lines) if line == ": keep-alive"]
    assert len(keepalives) >= 1
    first_content = next(i for i, line in enumerate(lines) if '"content":"' in line and '"role"' not in line)
    assert keepalives[0] < first_content
    assert lines[-1] == "data: [DONE]"


def test_keepalive_between_outputs(server: LiveServer) -> None:
    server.engine.knobs.step_delay = 0.5
    server.engine.knobs.chunk_override = 6
    lines = stream_lines(server, "/v1/completions", {"model": "fake-nld", "prompt": "x", "stream": True, "max_tokens": 12, "ignore_eos": True})
    texts = [i for i, line in enumerate(lines) if line.startswith("data: {") and '"text":""' not in line]
    assert len(texts) == 2
    assert any(line == ": keep-alive" for line in lines[texts[0] : texts[1]])


def test_error_after_stream_began_sends_error_frame_then_done(server: LiveServer) -> None:
    server.engine.knobs.fail_after = 2
    server.engine.knobs.chunk_override = 1
    chunks = payloads(stream_lines(server, "/v1/chat/completions", {**CHAT, "stream": True, "ignore_eos": True, "max_tokens": 20}))
    assert chunks[-1] == "[DONE]"
    assert set(chunks[-2]) == {"error"}
    assert set(chunks[-2]["error"]) == {"message", "type", "param", "code"}
    assert chunks[-2]["error"]["type"] == "internal_server_error"
    assert len([d for d in content_of(chunks[:-2]) if d]) == 2
    assert not any(c["choices"][0]["finish_reason"] for c in chunks[:-2])
    assert wait_until(lambda: server.engine.kv_pages_free() == server.engine.kv_pages_total())


def test_engine_error_output_becomes_error_frame(server: LiveServer) -> None:
    server.engine.knobs.error_after = 1
    chunks = payloads(stream_lines(server, "/v1/completions", {"model": "fake-nld", "prompt": "x", "stream": True, "max_tokens": 20}))
    assert chunks[-1] == "[DONE]" and "fake engine failure" in chunks[-2]["error"]["message"]


def test_completion_stream_shape(server: LiveServer) -> None:
    body = {"model": "fake-nld", "prompt": "Hi", "stream": True, "echo": True, "stream_options": {"include_usage": True}}
    chunks = payloads(stream_lines(server, "/v1/completions", body))
    assert chunks[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["text"] == "Hi"  # echo first
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks[:-1])
    assert len([c for c in chunks[:-2] if c["choices"][0]["finish_reason"]]) == 1
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["prompt_tokens"] > 0


def test_request_id_echoed_on_streams(server: LiveServer) -> None:
    with http().stream("POST", server.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"X-Request-Id": "abc-123"}) as r:
        assert r.headers["x-request-id"] == "abc-123"
        r.read()


def test_streaming_is_incremental(server: LiveServer) -> None:
    server.engine.knobs.step_delay = 0.15
    server.engine.knobs.chunk_override = 1
    arrivals = []
    start = time.monotonic()
    body = {"model": "fake-nld", "prompt": "x", "stream": True, "max_tokens": 4, "ignore_eos": True}
    with http().stream("POST", server.url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic() - start)
    assert arrivals[-1] - arrivals[0] > 0.3  # chunks were not buffered to the end


def test_stop_string_inside_a_block_counts_only_tokens_up_to_it(server: LiveServer) -> None:
    """A diffusion block may run past the stop string; usage counts the tokens up to the one
    that completes the stop string, not the whole block."""
    tok = server.engine.tokenizer
    script = tok.encode(FOX, add_special_tokens=False)
    server.engine.knobs.script = script
    body = {**CHAT, "stop": "lazy", "mode": "diffusion", "block_length": 32, "max_tokens": 100}
    r = http().post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200
    used = r.json()["usage"]["completion_tokens"]
    stop_end = FOX.index("lazy") + len("lazy")
    expected = next(k for k in range(1, len(script) + 1) if len(tok.decode(script[:k], skip_special_tokens=True)) >= stop_end)
    assert used == expected < len(script)
