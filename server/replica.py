"""Who this replica is, in logs and in metrics, when many run behind one load balancer.

The identity is ``--replica-id`` (``NLD_REPLICA_ID``; Kubernetes: the pod name through the
downward API; Ray Serve: the replica id), else ``$HOSTNAME`` (a pod's name), else
``<host>-<pid>``. It is stable for the life of the process.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

REPLICA_LABEL = "replica"
LOG_FORMAT = "%(asctime)s %(levelname)s [{replica}] %(name)s: %(message)s"
TRACE = 5  # uvicorn's "trace" level


def replica_id(configured: str | None, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return configured or env.get("HOSTNAME") or f"{socket.gethostname()}-{os.getpid()}"


def configure_logging(level: str, replica: str) -> None:
    """Root logging with the replica in every line (uvicorn's loggers propagate to it)."""
    numeric = TRACE if level.lower() == "trace" else getattr(logging, level.upper())
    fmt = LOG_FORMAT.format(replica=replica.replace("%", "%%"))
    logging.basicConfig(level=numeric, format=fmt, force=True)


class ReplicaLabelled:
    """A collector re-exposing every sample of ``registry`` with ``replica="<id>"`` added,
    so series from many replicas stay apart wherever they are aggregated."""

    def __init__(self, registry: CollectorRegistry, replica: str) -> None:
        self.registry = registry
        self.replica = replica

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, REPLICA_LABEL: self.replica}) for s in family.samples]
            yield labelled


def labelled_registry(registry: CollectorRegistry, replica: str) -> CollectorRegistry:
    """A registry exposing ``registry``'s metrics with the replica label."""
    out = CollectorRegistry(auto_describe=False)
    out.register(ReplicaLabelled(registry, replica))
    return out
