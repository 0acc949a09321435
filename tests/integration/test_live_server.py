"""The real stack in-process (Metrics + AsyncEngine(LLMEngine) + create_app + uvicorn on
loopback, assembled as ``server/api/serve.py`` does it), driven over HTTP with the official
``openai`` client and httpx. No fake engine: every token comes from the model.

Covered: the client end to end in all three modes (sync/async, stream or not, chat and
completions, our fields through ``extra_body``); 64 concurrent mixed-mode requests equal
to the same requests sent one at a time; client disconnects (stream closed mid-way,
non-streaming client timeout) abort the engine request and give every KV page back; the
Prometheus metrics agree with the ``usage`` the responses reported.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.engine.modes import work_kind_names
from tests.integration.checkpoint import PROMPTS
from tests.integration.conftest import SERVED_NAME, Stack, model_dir_for, wait_until

MODE_FIELDS: dict[str, dict[str, Any]] = {
    "ar": {"mode": "ar"},
    "diffusion": {"mode": "diffusion", "refine_steps": 4},
    "self_spec": {"mode": "self_spec"},
}
MODES = list(MODE_FIELDS)
# which forward-pass kinds each mode may use besides the prompt's prefill (the embedded
# model's diffusion defaults to lookahead: its prompt's last pass and commits propose blocks)
KINDS_OF_MODE = {"ar": {"decode"}, "diffusion": {"denoise", "commit", "prefill_lookahead", "commit_lookahead"},
                 "self_spec": {"draft", "verify"}}
LONG = 4000  # max_tokens of a request that is still running when the test disconnects


@pytest.fixture(scope="module", params=["tiny", "default"])
def stack(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> Iterator[Stack]:
    """The live server; ``stack.exact`` is True for the fixture checkpoint, whose greedy
    completions always run to max_tokens (see checkpoint.py)."""
    s = Stack(model_dir_for(request.param, tiny_checkpoint), SERVED_NAME).start()
    s.exact = request.param == "tiny"  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        s.stop()


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics, parsed with prometheus_client's parser: (sample name, labels) -> value."""
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    """Sum over the series of ``name`` matching ``labels`` of after - before."""
    want = set(labels.items())
    return sum(v - before.get(key, 0.0) for key, v in after.items() if key[0] == name and want <= key[1])


def check_result(stack: Stack, mode: str, text: str, finish: str | None, usage: dict[str, Any], max_tokens: int) -> None:
    """One choice's text, finish reason and usage (with our extension)."""
    assert finish in ("stop", "length")
    n = usage["completion_tokens"]
    if finish == "length":
        assert n == max_tokens
    else:
        assert 0 <= n <= max_tokens
    if stack.exact:  # type: ignore[attr-defined]
        assert finish == "length" and text, (finish, text)
    assert usage["total_tokens"] == usage["prompt_tokens"] + n and usage["prompt_tokens"] > 0
    by_kind = usage["forward_passes_by_kind"]
    assert usage["forward_passes"] == sum(by_kind.values()) > 0
    assert usage["tokens_per_forward"] == pytest.approx(n / usage["forward_passes"])
    used = {k for k, v in by_kind.items() if v}
    assert by_kind.get("prefill", 0) + by_kind.get("prefill_lookahead", 0) >= 1
    assert used - {"prefill"} <= KINDS_OF_MODE[mode], (mode, by_kind)
    if n > 1:
        assert used - {"prefill"}, (mode, by_kind)
    assert ("mean_acceptance_length" in usage) == (mode == "self_spec")
    if mode == "self_spec" and by_kind.get("verify"):
        assert usage["mean_acceptance_length"] >= 1.0


# --------------------------------------------------------------------------- openai client


def _usage(obj: Any) -> dict[str, Any]:
    return obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)


def run_sync(stack: Stack, endpoint: str, stream: bool, prompt: str, max_tokens: int, fields: dict[str, Any]) -> tuple[str, str | None, dict]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        if endpoint == "chat":
            if not stream:
                r = client.chat.completions.create(
                    model=SERVED_NAME, messages=messages(prompt), max_tokens=max_tokens, temperature=0,  # type: ignore[arg-type]
                    extra_body=fields,
                )
                assert r.object == "chat.completion" and r.model == SERVED_NAME
                return r.choices[0].message.content or "", r.choices[0].finish_reason, _usage(r.usage)
            chunks = list(client.chat.completions.create(
                model=SERVED_NAME, messages=messages(prompt), max_tokens=max_tokens, temperature=0, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True}, extra_body=fields,
            ))
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            if not stream:
                r = client.completions.create(
                    model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=fields
                )
                assert r.object == "text_completion"
                return r.choices[0].text, r.choices[0].finish_reason, _usage(r.usage)
            chunks = list(client.completions.create(
                model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body=fields,
            ))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    return text, finishes[0], _usage(chunks[-1].usage)


