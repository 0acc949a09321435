"""What the engine reports to a metrics backend (``server.metrics.Metrics`` implements it)."""

from __future__ import annotations

from typing import Protocol

from server.engine.outputs import RequestStats


class MetricsSink(Protocol):
    """Called on the engine thread; implementations must not block for long."""

    def on_request_finished(self, stats: RequestStats, finish_reason: str) -> None: ...

    def on_step(self, duration_s: float, num_running: int, num_waiting: int, kv_usage: float) -> None: ...

    def on_preemption(self, mode: str) -> None: ...

    def on_queue_rejected(self, mode: str, reason: str = "queue_full") -> None: ...

    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None: ...

    def on_vision_encode(self, images: int, seconds: float) -> None: ...


class NullMetrics:
    """A sink that records nothing (the engine's default)."""

    def on_request_finished(self, stats: RequestStats, finish_reason: str) -> None:
        pass

    def on_step(self, duration_s: float, num_running: int, num_waiting: int, kv_usage: float) -> None:
        pass

    def on_preemption(self, mode: str) -> None:
        pass

    def on_queue_rejected(self, mode: str, reason: str = "queue_full") -> None:
        pass

    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        pass

    def on_vision_encode(self, images: int, seconds: float) -> None:
        pass
