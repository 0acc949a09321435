"""Ray Serve: replicas of the server behind Ray's HTTP proxy (``pip install -e '.[ray]'``).

    serve run deploy/ray/serve-cpu.yaml        # or serve-gpu.yaml on GPU nodes

Each replica is one Ray actor running one engine (its own GPU with ``num_gpus: 1``) and
the same FastAPI app as ``python -m server``, so the OpenAI API, streaming included, is
served unchanged through the proxy; Ray balances and autoscales on ongoing requests.

Settings: defaults < ``config`` files (``NLD_CONFIG``) < ``NLD_*`` variables (set them
with ``runtime_env.env_vars``) < the application's ``args.settings``. The replica id in
logs, in the ``replica`` metrics label and in the ``X-NLD-Replica`` response header is
``<deployment>#<Ray replica id>``. With ``args.metrics_port`` each replica also serves its
own /metrics on ``metrics_port + <its rank on the node>`` (the proxy's /metrics answers
from one replica per scrape).

Lifecycle: the constructor returns once the weights are loaded (a failed load fails the
replica, and Ray retries it); ``check_health`` fails once the engine thread is dead, so
Ray replaces the replica (its in-flight requests were already ended with an error); on
scale-down or redeploy Ray stops routing to the replica and waits for its ongoing
requests (``graceful_shutdown_timeout_s``), then ``__del__`` drains and stops the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from prometheus_client import start_http_server
from ray import serve
from ray.serve import Application

from server.api.serve import Replica, build_replica
from server.options import SERVE, resolve

logger = logging.getLogger("server.ray")
APP_SETTINGS_SOURCE = "Ray Serve application args.settings"


@serve.deployment(name="NLDServer", max_ongoing_requests=32, health_check_period_s=5)
@serve.ingress()
class NLDServer:
    """One replica: an engine and the OpenAI app (Ray calls ``__serve_build_asgi_app__``)."""

    async def __init__(self, settings: dict[str, Any] | None = None, metrics_port: int | None = None) -> None:
        context = serve.get_replica_context()
        replica_id = f"{context.deployment}#{context.replica_id.unique_id}"
        self.settings = resolve(SERVE, dict(settings or {}), os.environ, flags_source=APP_SETTINGS_SOURCE)
        self.replica: Replica = build_replica(self.settings, self._on_fatal, replica=replica_id)
        self.replica.app.add_middleware(ReplicaHeader, replica=replica_id)
        self._metrics_server: Any = None
        if metrics_port is not None:  # this replica's own /metrics: one port per replica on its node
            rank = getattr(context, "rank", None)
            port = metrics_port + (rank.local_rank if rank is not None else 0)
            self._metrics_server, _ = start_http_server(port, registry=self.replica.app.state.metrics_registry)
            logger.info("replica %s: /metrics on port %d", replica_id, port)
        self.replica.engine.start()
        # ready only once loaded: Ray routes nothing here before; a failed load raises
        await asyncio.get_running_loop().run_in_executor(None, self.replica.engine.wait_loaded, None)

    def __serve_build_asgi_app__(self) -> Any:
        return self.replica.app

    def _on_fatal(self, reason: str) -> None:
        logger.error("%s; check_health now fails and Ray replaces this replica", reason)

    def check_health(self) -> None:
        engine = self.replica.engine
        if not engine.is_healthy():
            raise RuntimeError(engine.failure or "the engine is not running")

    def kv_pages(self) -> dict[str, Any]:
        """This replica's id and KV pool (free and total pages), for tests and operators."""
        engine = self.replica.engine
        return {"replica": self.replica.replica_id, "free": engine.kv_pages_free(), "total": engine.kv_pages_total()}

    async def __del__(self) -> None:
        self.replica.app.state.begin_drain()
        await self.replica.engine.drain(self.settings.drain_timeout)
        self.replica.engine.shutdown()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()


class ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that served it."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.header = (b"x-nld-replica", replica.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


def build_app(args: dict[str, Any]) -> Application:
    """The application builder named by ``import_path: server.ray_serve:build_app``.
    ``args.settings`` holds server settings (the keys of a ``--config`` file);
    ``args.metrics_port``, if set, gives each replica its own /metrics on
    ``metrics_port + <its rank on the node>``."""
    unknown = set(args) - {"settings", "metrics_port"}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; put server settings under 'settings'")
    port = args.get("metrics_port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535):
        raise ValueError(f"application args: metrics_port must be a port number, got {port!r}")
    return NLDServer.bind(args.get("settings") or {}, port)