async def run_async(client: openai.AsyncOpenAI, endpoint: str, stream: bool, prompt: str, max_tokens: int,
                    fields: dict[str, Any]) -> tuple[str, str | None, dict]:
    if endpoint == "chat":
        if not stream:
            r = await client.chat.completions.create(
                model=SERVED_NAME, messages=messages(prompt), max_tokens=max_tokens, temperature=0,  # type: ignore[arg-type]
                extra_body=fields,
            )
            return r.choices[0].message.content or "", r.choices[0].finish_reason, _usage(r.usage)
        s = await client.chat.completions.create(
            model=SERVED_NAME, messages=messages(prompt), max_tokens=max_tokens, temperature=0, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}, extra_body=fields,
        )
        chunks = [c async for c in s]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        if not stream:
            r = await client.completions.create(
                model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=fields
            )
            return r.choices[0].text, r.choices[0].finish_reason, _usage(r.usage)
        s = await client.completions.create(
            model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=fields,
        )
        chunks = [c async for c in s]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    return text, finishes[0], _usage(chunks[-1].usage)


def async_client(stack: Stack, timeout: float = 60) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=timeout)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("mode", MODES)
def test_openai_client_all_variants(stack: Stack, mode: str, endpoint: str) -> None:
    """Sync and async, streaming and not: a valid answer, and the same one every time (temperature 0)."""
    fields = MODE_FIELDS[mode]
    max_tokens = 13  # not a multiple of the block size (8)
    results = {}
    for stream in (False, True):
        results[("sync", stream)] = run_sync(stack, endpoint, stream, PROMPTS[0], max_tokens, fields)

    async def both() -> list[tuple[str, str | None, dict]]:
        async with async_client(stack) as client:
            return list(await asyncio.gather(
                run_async(client, endpoint, False, PROMPTS[0], max_tokens, fields),
                run_async(client, endpoint, True, PROMPTS[0], max_tokens, fields),
            ))

    results[("async", False)], results[("async", True)] = asyncio.run(both())
    for (kind, stream), (text, finish, usage) in results.items():
        check_result(stack, mode, text, finish, usage, max_tokens)
    texts = {key: r[0] for key, r in results.items()}
    assert len(set(texts.values())) == 1, texts
    assert len({r[2]["completion_tokens"] for r in results.values()}) == 1


