"""Run the API under uvicorn with an engine thread, and drain on SIGTERM.

SIGTERM (or the first Ctrl-C): /ready turns 503 and new generation requests are refused,
in-flight requests get up to ``--drain-timeout`` seconds to finish, then uvicorn shuts down.
A second Ctrl-C exits at once.

A replica that cannot serve ends itself so that its orchestrator replaces it: a failed
model load exits with ``EXIT_LOAD_FAILED`` and a one-line reason on stderr; an engine
thread that dies later turns /health to 503, ends in-flight requests with an error and
exits with ``EXIT_ENGINE_DIED``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import uvicorn

from server.options import Settings

logger = logging.getLogger("server")

EXIT_LOAD_FAILED = 3
EXIT_ENGINE_DIED = 4


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signal first drains the engine."""

    def __init__(self, config: uvicorn.Config, engine, drain_timeout: float) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config)
        self.engine = engine
        self.app_state = config.app.state
        self.drain_timeout = drain_timeout
        self._draining = False
        self.exit_code = 0
        self.failure: str | None = None

    def fail(self, reason: str, exit_code: int) -> None:
        """The engine cannot serve: stop now (thread-safe) and exit with ``exit_code``."""
        if self.failure is None:
            self.failure, self.exit_code = reason, exit_code
        logger.error("%s; shutting down", reason)
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            super().handle_exit(sig, frame)  # second signal: exit now
            self.force_exit = True
            return
        self._draining = True
        self.engine.draining = True
        self.app_state.begin_drain()
        logger.info("signal %s: draining (up to %.0f s)", sig, self.drain_timeout)

        def wait_then_exit() -> None:
            deadline = time.monotonic() + self.drain_timeout
            while self.engine.num_unfinished and time.monotonic() < deadline:
                time.sleep(0.05)
            # not super().handle_exit: uvicorn would record the signal and re-raise it once
            # shut down, so the drained process would die of SIGTERM instead of exiting 0
            self.should_exit = True

        threading.Thread(target=wait_then_exit, name="drain", daemon=True).start()


@dataclass
class Replica:
    """One serving replica: the engine (its thread not started yet) and the app around it."""

    replica_id: str
    engine: Any  # AsyncEngine
    app: Any  # FastAPI
    settings: Settings


def build_replica(settings: Settings, on_fatal: Callable[[str], None] | None, replica: str | None = None) -> Replica:
    """The engine and the app of ``settings``, with the replica id in logs and on every
    metric. Call ``replica.engine.start()`` to load the weights (in the engine thread)."""
    from server import __version__
    from server.api.app import create_app
    from server.api.images import ImageLimits
    from server.engine.async_engine import AsyncEngine
    from server.engine.engine import LLMEngine
    from server.metrics import Metrics
    from server.model.loader import load_tokenizer
    from server.replica import configure_logging, labelled_registry, replica_id

    config = settings.engine_config()
    served_model_names = settings.served_model_name or [Path(config.model).name]
    replica = replica or replica_id(settings.replica_id)
    configure_logging(settings.log_level, replica)
    logger.info("replica %s; settings: %s", replica, "; ".join(settings.describe()))
    metrics = Metrics(model_name=served_model_names[0])
    # the tokenizer loads first (fast) so the app can be built and answer /ready with 503
    # while the weights load in the engine thread
    engine = AsyncEngine(
        lambda: LLMEngine.from_pretrained(config, metrics=metrics), served_model_names[0],
        tokenizer=load_tokenizer(config.model), on_fatal=on_fatal,
    )
    app = create_app(
        engine,
        served_model_names=served_model_names,
        api_key=settings.api_key,
        default_mode=config.default_mode,
        max_body_bytes=settings.max_body_bytes,
        image_limits=ImageLimits(allow_urls=settings.allow_image_urls),
        metrics_registry=labelled_registry(metrics.registry, replica),
        version=__version__,
    )
    return Replica(replica, engine, app, settings)


def serve(settings: Settings) -> int:
    """Load the model and serve until SIGTERM (exit 0 once drained) or a fatal engine
    failure (``EXIT_LOAD_FAILED`` / ``EXIT_ENGINE_DIED``, one line on stderr)."""
    server: DrainingServer | None = None

    def on_fatal(reason: str) -> None:
        assert server is not None  # the engine thread starts after the server is built
        server.fail(reason, EXIT_LOAD_FAILED if engine.load_error is not None else EXIT_ENGINE_DIED)

    replica = build_replica(settings, on_fatal)
    engine = replica.engine
    uv_config = uvicorn.Config(
        replica.app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(uv_config, engine, settings.drain_timeout)
    engine.start()
    server.run()
    engine.shutdown()
    if server.failure is not None:
        print(f"nld-server: error: {server.failure}", file=sys.stderr)
    return server.exit_code
