"""A toy fourth decoding mode, defined outside ``server/`` to show that a mode is one module.

``ar_stride``: autoregressive decoding in which every decode pass re-runs a fixed stride of
the last ``STRIDE`` generated tokens (re-writing their K/V, which are the same values) and
samples the next token from the last row. It emits exactly what ``ar`` emits, through its own
kind of pass, with its own pass size; it has no knobs and no per-request state.
"""

from __future__ import annotations

import torch

from server.engine.modes import DecodeMode
from server.engine.modes.base import prefill_work, sample_spec
from server.engine.params import ModeParams
from server.engine.request import Request
from server.engine.sampler import RowResult, RowSpec
from server.engine.work import PREFILL, Work, WorkKind

STRIDE = 3
RESTRIDE = WorkKind("restride", writes_kv=True, attention="causal")


class FixedStrideMode(DecodeMode):
    name = "ar_stride"
    work_kinds = (PREFILL, RESTRIDE)

    def largest_pass(self, params: ModeParams) -> tuple[int, str | None]:
        return STRIDE, None

    def next_work(self, req: Request, budget: int) -> Work | None:
        if len(req.token_ids) - req.num_computed > 1 or req.num_computed < req.num_prompt:
            return prefill_work(req, budget, len(req.token_ids), want_logits=True, kind=PREFILL)
        n = min(STRIDE, len(req.token_ids) - req.num_prompt)
        if n > budget:
            return None
        req.num_computed = len(req.token_ids) - n  # step back over the stride; its slots are rewritten
        return Work(RESTRIDE, req.token_ids[req.num_computed :], logit_rows=[n - 1])

    def row_specs(self, req: Request, work: Work) -> list[RowSpec]:
        return [sample_spec(req, req.num_computed + len(work))] if work.logit_rows else []

    def apply(self, req: Request, work: Work, results: list[RowResult], logits: torch.Tensor) -> None:
        req.num_computed += len(work)
        if results:
            req.emit([results[0].token])