@pytest.mark.parametrize("mode", MODES)
def test_stop_string_finishes_with_stop(stack: Stack, mode: str) -> None:
    """A stop string taken from the middle of the greedy answer cuts it there: finish_reason stop."""
    text, finish, _ = run_sync(stack, "completions", False, PROMPTS[1], 24, MODE_FIELDS[mode])
    candidates = [text[k:k + 2] for k in range(len(text) // 3, len(text) - 2)]
    stop = next((c for c in candidates if "\ufffd" not in c and c.strip()), None)
    if stop is None:
        pytest.skip(f"no usable stop string in {text!r}")
    expected = text[: text.find(stop)]
    for stream in (False, True):
        got, finish, usage = run_sync(stack, "completions", stream, PROMPTS[1], 24, {**MODE_FIELDS[mode], "stop": [stop]})
        assert finish == "stop" and got == expected, (stop, text, got)
        assert usage["completion_tokens"] <= 24


def test_stop_string_finish_is_counted_as_stop(stack: Stack) -> None:
    if not stack.exact:  # type: ignore[attr-defined]
        pytest.skip("needs the fixture checkpoint's predictable output")
    text, _, _ = run_sync(stack, "completions", False, PROMPTS[1], 24, MODE_FIELDS["ar"])
    stop = next((text[k:k + 2] for k in range(len(text) // 3, len(text) - 2)
                 if "\ufffd" not in text[k:k + 2] and text[k:k + 2].strip()), None)
    if stop is None:
        pytest.skip(f"no usable stop string in {text!r}")
    before = scrape(stack.url)
    _, finish, _ = run_sync(stack, "completions", False, PROMPTS[1], 24, {**MODE_FIELDS["ar"], "stop": [stop]})
    after = scrape(stack.url)
    assert finish == "stop"
    assert delta(before, after, "nld_request_success_total", mode="ar", finished_reason="stop") == 1
    assert delta(before, after, "nld_num_aborted_requests_total", mode="ar") == 0


# --------------------------------------------------------------------------- concurrency


def mixed_requests(n: int) -> list[dict[str, Any]]:
    reqs = []
    for i in range(n):
        mode = MODES[i % 3]
        reqs.append(dict(
            endpoint="chat" if (i // 3) % 2 == 0 else "completions",
            stream=(i // 6) % 2 == 1,
            prompt=PROMPTS[i % len(PROMPTS)] + (" again" * (i % 4)),
            max_tokens=6 + (i * 7) % 15,
            fields=MODE_FIELDS[mode],
            mode=mode,
        ))
    return reqs


def test_64_concurrent_mixed_equal_sequential(stack: Stack) -> None:
    reqs = mixed_requests(64)
    engine = stack.engine

    async def send_all(concurrent: bool) -> list[tuple[str, str | None, dict]]:
        async with async_client(stack, timeout=180) as client:
            calls = [run_async(client, r["endpoint"], r["stream"], r["prompt"], r["max_tokens"], r["fields"]) for r in reqs]
            if concurrent:
                return list(await asyncio.gather(*calls))
            return [await c for c in calls]

    steps0 = engine.num_steps
    t0 = time.monotonic()
    together = asyncio.run(send_all(True))
    t_together, steps_together = time.monotonic() - t0, engine.num_steps - steps0
    t0 = time.monotonic()
    one_by_one = asyncio.run(send_all(False))
    t_one, steps_one = time.monotonic() - t0, engine.num_steps - steps0 - steps_together
    print(f"64 mixed requests: concurrent {t_together:.2f} s / {steps_together} steps, "
          f"sequential {t_one:.2f} s / {steps_one} steps")
    for r, (text, finish, usage) in zip(reqs, together):
        check_result(stack, r["mode"], text, finish, usage, r["max_tokens"])
    mismatches = [
        (i, r["mode"], a[0], b[0]) for i, (r, a, b) in enumerate(zip(reqs, together, one_by_one))
        if (a[0], a[1], a[2]["completion_tokens"]) != (b[0], b[1], b[2]["completion_tokens"])
    ]
    assert not mismatches, mismatches[:5]
    assert steps_together < steps_one / 4, "the concurrent requests were not batched"
    assert wait_until(lambda: engine.kv.num_free_pages == engine.kv.num_pages, 5)


# --------------------------------------------------------------------------- disconnects


def _wait_released(stack: Stack, free_before: int, timeout: float = 15) -> None:
    engine = stack.engine
    ok = wait_until(lambda: not engine.requests and engine.kv.num_free_pages == free_before
                    and stack.async_engine.num_unfinished == 0, timeout)
    assert ok, (len(engine.requests), engine.kv.num_free_pages, free_before, stack.async_engine.num_unfinished)


@pytest.mark.parametrize("mode", MODES)
def test_stream_closed_midway_aborts_and_frees_pages(stack: Stack, mode: str) -> None:
    engine = stack.engine
    assert wait_until(lambda: not engine.requests, 10)
    free_before = engine.kv.num_free_pages
    assert free_before == engine.kv.num_pages
    before = scrape(stack.url)
    body = {"model": SERVED_NAME, "messages": messages(PROMPTS[2]), "max_tokens": LONG, "stream": True,
            "ignore_eos": True, **MODE_FIELDS[mode]}
    chunks = 0
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{stack.url}/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    assert chunk["choices"][0]["finish_reason"] is None, "finished before the disconnect"
                    chunks += 1
                    if chunks == 3:
                        break
            in_use = engine.kv.num_pages - engine.kv.num_free_pages
            assert len(engine.requests) == 1 and in_use > 0
        # leaving the block closes the connection mid-stream
    _wait_released(stack, free_before)
    after = scrape(stack.url)
    assert delta(before, after, "nld_num_aborted_requests_total", mode=mode) == 1
    assert delta(before, after, "nld_request_success_total", mode=mode, finished_reason="abort") == 1
    assert delta(before, after, "nld_request_success_total", mode=mode) == 1
    assert after[("nld_num_requests_running", frozenset({("model", SERVED_NAME)}))] == 0
    assert after[("nld_kv_cache_usage_perc", frozenset({("model", SERVED_NAME)}))] == 0


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_non_streaming_client_timeout_aborts(stack: Stack, mode: str) -> None:
    engine = stack.engine
    assert wait_until(lambda: not engine.requests, 10)
    free_before = engine.kv.num_free_pages
    before = scrape(stack.url)
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=1.0) as client:
        with pytest.raises(openai.APITimeoutError):
            client.completions.create(
                model=SERVED_NAME, prompt=PROMPTS[3], max_tokens=LONG, temperature=0,
                extra_body={**MODE_FIELDS[mode], "ignore_eos": True},
            )
    _wait_released(stack, free_before)
    after = scrape(stack.url)
    assert delta(before, after, "nld_num_aborted_requests_total", mode=mode) == 1
    assert delta(before, after, "nld_request_success_total", mode=mode, finished_reason="abort") == 1
    # the engine really worked on it before the abort
    assert delta(before, after, "nld_forward_passes_total", mode=mode) > 1


# --------------------------------------------------------------------------- metrics


def test_metrics_agree_with_usage(stack: Stack) -> None:
    engine = stack.engine
    assert wait_until(lambda: not engine.requests, 10)
    before = scrape(stack.url)
    reqs = [r for r in mixed_requests(18)]

    async def send_all() -> list[tuple[str, str | None, dict]]:
        async with async_client(stack) as client:
            return list(await asyncio.gather(*(
                run_async(client, r["endpoint"], r["stream"], r["prompt"], r["max_tokens"], r["fields"]) for r in reqs
            )))

    results = asyncio.run(send_all())
    after = scrape(stack.url)
    per_mode: dict[str, dict[str, Any]] = {m: defaultdict(float) for m in MODES}
    for r, (_, finish, usage) in zip(reqs, results):
        agg = per_mode[r["mode"]]
        agg["n"] += 1
        agg[f"finish_{finish}"] += 1
        agg["completion_tokens"] += usage["completion_tokens"]
        agg["prompt_tokens"] += usage["prompt_tokens"]
        agg["tpf_sum"] += usage["tokens_per_forward"]
        for kind, count in usage["forward_passes_by_kind"].items():
            agg[f"kind_{kind}"] += count
    for mode, agg in per_mode.items():
        assert agg["n"] == 6
        d = lambda name, **lab: delta(before, after, name, mode=mode, model=SERVED_NAME, **lab)  # noqa: E731
        assert d("nld_generation_tokens_total") == agg["completion_tokens"], mode
        assert d("nld_prompt_tokens_total") == agg["prompt_tokens"], mode
        assert d("nld_request_tokens_per_forward_count") == agg["n"], mode
        assert d("nld_request_tokens_per_forward_sum") == pytest.approx(agg["tpf_sum"]), mode
        for kind in work_kind_names():
            assert d("nld_forward_passes_total", kind=kind) == agg[f"kind_{kind}"], (mode, kind)
        for reason in ("stop", "length"):
            assert d("nld_request_success_total", finished_reason=reason) == agg[f"finish_{reason}"], (mode, reason)
        assert d("nld_request_success_total", finished_reason="abort") == 0
        assert d("nld_num_aborted_requests_total") == 0
        assert d("nld_e2e_request_latency_seconds_count") == agg["n"]
        assert d("nld_time_to_first_token_seconds_count") == agg["n"]
        if mode == "self_spec":  # one acceptance length per draft/verify cycle
            assert d("nld_spec_decode_acceptance_length_count") == agg["kind_verify"] > 0
        if mode == "diffusion":  # one observation per finished block, each at most refine_steps passes
            blocks = d("nld_diffusion_denoising_steps_per_block_count")
            assert blocks > 0
            # a denoise step is a denoise pass, or a commit pass whose guessed seed was right
            steps = d("nld_diffusion_denoising_steps_per_block_sum")
            assert steps <= agg["kind_denoise"] + agg["kind_commit_lookahead"]
    # the token-weighted TPF by mode, as the dashboards compute it, is the usage's
    for mode, agg in per_mode.items():
        passes = delta(before, after, "nld_forward_passes_total", mode=mode)
        assert delta(before, after, "nld_generation_tokens_total", mode=mode) / passes == pytest.approx(
            agg["completion_tokens"] / sum(v for k, v in agg.items() if k.startswith("kind_"))
        )
