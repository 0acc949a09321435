"""Autoregressive decoding: one causal pass per token."""

from __future__ import annotations

import torch

from server.engine.modes.base import DecodeMode, prefill_work, sample_spec
from server.engine.outputs import TokenLogprob
from server.engine.request import Request
from server.engine.sampler import RowResult, RowSpec
from server.engine.work import DECODE, PREFILL, Work


class AutoregressiveMode(DecodeMode):
    """Every uncached token (the prompt, then each sampled token) goes through a causal pass
    that writes its K/V; the last row's logits give the next token. No knobs, no state;
    the only mode that reports logprobs."""

    name = "ar"
    supports_logprobs = True
    honours_penalties = True
    work_kinds = (PREFILL, DECODE)

    def next_work(self, req: Request, budget: int) -> Work | None:
        work = prefill_work(req, budget, len(req.token_ids), want_logits=True, kind=PREFILL)
        if work is not None and len(work) == 1 and req.num_computed >= req.num_prompt:
            work.kind = DECODE
        return work

    def row_specs(self, req: Request, work: Work) -> list[RowSpec]:
        return [sample_spec(req, req.num_computed + len(work))] if work.logit_rows else []

    def apply(self, req: Request, work: Work, results: list[RowResult], logits: torch.Tensor) -> None:
        req.num_computed += len(work)
        if not results:
            return
        r = results[0]
        lp = None
        if req.params.sampling.logprobs is not None:
            lp = [TokenLogprob(r.token, r.logprob or 0.0, list(r.top_logprobs or []))]
        req.emit([r.token], lp)
