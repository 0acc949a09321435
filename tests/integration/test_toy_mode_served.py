"""The toy fourth mode (``tests/engine/toy_mode.py``), registered from this test module alone,
served end to end by the real stack: HTTP request -> API checks -> engine -> usage and
Prometheus series. Nothing in ``server/`` names it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import pytest

from server.engine.modes import register, unregister
from tests.engine.toy_mode import FixedStrideMode
from tests.integration.checkpoint import PROMPTS
from tests.integration.conftest import SERVED_NAME, Stack

TOY = FixedStrideMode.name


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path) -> Iterator[Stack]:
    register(FixedStrideMode())  # before the app and its metrics are built, as a built-in mode would be
    s = Stack(tiny_checkpoint, SERVED_NAME)
    try:
        s.start(max_model_len=256, kv_cache_tokens=2048)
        yield s
    finally:
        s.stop()
        unregister(TOY)


def complete(stack: Stack, **fields: object) -> httpx.Response:
    body = {"model": SERVED_NAME, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "ignore_eos": True, **fields}
    return httpx.post(f"{stack.url}/v1/completions", json=body, timeout=120)


def test_toy_mode_is_served_end_to_end(stack: Stack) -> None:
    toy, ar = complete(stack, mode=TOY), complete(stack, mode="ar")
    assert toy.status_code == 200 and ar.status_code == 200, (toy.text, ar.text)
    assert toy.json()["choices"][0]["text"] == ar.json()["choices"][0]["text"]  # the same tokens as ar
    usage = toy.json()["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["forward_passes_by_kind"]["restride"] == 11 and usage["forward_passes_by_kind"]["decode"] == 0
    metrics = httpx.get(f"{stack.url}/metrics", timeout=10).text
    assert f'nld_generation_tokens_total{{mode="{TOY}",model="{SERVED_NAME}"}} 12.0' in metrics
    assert f'nld_forward_passes_total{{kind="restride",mode="{TOY}",model="{SERVED_NAME}"}} 11.0' in metrics


def test_toy_mode_fields_are_refused_by_the_registry(stack: Stack) -> None:
    r = complete(stack, mode=TOY, block_length=4)
    assert r.status_code == 400 and r.json()["error"]["param"] == "block_length", r.text
    r = complete(stack, mode=TOY, logprobs=1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
    r = complete(stack, mode="no_such_mode")
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode"
    assert TOY in r.json()["error"]["message"]
