"""Fixtures of the integration tests: the REAL engine (no fake) behind the real app.

* ``tiny_checkpoint``: a self-contained checkpoint folder (random tiny NLD model + a BPE
  tokenizer trained on the spot, with a chat template); see ``checkpoint.py``.
* ``start_stack``: the server assembled in-process as ``server/api/serve.py`` does it
  (``Metrics``, ``AsyncEngine`` around ``LLMEngine.from_pretrained``, ``create_app``,
  uvicorn on a loopback port in a thread), so a test can look at ``engine.kv`` directly.
* ``launch_server``: ``python -m server --model DIR --port P`` as a subprocess (what
  operators run), with its log in a file that is printed when something goes wrong.

Everything runs on the CPU with one torch thread (the machine is small and shared).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # so ``tests.integration.checkpoint`` imports however pytest is started
    sys.path.insert(0, str(ROOT))

from tests.integration.checkpoint import write_checkpoint  # noqa: E402

DEFAULT_MODEL_DIR = ROOT / "server" / "default_model"
SERVED_NAME = "tiny-nld"
SUBPROCESS_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny-nld") / "tiny-nld")


# --------------------------------------------------------------------------- in-process


@dataclass
class Stack:
    """The real server, assembled in this process."""

    model_dir: Path
    served_name: str
    async_engine: Any = None
    app: Any = None
    metrics: Any = None
    port: int = 0
    _server: Any = None
    _thread: threading.Thread | None = None
    _threads_before: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self) -> Any:
        """The synchronous ``LLMEngine`` (owned by the engine thread: read, never mutate)."""
        return self.async_engine.engine

    def start(self, **engine_config: Any) -> "Stack":
        import torch
        import uvicorn

        from server import __version__
        from server.api.app import create_app
        from server.config import EngineConfig
        from server.engine.async_engine import AsyncEngine
        from server.engine.engine import LLMEngine
        from server.metrics import Metrics
        from server.model.loader import load_tokenizer

        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(1)
        config = EngineConfig(model=str(self.model_dir), device="cpu", **engine_config)
        self.metrics = Metrics(model_name=self.served_name)
        metrics = self.metrics
        self.async_engine = AsyncEngine(
            lambda: LLMEngine.from_pretrained(config, metrics=metrics), self.served_name,
            tokenizer=load_tokenizer(config.model),
        )
        self.app = create_app(
            self.async_engine,
            served_model_names=[self.served_name],
            api_key=None,
            default_mode=config.default_mode,
            max_body_bytes=4 * 1024 * 1024,
            metrics_registry=self.metrics.registry,
            version=__version__,
        )
        self.async_engine.start()
        if not self.async_engine.wait_loaded(timeout=300):
            raise RuntimeError("the engine did not load")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        uv_config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(uv_config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
        self._thread.start()
        if not wait_until(lambda: self._server.started or not self._thread.is_alive(), 20):
            raise RuntimeError("uvicorn did not start")
        if not self._server.started:
            raise RuntimeError("uvicorn exited at start")
        return self

    def stop(self) -> None:
        import torch

        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.async_engine is not None:
            self.async_engine.shutdown()
        if self._threads_before:
            torch.set_num_threads(self._threads_before)


def model_dir_for(name: str, tiny_checkpoint: Path) -> Path:
    """``tiny`` -> the random fixture checkpoint; ``default`` -> server/default_model (skip if absent)."""
    if name == "tiny":
        return tiny_checkpoint
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("server/default_model/ is absent")
    return DEFAULT_MODEL_DIR


# --------------------------------------------------------------------------- subprocess


@dataclass
class ServerProcess:
    """``python -m server`` running as a child process."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    started_at: float  # time.monotonic() just before Popen
    api_key: str | None = None
    ready_after_s: float | None = None
    statuses_before_ready: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Poll /ready until 200; record what was seen before. Returns seconds since start."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode} before ready:\n{self.log()[-4000:]}")
                try:
                    r = client.get(f"{self.url}/ready")
                except httpx.TransportError as exc:
                    status = f"refused:{type(exc).__name__}"
                else:
                    if r.status_code == 200:
                        self.ready_after_s = time.monotonic() - self.started_at
                        return self.ready_after_s
                    status = str(r.status_code)
                if not self.statuses_before_ready or self.statuses_before_ready[-1] != status:
                    self.statuses_before_ready.append(status)
                time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGINT)  # the second Ctrl-C exits at once
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        return self.proc.returncode


def launch_server(model_dir: Path, log_path: Path, *args: str, api_key: str | None = None) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "server", "--model", str(model_dir), "--port", str(port),
            "--served-model-name", SERVED_NAME, "--log-level", "warning", *args]
    if api_key:
        argv += ["--api-key", api_key]
    env = {**os.environ, **SUBPROCESS_ENV}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the child holds its own descriptor
    return ServerProcess(proc, port, log_path, started, api_key=api_key)


@pytest.fixture(scope="session")
def served(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One ``python -m server`` process on the tiny checkpoint, shared by the bench and
    Prometheus tests (no API key)."""
    server = launch_server(tiny_checkpoint, tmp_path_factory.mktemp("served") / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        rc = server.stop()
        if rc not in (0, None):
            print(f"server exited with {rc}:\n{server.log()[-4000:]}")
