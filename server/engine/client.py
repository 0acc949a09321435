"""The contract between the HTTP layer and the engine.

The HTTP layer only talks to an ``EngineClient``; tests can drive the API with a fake one.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol

from server.engine.outputs import RequestOutput, RequestStats
from server.engine.params import RequestParams


class QueueFullError(RuntimeError):
    """Raised by ``generate`` when the waiting queue is at its cap (HTTP 503 + Retry-After)."""


class EngineDeadError(RuntimeError):
    """Raised when the engine loop has died; the request cannot be served (HTTP 500)."""


class EngineClient(Protocol):
    """What the API needs from an engine.

    Invariants: every stream from ``generate`` ends with exactly one output whose
    ``finished`` is True; cancelling the consuming task (client disconnect) or calling
    ``abort`` frees the request's KV pages before the next engine step completes.
    """

    model_name: str  # default served name (the folder name unless overridden)
    max_model_len: int  # context length: prompt + generated tokens must fit
    tokenizer: Any  # a transformers PreTrainedTokenizerBase (with chat template)

    def is_ready(self) -> bool:
        """True once the model is loaded and the engine loop is running (and not draining)."""

    def is_healthy(self) -> bool:
        """False once the engine can never serve again (failed load, dead engine thread)."""

    def generate(
        self, prompt_token_ids: list[int], params: RequestParams, request_id: str, images: list[Any] | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and stream its outputs. ``params`` are resolved by the engine on
        admission; raises ParamError (a ValueError naming the field) for params the mode or
        the model cannot honour, ValueError for other bad input, QueueFullError when the
        waiting queue is full. ``images`` (``PreparedImage``) fill the prompt's image
        placeholder tokens (vision-language models only)."""

    async def abort(self, request_id: str, reason: str = "abort") -> None:
        """End a request early (no-op if it already finished). ``reason`` is its finish
        reason: "abort" (the client left) or "stop" (the API matched a stop string)."""

    def kv_pages_free(self) -> int:
        """Number of KV pages not owned by any running request (tests compare it before/after)."""

    def kv_pages_total(self) -> int:
        """Size of the page pool."""


__all__ = ["EngineClient", "QueueFullError", "EngineDeadError", "RequestOutput", "RequestStats", "RequestParams"]
