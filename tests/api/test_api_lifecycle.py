"""Request lifecycle: disconnects abort, concurrency, request ids, ops endpoints."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from tests.api.conftest import LiveServer, http, wait_until

CHAT = {"model": "fake-nld", "messages": [{"role": "user", "content": "hello"}]}


def pages_back(server: LiveServer) -> bool:
    return wait_until(lambda: server.engine.kv_pages_free() == server.engine.kv_pages_total(), timeout=5)


def test_streaming_disconnect_aborts_and_frees_pages(server: LiveServer) -> None:
    engine = server.engine
    initial = engine.kv_pages_free()
    assert initial == engine.kv_pages_total()
    engine.knobs.step_delay = 0.05
    body = {**CHAT, "stream": True, "ignore_eos": True, "max_tokens": 500, "n": 2}
    seen = 0
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if '"content":"' in line and '"role"' not in line:
                    seen += 1
                if seen >= 3:
                    assert engine.kv_pages_free() < initial  # still generating
                    break  # (leaving iter_lines early closes the connection)
    assert pages_back(server)
    assert sorted(engine.aborted) == sorted(rid for rid, _, _ in engine.submitted)
    assert engine.running == {}


def test_streaming_disconnect_before_first_output(server: LiveServer) -> None:
    server.engine.knobs.first_delay = 0.6  # longer than the 0.2 s admission wait
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", server.url + "/v1/completions", json={"model": "fake-nld", "prompt": "x", "stream": True}) as resp:
            next(resp.iter_lines())  # headers and the first frame are there; then leave
    assert pages_back(server)
    assert server.engine.aborted == [server.engine.submitted[0][0]]


def test_non_streaming_disconnect_aborts(server: LiveServer) -> None:
    engine = server.engine
    engine.knobs.step_delay = 0.05
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"model": "fake-nld", "prompt": "x", "ignore_eos": True, "max_tokens": 400}, timeout=0.4)
    assert pages_back(server)
    assert engine.aborted == [engine.submitted[0][0]]


def test_raw_socket_close_mid_stream(server: LiveServer) -> None:
    """The crudest client: write a request, read a little, close the socket."""
    server.engine.knobs.step_delay = 0.05
    body = json.dumps({"model": "fake-nld", "prompt": "x", "stream": True, "ignore_eos": True, "max_tokens": 300}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head + body)
        data = b""
        while data.count(b"data: ") < 3:
            data += sock.recv(4096)
    assert pages_back(server)
    assert len(server.engine.aborted) == 1


def test_64_concurrent_requests_match_sequential(server: LiveServer) -> None:
    modes = ["ar", "diffusion", "self_spec"]

    def body(i: int) -> dict:
        if i % 2:
            return {"model": "fake-nld", "prompt": f"prompt number {i}", "mode": modes[i % 3], "max_tokens": 12 + i % 5}
        return {**CHAT, "messages": [{"role": "user", "content": f"question {i}"}], "mode": modes[i % 3], "stream": i % 4 == 0}

    def text_of(resp_json: dict) -> str:
        choice = resp_json["choices"][0]
        return choice["text"] if "text" in choice else choice["message"]["content"]

    async def one(client: httpx.AsyncClient, i: int) -> str:
        b = body(i)
        path = "/v1/completions" if "prompt" in b else "/v1/chat/completions"
        if not b.get("stream"):
            r = await client.post(server.url + path, json=b)
            assert r.status_code == 200, r.text
            return text_of(r.json())
        pieces = []
        async with client.stream("POST", server.url + path, json=b) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    pieces.extend(c["delta"].get("content") or "" for c in choices)
        return "".join(pieces)

    async def run(concurrent: bool) -> list[str]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            if concurrent:
                return list(await asyncio.gather(*(one(client, i) for i in range(64))))
            return [await one(client, i) for i in range(64)]

    server.engine.knobs.step_delay = 0.001
    sequential = asyncio.run(run(False))
    concurrent = asyncio.run(run(True))
    assert all(sequential) and concurrent == sequential
    assert len(set(sequential)) > 3
    assert pages_back(server)


def test_request_id_honoured_or_generated(server: LiveServer) -> None:
    r = http().post(server.url + "/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "my-req-42"})
    assert r.headers["x-request-id"] == "my-req-42"
    r = http().post(server.url + "/v1/chat/completions", json=CHAT)
    generated = r.headers["x-request-id"]
    assert len(generated) >= 16
    assert http().post(server.url + "/v1/chat/completions", json=CHAT).headers["x-request-id"] != generated
    r = http().get(server.url + "/nope", headers={"X-Request-Id": "err-1"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "err-1"
    r = http().get(server.url + "/health", headers={"X-Request-Id": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces"


def test_ops_endpoints(server: LiveServer) -> None:
    assert http().get(server.url + "/health").json() == {"status": "ok"}
    assert http().get(server.url + "/version").json() == {"version": "9.9.9-test"}
    r = http().get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "fake_test_requests_total 1.0" in r.text
    models = http().get(server.url + "/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0] == {
        "id": "fake-nld", "object": "model", "created": models["data"][0]["created"], "owned_by": "nld-server",
        "root": "fake-nld", "max_model_len": 1024,
    }


@pytest.mark.parametrize("mode,kinds", [("ar", {"prefill", "decode"}), ("diffusion", {"prefill", "denoise", "commit"}), ("self_spec", {"prefill", "draft", "verify"})])
def test_usage_forward_pass_accounting(server: LiveServer, mode: str, kinds: set[str]) -> None:
    r = http().post(server.url + "/v1/completions", json={"model": "fake-nld", "prompt": "abc", "mode": mode, "max_tokens": 9, "ignore_eos": True})
    usage = r.json()["usage"]
    assert {k for k, v in usage["forward_passes_by_kind"].items() if v} == kinds
    assert usage["completion_tokens"] == 9
    assert usage["tokens_per_forward"] == pytest.approx(9 / usage["forward_passes"])
    if mode == "self_spec":
        _, prompt_ids, _ = server.engine.submitted[-1]
        sizes = server.engine.chunk_sizes(server.engine.resolved[-1], 9, prompt_ids)
        assert usage["mean_acceptance_length"] == pytest.approx(sum(sizes) / len(sizes))
    else:
        assert "mean_acceptance_length" not in usage


def test_server_stays_responsive_while_streaming(server: LiveServer) -> None:
    server.engine.knobs.step_delay = 0.05
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", server.url + "/v1/completions", json={"model": "fake-nld", "prompt": "x", "stream": True, "ignore_eos": True, "max_tokens": 40}) as resp:
            lines = resp.iter_lines()
            next(lines)
            start = time.monotonic()
            assert http().get(server.url + "/health").status_code == 200
            assert time.monotonic() - start < 1.0
            assert list(lines)[-2] == "data: [DONE]"
