"""The contract of a decoding mode, and the causal prefill step all modes share."""

from __future__ import annotations

from typing import Protocol

import torch

from server.engine.images import clamp_chunk
from server.engine.request import Request, Work
from server.engine.sampler import SALT_SAMPLE, RowResult, RowSpec


class DecodeMode(Protocol):
    """Stateless strategy; per-request state lives in ``request.mode_state``.

    Invariants: ``next_work`` never returns a pass that would place a token at or beyond
    ``max_model_len``; ``apply`` is called exactly once for every work that ran, with the
    logits of ``work.logit_rows`` and the row results for ``row_specs``."""

    def next_work(self, req: Request, budget: int) -> Work | None:
        """The request's next pass, or None if it cannot fit in ``budget`` tokens this step."""

    def kv_tokens_needed(self, req: Request, work: Work) -> int:
        """How many tokens of KV the request's pages must hold before ``work`` runs
        (including slots reserved for a pass that will follow)."""

    def row_specs(self, req: Request, work: Work) -> list[RowSpec]:
        """How each logits row of ``work`` is turned into a token."""

    def apply(self, req: Request, work: Work, results: list[RowResult], logits: torch.Tensor) -> None:
        """Advance the request after ``work`` ran: update num_computed, emit tokens, finish."""

    def reset(self, req: Request) -> None:
        """Forget in-flight state (the request was preempted; its cache is gone)."""


def prefill_work(req: Request, budget: int, target: int, want_logits: bool, kind: str) -> Work | None:
    """A causal, KV-writing chunk of ``req.token_ids[num_computed:target]`` within ``budget``.
    Logits of the last row are requested only when the chunk reaches ``target``. A chunk
    never ends inside an image (None when the image does not fit in ``budget``)."""
    remaining = target - req.num_computed
    assert remaining > 0
    n = clamp_chunk(req.images, req.num_computed, min(remaining, budget))
    if n <= 0:
        return None
    tokens = req.token_ids[req.num_computed : req.num_computed + n]
    last = n == remaining
    return Work(kind=kind, token_ids=tokens, causal=True, logit_rows=[n - 1] if (last and want_logits) else [])


def sample_spec(req: Request, position: int, salt: int = SALT_SAMPLE) -> RowSpec:
    """A causal sampling row for the token at ``position`` with the request's sampling params."""
    s = req.params.sampling
    return RowSpec(s.temperature, s.top_k, s.top_p, req.seed, position, salt, s.logprobs)
