"""The official ``openai`` client (sync and async, streaming and not) against a live server,
in all three modes, with our extensions sent through ``extra_body``."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.api.conftest import LiveServer

MODES: list[tuple[str, dict[str, Any]]] = [
    ("ar", {}),
    ("diffusion", {"refine_steps": 3}),
    ("self_spec", {}),
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something nice."}]


def expected(server: LiveServer, index: int = -1) -> tuple[str, str, int]:
    """Text, finish reason and token count the fake produced for its ``index``-th request."""
    _, prompt_ids, params = server.engine.submitted[index]
    ids, reason = server.engine.answer_ids(prompt_ids, params)
    return server.engine.tokenizer.decode(ids, skip_special_tokens=True), reason, len(ids)


def check_submitted(server: LiveServer, mode: str, extra: dict[str, Any]) -> None:
    _, _, params = server.engine.submitted[-1]
    assert params.decode.mode == mode
    assert params.decode.refine_steps == extra.get("refine_steps")


def check_usage_extension(usage: Any, mode: str, completion_tokens: int) -> None:
    extra = usage.model_extra or {}
    assert usage.completion_tokens == completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert extra["forward_passes"] == sum(extra["forward_passes_by_kind"].values()) > 0
    assert extra["tokens_per_forward"] == pytest.approx(completion_tokens / extra["forward_passes"])
    assert ("mean_acceptance_length" in extra) == (mode == "self_spec")


def sync_client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=20)


def async_client(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=20)


@pytest.mark.parametrize("mode,extra", MODES)
def test_sync_chat(server: LiveServer, mode: str, extra: dict[str, Any]) -> None:
    with sync_client(server) as client:
        resp = client.chat.completions.create(
            model="fake-nld", messages=MESSAGES, max_tokens=64, extra_body={"mode": mode, **extra}  # type: ignore[arg-type]
        )
    check_submitted(server, mode, extra)
    text, reason, count = expected(server)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == "fake-nld"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == text and resp.choices[0].finish_reason == reason
    check_usage_extension(resp.usage, mode, count)


@pytest.mark.parametrize("mode,extra", MODES)
def test_sync_chat_stream(server: LiveServer, mode: str, extra: dict[str, Any]) -> None:
    with sync_client(server) as client:
        stream = client.chat.completions.create(
            model="fake-nld", messages=MESSAGES, max_tokens=64, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}, extra_body={"mode": mode, **extra},
        )
        chunks = list(stream)
    check_submitted(server, mode, extra)
    text, reason, count = expected(server)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    check_usage_extension(chunks[-1].usage, mode, count)


@pytest.mark.parametrize("mode,extra", MODES)
def test_sync_completion(server: LiveServer, mode: str, extra: dict[str, Any]) -> None:
    with sync_client(server) as client:
        resp = client.completions.create(model="fake-nld", prompt="Once upon a time", max_tokens=5, extra_body={"mode": mode, **extra})
    check_submitted(server, mode, extra)
    text, reason, count = expected(server)
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert resp.choices[0].text == text and resp.choices[0].finish_reason == reason == "length"
    check_usage_extension(resp.usage, mode, count)


@pytest.mark.parametrize("mode,extra", MODES)
def test_sync_completion_stream(server: LiveServer, mode: str, extra: dict[str, Any]) -> None:
    with sync_client(server) as client:
        chunks = list(
            client.completions.create(
                model="alias/fake", prompt="Once upon a time", max_tokens=40, stream=True, extra_body={"mode": mode, **extra}
            )
        )
    check_submitted(server, mode, extra)
    text, reason, _ = expected(server)
    assert all(c.model == "alias/fake" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [reason]


@pytest.mark.parametrize("mode,extra", MODES)
def test_async_chat_and_completion(server: LiveServer, mode: str, extra: dict[str, Any]) -> None:
    async def run() -> None:
        async with async_client(server) as client:
            resp = await client.chat.completions.create(
                model="fake-nld", messages=MESSAGES, extra_body={"mode": mode, **extra}  # type: ignore[arg-type]
            )
            check_submitted(server, mode, extra)
            text, reason, count = expected(server)
            assert resp.choices[0].message.content == text and resp.choices[0].finish_reason == reason
            check_usage_extension(resp.usage, mode, count)

            stream = await client.chat.completions.create(
                model="fake-nld", messages=MESSAGES, stream=True, extra_body={"mode": mode, **extra}  # type: ignore[arg-type]
            )
            pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            assert "".join(pieces) == expected(server)[0]

            comp = await client.completions.create(
                model="fake-nld", prompt=[[5, 6, 7, 8]], max_tokens=50, extra_body={"mode": mode, **extra}
            )
            assert comp.choices[0].text == expected(server)[0]

            stream2 = await client.completions.create(
                model="fake-nld", prompt="abc", max_tokens=50, stream=True, extra_body={"mode": mode, **extra}
            )
            assert "".join([c.choices[0].text async for c in stream2]) == expected(server)[0]

    asyncio.run(run())


def test_models_listing(server: LiveServer) -> None:
    with sync_client(server) as client:
        models = client.models.list()
        assert [m.id for m in models.data] == ["fake-nld", "alias/fake"]
        assert client.models.retrieve("alias/fake").id == "alias/fake"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("nope")


def test_n_choices_and_seeds(server: LiveServer) -> None:
    with sync_client(server) as client:
        resp = client.chat.completions.create(model="fake-nld", messages=MESSAGES, n=3, seed=11, temperature=0.7)  # type: ignore[arg-type]
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    seeds = sorted(p.sampling.seed for _, _, p in server.engine.submitted)
    assert seeds == [11, 12, 13]
    for i, choice in enumerate(resp.choices):
        assert choice.message.content == expected(server, i)[0]
    assert resp.usage is not None and resp.usage.completion_tokens == sum(expected(server, i)[2] for i in range(3))


def test_multiple_prompts_with_n(server: LiveServer) -> None:
    with sync_client(server) as client:
        resp = client.completions.create(model="fake-nld", prompt=["first", "second prompt"], n=2, max_tokens=30, seed=1)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    prompt_lens = {len(ids) for _, ids, _ in server.engine.submitted}
    assert resp.usage is not None and resp.usage.prompt_tokens == sum(prompt_lens)


def test_logprobs_in_ar_mode(server: LiveServer) -> None:
    with sync_client(server) as client:
        chat = client.chat.completions.create(
            model="fake-nld", messages=MESSAGES, logprobs=True, top_logprobs=2, max_tokens=6  # type: ignore[arg-type]
        )
        comp = client.completions.create(model="fake-nld", prompt="hello", logprobs=2, max_tokens=6)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == 6 and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    lp = comp.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == 6 and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == comp.choices[0].text


def test_echo_prepends_prompt(server: LiveServer) -> None:
    with sync_client(server) as client:
        resp = client.completions.create(model="fake-nld", prompt="Echo me:", echo=True, max_tokens=4)
        stream = list(client.completions.create(model="fake-nld", prompt="Echo me:", echo=True, max_tokens=4, stream=True))
    assert resp.choices[0].text.startswith("Echo me:")
    assert "".join(c.choices[0].text for c in stream) == resp.choices[0].text


def test_client_sees_api_errors(server: LiveServer) -> None:
    with sync_client(server) as client:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="fake-nld", messages=MESSAGES, extra_body={"mode": "ar", "refine_steps": 4})  # type: ignore[arg-type]
    assert err.value.status_code == 400
    body: Any = err.value.body
    assert body["param"] == "refine_steps" and body["type"] == "invalid_request_error"
