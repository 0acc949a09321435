"""A replica that cannot serve says so (issue 16, item 4): a failed load exits non-zero
with a one-line reason; a killed engine thread turns /health to 503, ends in-flight
requests with an error (streams get an error frame, JSON calls a 500) and ends the process."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.checkpoint import PROMPTS
from tests.integration.conftest import ROOT, SERVED_NAME, SUBPROCESS_ENV, ServerProcess, Stack, free_port, wait_until

EXIT_LOAD_FAILED, EXIT_ENGINE_DIED = 3, 4
KILLER = Path(__file__).with_name("kill_engine.py")


def _env() -> dict[str, str]:
    env = {**os.environ, **SUBPROCESS_ENV}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_failed_load_exits_nonzero_with_one_line_reason(tiny_checkpoint: Path) -> None:
    """What a new user tries: a KV pool smaller than the context length."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--model", str(tiny_checkpoint), "--port", str(free_port()),
         "--kv-cache-tokens", "64", "--max-model-len", "512", "--log-level", "warning"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == EXIT_LOAD_FAILED, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("nld-server: error: model failed to load:") and "max_model_len" in last, proc.stderr
    assert "Traceback" not in proc.stderr  # a configuration error needs no traceback
    print(f"\nfailed load: exit {proc.returncode} after {elapsed:.2f} s: {last}")


def _long_chat(stream: bool) -> dict[str, Any]:
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 1500,
            "ignore_eos": True, "stream": stream, "mode": "ar", "temperature": 0}


class Call(threading.Thread):
    """One request in the background: the status code and the SSE data lines or JSON body."""

    def __init__(self, url: str, stream: bool) -> None:
        super().__init__(daemon=True)
        self.url, self.stream = url, stream
        self.status: int | None = None
        self.events: list[str] = []
        self.body: Any = None
        self.started = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(60, connect=10)) as client:
                if self.stream:
                    with client.stream("POST", f"{self.url}/v1/chat/completions", json=_long_chat(True)) as resp:
                        self.status = resp.status_code
                        for line in resp.iter_lines():
                            if line.startswith("data: "):
                                self.events.append(line[6:])
                                self.started.set()
                else:
                    self.started.set()
                    resp = client.post(f"{self.url}/v1/chat/completions", json=_long_chat(False))
                    self.status, self.body = resp.status_code, resp.json()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.started.set()


def _assert_ended_with_error(stream: Call, plain: Call) -> None:
    for call in (stream, plain):
        call.join(30)
        assert not call.is_alive(), "a request was left hanging after the engine died"
        assert call.error is None, call.error
    assert stream.status == 200 and stream.events[-1] == "[DONE]"
    assert '"error"' in stream.events[-2] and "engine thread died" in stream.events[-2], stream.events[-3:]
    assert plain.status == 500 and plain.body["error"]["type"] == "internal_server_error", plain.body


def test_killed_engine_thread_fails_health_and_requests_in_process(tiny_checkpoint: Path) -> None:
    stack = Stack(tiny_checkpoint, SERVED_NAME).start()
    try:
        assert httpx.get(f"{stack.url}/health").status_code == 200
        stream, plain = Call(stack.url, True), Call(stack.url, False)
        stream.start()
        plain.start()
        assert stream.started.wait(60) and wait_until(lambda: len(stack.engine.requests) >= 2, 30)
        thread = next(t for t in threading.enumerate() if t.name == "engine")
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))
        _assert_ended_with_error(stream, plain)
        thread.join(10)
        health = httpx.get(f"{stack.url}/health")
        assert health.status_code == 503 and health.json() == {"status": "failed"}
        assert httpx.get(f"{stack.url}/ready").status_code == 503
        late = httpx.post(f"{stack.url}/v1/completions", json={"model": SERVED_NAME, "prompt": "x", "max_tokens": 2})
        assert late.status_code >= 500  # never accepted and left hanging
    finally:
        stack.stop()


def test_killed_engine_thread_ends_the_process(tmp_path: Path, tiny_checkpoint: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(KILLER), "--model", str(tiny_checkpoint), "--port", str(port),
             "--served-model-name", SERVED_NAME, "--log-level", "warning"],
            cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT,
        )
    server = ServerProcess(proc, port, log, time.monotonic())
    try:
        server.wait_ready()
        stream, plain = Call(server.url, True), Call(server.url, False)
        stream.start()
        plain.start()
        assert stream.started.wait(60)
        time.sleep(0.3)  # let the JSON request be admitted too
        t_kill = time.monotonic()
        proc.send_signal(signal.SIGUSR1)
        _assert_ended_with_error(stream, plain)
        rc = proc.wait(30)
        print(f"\nengine thread killed -> process exit {rc} after {time.monotonic() - t_kill:.2f} s")
        assert rc == EXIT_ENGINE_DIED, server.log()[-3000:]
        assert server.log().strip().splitlines()[-1].startswith("nld-server: error: engine thread died")
    finally:
        server.stop()
