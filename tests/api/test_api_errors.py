"""Every error case: status, OpenAI error shape, ``param`` and ``code``."""

from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import pytest

from server.engine.client import EngineDeadError
from server.engine.params import ParamError
from tests.api.conftest import API_KEY, LiveServer, http, wait_until

CHAT = {"model": "fake-nld", "messages": [{"role": "user", "content": "hello"}]}
COMP = {"model": "fake-nld", "prompt": "hello"}


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] is None or isinstance(err["code"], str)
    return err


def post(server: LiveServer, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return http().post(server.url + path, json=body, timeout=20, **kwargs)


@pytest.mark.parametrize(
    "path,patch,param",
    [
        ("/v1/chat/completions", {"mode": "turbo"}, "mode"),
        ("/v1/chat/completions", {"refine_steps": 0, "mode": "diffusion"}, "refine_steps"),
        ("/v1/chat/completions", {"n": 0}, "n"),
        ("/v1/chat/completions", {"temperature": 2.5}, "temperature"),
        ("/v1/chat/completions", {"temperature": -0.1}, "temperature"),
        ("/v1/chat/completions", {"top_p": 0}, "top_p"),
        ("/v1/chat/completions", {"max_tokens": "5"}, "max_tokens"),
        ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
        ("/v1/chat/completions", {"model": 7}, "model"),
        ("/v1/chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/chat/completions", {"stop": [""]}, "stop"),
        ("/v1/chat/completions", {"seed": -1}, "seed"),
        ("/v1/chat/completions", {"policy": "random", "mode": "diffusion"}, "policy"),
        ("/v1/chat/completions", {"threshold": 1.5, "mode": "diffusion"}, "threshold"),
        ("/v1/chat/completions", {"block_length": 5000, "mode": "diffusion"}, "block_length"),
        ("/v1/chat/completions", {"lookahead": "sometimes", "mode": "diffusion"}, "lookahead"),
        ("/v1/chat/completions", {"guess_seed": "often", "mode": "diffusion"}, "guess_seed"),
        ("/v1/chat/completions", {"confidence": "entropy", "mode": "diffusion"}, "confidence"),
        ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/completions", {"prompt": 12}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ],
)
def test_validation_errors_are_400(server: LiveServer, path: str, patch: dict[str, Any], param: str) -> None:
    base = CHAT if "chat" in path else COMP
    err = error_of(post(server, path, {**base, **patch}), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert server.engine.submitted == []


@pytest.mark.parametrize(
    "path,patch,param",
    [
        ("/v1/chat/completions", {"mode": "ar", "refine_steps": 4}, "refine_steps"),
        ("/v1/chat/completions", {"mode": "self_spec", "refine_steps": 4}, "refine_steps"),
        ("/v1/chat/completions", {"mode": "self_spec", "threshold": 0.5}, "threshold"),
        ("/v1/chat/completions", {"mode": "ar", "policy": "leftmost"}, "policy"),
        ("/v1/chat/completions", {"mode": "ar", "block_length": 8}, "block_length"),
        ("/v1/chat/completions", {"mode": "ar", "draft_length": 3}, "draft_length"),
        ("/v1/chat/completions", {"mode": "diffusion", "draft_length": 3}, "draft_length"),
        ("/v1/chat/completions", {"mode": "ar", "lookahead": True}, "lookahead"),
        ("/v1/chat/completions", {"mode": "self_spec", "lookahead": False}, "lookahead"),
        ("/v1/chat/completions", {"mode": "ar", "guess_seed": True}, "guess_seed"),
        ("/v1/chat/completions", {"mode": "ar", "confidence": "margin"}, "confidence"),
        ("/v1/chat/completions", {"mode": "diffusion", "logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"mode": "self_spec", "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ("/v1/completions", {"mode": "diffusion", "logprobs": 0}, "logprobs"),
        ("/v1/completions", {"echo": True, "logprobs": 1}, "echo"),
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),  # auto
            ("/v1/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {"mode": "diffusion", "presence_penalty": 0.5}, "presence_penalty"),
            ("/v1/completions", {"mode": "diffusion", "repetition_penalty": 1.2}, "repetition_penalty"),
            ("/v1/chat/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
            ("/v1/chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
            ("/v1/chat/completions", {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
            ("/v1/chat/completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
        ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
            ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}}, "response_format"),
            ("/v1/chat/completions", {"response_format": {"type": "regex"}}, "response_format"),
    ],
)
def test_options_a_mode_cannot_honour_are_refused(server: LiveServer, path: str, patch: dict[str, Any], param: str) -> None:
    base = CHAT if "chat" in path else COMP
    err = error_of(post(server, path, {**base, **patch}), 400)
    assert err["param"] == param and param in err["message"]


def test_harmless_and_unknown_fields_are_accepted(server: LiveServer) -> None:
    body = {
        **CHAT, "frobnicate": {"x": 1}, "presence_penalty": 0, "logit_bias": {}, "user": "u1",
        "mode": "diffusion", "logprobs": False, "metadata": {"a": "b"},
    }
    assert post(server, "/v1/chat/completions", body).status_code == 200


def test_malformed_json_is_400(server: LiveServer) -> None:
    r = http().post(server.url + "/v1/chat/completions", content=b'{"model": "fake-nld", "messages": [', headers={"content-type": "application/json"})
    assert error_of(r, 400)["code"] == "invalid_json"
    r = http().post(server.url + "/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    error_of(r, 400)
    r = http().post(server.url + "/v1/completions", content=b"", headers={"content-type": "application/json"})
    error_of(r, 400)


def test_context_length_exceeded(server: LiveServer) -> None:
    max_len = server.engine.max_model_len
    err = error_of(post(server, "/v1/completions", {**COMP, "prompt": [5] * max_len}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert str(max_len) in err["message"]
    err = error_of(post(server, "/v1/completions", {**COMP, "prompt": [5] * 100, "max_tokens": max_len - 99}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    err = error_of(post(server, "/v1/chat/completions", {**CHAT, "max_completion_tokens": max_len}), 400)
    assert err["code"] == "context_length_exceeded"
    # exactly fitting is fine, and the default budget is the remaining context
    assert post(server, "/v1/completions", {**COMP, "prompt": [5] * 100, "max_tokens": max_len - 100}).status_code == 200
    assert post(server, "/v1/completions", {**COMP, "prompt": [5] * (max_len - 3)}).status_code == 200
    assert server.engine.submitted[-1][2].sampling.max_tokens == 3


def test_unknown_model_is_404(server: LiveServer) -> None:
    err = error_of(post(server, "/v1/chat/completions", {**CHAT, "model": "gpt-9"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    error_of(http().get(server.url + "/v1/models/gpt-9"), 404)


def test_unknown_route_and_wrong_method(server: LiveServer) -> None:
    assert error_of(http().get(server.url + "/v1/nothing"), 404)["code"] == "not_found"
    r = http().get(server.url + "/v1/chat/completions")
    assert error_of(r, 405)["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]
    error_of(http().delete(server.url + "/v1/models"), 405)


def test_api_key(secured_server: LiveServer) -> None:
    url = secured_server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": f"bearer  {API_KEY}x"}):
        r = http().post(url + "/v1/chat/completions", json=CHAT, headers=headers)
        assert error_of(r, 401)["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        assert "x-request-id" in r.headers
    error_of(http().get(url + "/v1/models"), 401)
    good = {"Authorization": f"Bearer {API_KEY}"}
    assert http().post(url + "/v1/chat/completions", json=CHAT, headers=good).status_code == 200
    assert http().get(url + "/v1/models", headers=good).status_code == 200
    for open_path in ("/health", "/ready", "/metrics", "/version"):
        assert http().get(url + open_path).status_code == 200, open_path


def test_default_mode_and_refine_steps_of_the_server(secured_server: LiveServer) -> None:
    good = {"Authorization": f"Bearer {API_KEY}"}
    assert http().post(secured_server.url + "/v1/completions", json=COMP, headers=good).status_code == 200
    params = secured_server.engine.submitted[-1][2]
    assert params.decode.mode == "diffusion" and params.decode.refine_steps is None  # the engine fills it
    resolved: Any = secured_server.engine.resolved[-1]
    assert resolved.decode.mode == "diffusion" and resolved.decode.refine_steps == 2


def _chunked(data: bytes, size: int = 1000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_body_too_large_is_413(secured_server: LiveServer) -> None:
    url = secured_server.url + "/v1/completions"
    good = {"Authorization": f"Bearer {API_KEY}"}
    big = {"model": "fake-nld", "prompt": "x" * 5000}
    err = error_of(http().post(url, json=big, headers=good), 413)  # by Content-Length
    assert err["code"] == "request_too_large"
    # no Content-Length (chunked): the body itself is measured
    data = json.dumps(big).encode()
    r = http().post(url, content=_chunked(data), headers={**good, "content-type": "application/json"})
    assert "content-length" not in r.request.headers
    error_of(r, 413)
    # just under the limit is fine
    small = {"model": "fake-nld", "prompt": [5] * 1000, "max_tokens": 4}
    assert 3000 < len(json.dumps(small)) < 4096
    assert http().post(url, json=small, headers=good).status_code == 200


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_queue_full_is_503_with_retry_after(server: LiveServer, lazy: bool, stream: bool) -> None:
    server.engine.knobs.queue_full = True
    server.engine.knobs.lazy_errors = lazy
    r = post(server, "/v1/chat/completions", {**CHAT, "stream": stream, "n": 2})
    err = error_of(r, 503)
    assert err["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
    assert wait_until(lambda: server.engine.kv_pages_free() == server.engine.kv_pages_total())


@pytest.mark.parametrize("stream", [False, True])
def test_engine_value_error_is_400_with_its_message(server: LiveServer, stream: bool) -> None:
    server.engine.knobs.generate_exc = ParamError("block_length", "block_length 64 does not divide the context window")
    err = error_of(post(server, "/v1/completions", {**COMP, "stream": stream}), 400)
    assert err["message"] == "block_length 64 does not divide the context window"
    assert err["param"] == "block_length"  # carried by the exception, not parsed from its text
    server.engine.knobs.generate_exc = ValueError("draft_length of the context window is odd")
    err = error_of(post(server, "/v1/completions", {**COMP, "stream": stream}), 400)
    assert err["message"] == "draft_length of the context window is odd" and err["param"] is None


@pytest.mark.parametrize("exc", [RuntimeError("kaboom /secret/path"), EngineDeadError("engine loop died")])
def test_internal_fault_is_500_and_server_keeps_serving(server: LiveServer, exc: Exception) -> None:
    server.engine.knobs.generate_exc = exc
    err = error_of(post(server, "/v1/chat/completions", CHAT), 500)
    assert "secret" not in err["message"]
    server.engine.knobs.generate_exc = None
    assert post(server, "/v1/chat/completions", CHAT).status_code == 200
    assert http().get(server.url + "/health").status_code == 200


def test_draining_refuses_new_work(server: LiveServer) -> None:
    assert http().get(server.url + "/ready").status_code == 200
    server.app.state.begin_drain()
    try:
        r = http().get(server.url + "/ready")
        assert r.status_code == 503 and r.json() == {"status": "draining"}
        r = post(server, "/v1/chat/completions", CHAT)
        assert error_of(r, 503)["code"] == "draining" and "retry-after" in r.headers
        assert http().get(server.url + "/health").status_code == 200
    finally:
        server.app.state.draining = False


def test_ready_follows_the_engine(server: LiveServer) -> None:
    server.engine.knobs.ready = False
    assert http().get(server.url + "/ready").status_code == 503
    models = http().get(server.url + "/v1/models")  # still answers while the model loads
    assert models.status_code == 200 and models.json()["data"][0]["max_model_len"] is None
    r = post(server, "/v1/chat/completions", CHAT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
    server.engine.knobs.ready = True
    assert http().get(server.url + "/v1/models").json()["data"][0]["max_model_len"] == server.engine.max_model_len
    assert http().get(server.url + "/ready").json() == {"status": "ready"}


def test_content_parts_and_roles(server: LiveServer) -> None:
    messages = [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again", "name": "bob"},
    ]
    assert post(server, "/v1/chat/completions", {**CHAT, "messages": messages}).status_code == 200
    prompt = server.engine.tokenizer.decode(server.engine.submitted[-1][1])
    assert "<|im_start|>system\nBe terse." in prompt and "part one\npart two" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_non_json_content_type_is_400(server: LiveServer) -> None:
    r = http().post(server.url + "/v1/chat/completions", content=b'{"model": "fake-nld"}', headers={"content-type": "text/plain"})
    error_of(r, 400)
