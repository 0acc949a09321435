"""``python -m server`` as operators run it (a subprocess on the tiny checkpoint, with
``--api-key``): readiness while loading, the API key, request ids, and the SIGTERM drain
(/ready turns 503, the in-flight stream completes, the process exits 0)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from tests.integration.checkpoint import PROMPTS
from tests.integration.conftest import SERVED_NAME, ServerProcess, launch_server

API_KEY = "sk-integration-key"
DRAIN_TIMEOUT = 60.0
LONG_TOKENS = 1500  # AR: several seconds of streaming on the CPU


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = launch_server(tiny_checkpoint, tmp_path_factory.mktemp("lifecycle") / "server.log",
                         "--drain-timeout", str(DRAIN_TIMEOUT), api_key=API_KEY)
    try:
        proc.wait_ready()
        print(f"\npython -m server: /ready 200 after {proc.ready_after_s:.2f} s "
              f"(seen before: {proc.statuses_before_ready})")
        yield proc
    finally:
        proc.stop()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def test_ready_only_after_load(server: ServerProcess) -> None:
    assert server.ready_after_s is not None and server.ready_after_s > 0
    # before the first 200 the server either refused connections or answered 503 (loading)
    assert server.statuses_before_ready, "no status was seen before ready"
    assert all(s.startswith("refused") or s == "503" for s in server.statuses_before_ready), server.statuses_before_ready
    r = httpx.get(f"{server.url}/ready", timeout=5)
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_api_key_enforced_ops_open(server: ServerProcess) -> None:
    with httpx.Client(timeout=10) as client:
        for path in ("/health", "/ready", "/metrics", "/version"):
            assert client.get(f"{server.url}{path}").status_code == 200, path
        assert "nld_generation_tokens_total" in client.get(f"{server.url}/metrics").text
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions",
                                       {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}]})):
                r = client.request(method, f"{server.url}{path}", headers=headers, json=body)
                assert r.status_code == 401, (path, headers, r.text)
                err = r.json()["error"]
                assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
                assert set(err) <= {"message", "type", "param", "code"}
        r = client.get(f"{server.url}/v1/models", headers=auth())
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [SERVED_NAME]
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0, timeout=10) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=30) as good:
        resp = good.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=5,
            extra_body={"mode": "self_spec"},
        )
        assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 5  # type: ignore[union-attr]


def test_request_id_echoed(server: ServerProcess) -> None:
    with httpx.Client(timeout=30) as client:
        r = client.get(f"{server.url}/health", headers={"X-Request-Id": "it-health-1"})
        assert r.headers["x-request-id"] == "it-health-1"
        r = client.get(f"{server.url}/v1/models", headers={"X-Request-Id": "it-denied-2"})
        assert r.status_code == 401 and r.headers["x-request-id"] == "it-denied-2"
        body = {"model": SERVED_NAME, "prompt": PROMPTS[1], "max_tokens": 4, "mode": "diffusion"}
        r = client.post(f"{server.url}/v1/completions", json=body, headers={**auth(), "X-Request-Id": "it-gen-3"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "it-gen-3"
        with client.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                           headers={**auth(), "X-Request-Id": "it-stream-4"}) as s:
            assert s.status_code == 200 and s.headers["x-request-id"] == "it-stream-4"
            s.read()
        generated = client.get(f"{server.url}/health").headers.get("x-request-id")
        assert generated and generated != "it-health-1"


class StreamReader(threading.Thread):
    """Reads a streaming chat completion to its end, recording every SSE data line."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[str] = []
        self.first_content = threading.Event()
        self.error: BaseException | None = None
        self.status: int | None = None
        self.finished_at: float | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(120, connect=10)) as client:
                with client.stream("POST", f"{self.url}/v1/chat/completions", json=self.body, headers=auth()) as resp:
                    self.status = resp.status_code
                    for line in resp.iter_lines():
                        if line.startswith("data: "):
                            self.events.append(line[6:])
                            if '"content"' in line:
                                self.first_content.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.first_content.set()


def test_sigterm_drains_in_flight_stream_then_exits_0(server: ServerProcess) -> None:
    """Last in the module: it ends the server."""
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": LONG_TOKENS,
            "stream": True, "stream_options": {"include_usage": True}, "mode": "ar", "temperature": 0}
    reader = StreamReader(server.url, body)
    reader.start()
    assert reader.first_content.wait(60) and reader.error is None, reader.error
    t_signal = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)

    # /ready turns 503 while the stream is still running; new generation requests are refused
    with httpx.Client(timeout=5) as client:
        deadline = time.monotonic() + 10
        ready = None
        while time.monotonic() < deadline:
            ready = client.get(f"{server.url}/ready")
            if ready.status_code == 503:
                break
            time.sleep(0.05)
        assert ready is not None and ready.status_code == 503 and ready.json() == {"status": "draining"}
        refused = client.post(f"{server.url}/v1/completions", headers=auth(),
                              json={"model": SERVED_NAME, "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert client.get(f"{server.url}/health").status_code == 200
    assert reader.is_alive(), "the in-flight request ended before the drain could be observed"
    assert server.proc.poll() is None

    reader.join(DRAIN_TIMEOUT + 10)
    assert not reader.is_alive() and reader.error is None, reader.error
    assert reader.status == 200 and reader.events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in reader.events[:-1]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == LONG_TOKENS

    rc = server.proc.wait(DRAIN_TIMEOUT + 10)
    t_exit = time.monotonic()
    assert reader.finished_at is not None
    print(f"\nSIGTERM -> stream done {reader.finished_at - t_signal:.2f} s -> exit {t_exit - t_signal:.2f} s (rc {rc})")
    assert rc == 0, server.log()[-4000:]
    assert t_exit - t_signal < DRAIN_TIMEOUT
