"""Run the API under uvicorn with an engine thread, and drain on SIGTERM.

SIGTERM (or the first Ctrl-C): /ready turns 503 and new generation requests are refused,
in-flight requests get up to ``--drain-timeout`` seconds to finish, then uvicorn shuts down.
A second Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from types import FrameType

import uvicorn

from server.config import EngineConfig

logger = logging.getLogger("server")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signal first drains the engine."""

    def __init__(self, config: uvicorn.Config, engine, drain_timeout: float) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config)
        self.engine = engine
        self.app_state = config.app.state
        self.drain_timeout = drain_timeout
        self._draining = False

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


def serve(config: EngineConfig, args: argparse.Namespace, served_model_names: list[str]) -> int:
    from server import __version__
    from server.api.app import create_app
    from server.api.images import ImageLimits
    from server.engine.async_engine import AsyncEngine
    from server.engine.engine import LLMEngine
    from server.metrics import Metrics

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.model.loader import load_tokenizer

    metrics = Metrics(model_name=served_model_names[0])
    # the tokenizer loads first (fast) so the app can be built and answer /ready with 503
    # while the weights load in the engine thread
    engine = AsyncEngine(
        lambda: LLMEngine.from_pretrained(config, metrics=metrics), served_model_names[0], tokenizer=load_tokenizer(config.model)
    )
    app = create_app(
        engine,
        served_model_names=served_model_names,
        api_key=args.api_key,
        default_mode=config.default_mode,
        default_refine_steps=config.default_refine_steps,
        max_body_bytes=args.max_body_bytes,
        image_limits=ImageLimits(allow_urls=bool(getattr(args, "allow_image_urls", False))),
        metrics_registry=metrics.registry,
        version=__version__,
    )
    engine.start()
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    server = DrainingServer(uv_config, engine, args.drain_timeout)
    server.run()
    engine.shutdown()
    return 0
