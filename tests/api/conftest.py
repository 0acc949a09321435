"""Fixtures for the HTTP-layer tests: a small real tokenizer, the fake engine, live servers.

Servers are real uvicorn instances on loopback ports, each in a background thread, made
once per session per configuration; each test starts with the fake's knobs reset.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import prometheus_client
import pytest
import uvicorn

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # so ``tests.api.fake_engine`` imports however pytest is started
    sys.path.insert(0, _ROOT)

from server.api import create_app  # noqa: E402
from tests.api.fake_engine import SENTENCES, FakeEngine  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
API_KEY = "sk-test-key"


def build_tokenizer() -> Any:
    """A byte-level BPE trained on a few sentences, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = SENTENCES * 3 + ["user assistant system hello there, how are you?", "Say something nice about blocks."]
    raw.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return build_tokenizer()


@dataclass
class LiveServer:
    """A uvicorn server running ``app`` in a thread on a free loopback port."""

    app: Any
    engine: FakeEngine
    registry: Any = None
    port: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LiveServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)


_SERVERS: dict[str, LiveServer] = {}
_HTTP: list[httpx.Client] = []


def http() -> httpx.Client:
    """A shared httpx client (making one per request costs more than the request)."""
    if not _HTTP:
        _HTTP.append(httpx.Client(timeout=30))
    return _HTTP[0]

SERVER_CONFIGS: dict[str, dict[str, Any]] = {
    # the default: open, AR by default, short keep-alive so tests can see it
    "main": dict(api_key=None, default_mode="ar", max_body_bytes=1 << 20, keepalive_s=0.2),
    # with an API key, a small body limit, diffusion by default (2 refine steps by default)
    "secured": dict(api_key=API_KEY, default_mode="diffusion", max_body_bytes=4096, keepalive_s=10.0),
}
ENGINE_CONFIGS: dict[str, dict[str, Any]] = {"main": {}, "secured": dict(server_defaults={"refine_steps": 2})}


def get_server(name: str, tokenizer: Any) -> LiveServer:
    if name not in _SERVERS:
        engine = FakeEngine(tokenizer, **ENGINE_CONFIGS[name])
        registry = prometheus_client.CollectorRegistry()
        prometheus_client.Counter("fake_test_requests", "a metric the tests look for", registry=registry).inc()
        app = create_app(
            engine, served_model_names=["fake-nld", "alias/fake"], metrics_registry=registry, version="9.9.9-test",
            **SERVER_CONFIGS[name],
        )
        _SERVERS[name] = LiveServer(app, engine, registry).start()
    server = _SERVERS[name]
    server.engine.reset()
    server.app.state.draining = False
    return server


@pytest.fixture(scope="session", autouse=True)
def _stop_servers() -> Iterator[None]:
    yield
    for client in _HTTP:
        client.close()
    for server in _SERVERS.values():
        server.stop()


@pytest.fixture
def server(tokenizer: Any) -> LiveServer:
    """The default live server (fake reset)."""
    return get_server("main", tokenizer)


@pytest.fixture
def secured_server(tokenizer: Any) -> LiveServer:
    """A live server with an API key and a 4 KiB body limit."""
    return get_server("secured", tokenizer)


def wait_until(predicate: Any, timeout: float = 3.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
