"""The contract of a decoding mode, and the causal prefill step all modes share."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from server.engine.images import clamp_chunk
from server.engine.kv_cache import KVCacheManager
from server.engine.outputs import RequestStats
from server.engine.params import ModeParams, ParamError, ResolveContext, SamplingParams
from server.engine.request import ModeState, Request
from server.engine.sampler import SALT_SAMPLE, RowResult, RowSpec
from server.engine.work import PREFILL, Work, WorkKind


class DecodeMode:
    """One decoding mode: everything particular to it lives in its subclass.

    Declarative part (class attributes), read by the registry and every layer that asks it:
    ``name`` (the request's ``mode``); ``knobs``, the decode fields it honours, in the order
    their defaults are resolved (a field set for a mode that does not honour it is a 400);
    ``supports_logprobs``; ``honours_penalties`` (presence / frequency / repetition penalties:
    they need the text before each chosen position, which a mode may not have); ``needs_mask_token`` (runs only on a diffusion checkpoint);
    ``work_kinds``, the kinds of pass it runs (each declares its K/V writes and attention);
    ``metric_histograms``, the Prometheus histograms fed from its statistics.

    Instances are stateless and shared by every request and engine; per-request state lives
    in ``request.mode_state`` (a subclass of ``ModeState``), model facts in the request's
    resolved params. Invariants: ``next_work`` never returns a pass that would place a token
    at or beyond ``max_model_len``, nor one longer than ``largest_pass``; ``apply`` is called
    exactly once for every work that ran, with the logits of ``work.logit_rows`` and the row
    results for ``row_specs``, and then ``after_pass``."""

    name: ClassVar[str]
    knobs: ClassVar[tuple[str, ...]] = ()
    supports_logprobs: ClassVar[bool] = False
    honours_penalties: ClassVar[bool] = False
    needs_mask_token: ClassVar[bool] = False
    work_kinds: ClassVar[tuple[WorkKind, ...]] = (PREFILL,)
    metric_histograms: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------ parameters
    def default(self, knob: str, values: dict[str, Any], ctx: ResolveContext) -> Any:
        """The built-in default of ``knob`` given the knobs resolved before it. Here: what a
        knob means for every mode that honours it (a block is the checkpoint's block size)."""
        assert knob == "block_length", f"mode {self.name!r} has no default for {knob!r}"
        return ctx.block_size

    def make_params(self, values: dict[str, Any], ctx: ResolveContext) -> ModeParams:
        """The mode's frozen params from its resolved knobs; raises ParamError for values
        that cannot run on this model (e.g. longer than the context)."""
        return ModeParams(mode=self.name)

    def check_sampling(self, params: ModeParams, sampling: SamplingParams) -> None:
        """Refuse (ParamError) sampling controls these params cannot honour; default: all."""

    def largest_pass(self, params: ModeParams) -> tuple[int, str | None]:
        """Tokens of the longest atomic pass these params run, and the knob that sets it."""
        return 1, None

    # --------------------------------------------------------------- running
    def next_work(self, req: Request, budget: int) -> Work | None:
        """The request's next pass, or None if it cannot fit in ``budget`` tokens this step."""
        raise NotImplementedError

    def kv_tokens_needed(self, req: Request, work: Work) -> int:
        """How many tokens of KV the request's pages must hold before ``work`` runs
        (a pass that writes nothing reserves the slots of the pass that will follow it)."""
        return req.num_computed + len(work)

    def row_specs(self, req: Request, work: Work) -> list[RowSpec]:
        """How each logits row of ``work`` is turned into a token."""
        raise NotImplementedError

    def apply(self, req: Request, work: Work, results: list[RowResult], logits: torch.Tensor) -> None:
        """Advance the request after ``work`` ran: update num_computed, emit tokens, finish."""
        raise NotImplementedError

    def after_pass(self, req: Request, work: Work, kv: KVCacheManager) -> None:
        """Adjust the request's cache after ``apply`` (e.g. drop rejected slots)."""

    def pass_label(self, req: Request, work: Work) -> str:
        """The decoder that ran ``work`` (per-pass statistics; ``auto`` names its choice)."""
        return self.name

    def reset(self, req: Request) -> None:
        """Forget in-flight state (the request was preempted; its cache is gone)."""
        req.mode_state = None

    # ------------------------------------------------------------- reporting
    def usage_extras(self, stats: list[RequestStats]) -> dict[str, Any]:
        """Mode-specific fields of the API's ``usage`` over a response's choices."""
        return {}


def check_fits(knob: str, tokens: int, value: int, ctx: ResolveContext) -> None:
    """A pass of ``tokens`` tokens (set by ``knob`` = ``value``) must fit the context."""
    if tokens > ctx.max_model_len:
        raise ParamError(knob, f"{knob} {value} does not fit the context length {ctx.max_model_len}")


def mode_state(req: Request, cls: type[ModeState]) -> Any:
    """The request's state of type ``cls``, created on first use."""
    if req.mode_state is None:
        req.mode_state = cls()
    assert isinstance(req.mode_state, cls)
    return req.mode_state


def prefill_work(req: Request, budget: int, target: int, want_logits: bool, kind: WorkKind) -> Work | None:
    """A causal, KV-writing chunk of ``req.token_ids[num_computed:target]`` within ``budget``.
    Logits of the last row are requested only when the chunk reaches ``target``. A chunk
    never ends inside an image (None when the image does not fit in ``budget``)."""
    assert kind.writes_kv and kind.attention == "causal"
    remaining = target - req.num_computed
    assert remaining > 0
    n = clamp_chunk(req.images, req.num_computed, min(remaining, budget))
    if n <= 0:
        return None
    tokens = req.token_ids[req.num_computed : req.num_computed + n]
    last = n == remaining
    return Work(kind=kind, token_ids=tokens, logit_rows=[n - 1] if (last and want_logits) else [])


def sample_spec(req: Request, position: int, salt: int = SALT_SAMPLE, margin: bool = False) -> RowSpec:
    """A sampling row for the token at ``position`` with the request's sampling params
    (``margin``: the sampler also reports the token's lead over the runner-up)."""
    s = req.params.sampling
    return RowSpec(s.temperature, s.top_k, s.top_p, req.seed, position, salt, s.logprobs, margin)


def refuse_sequence_controls(sampling: SamplingParams, where: str) -> None:
    """ParamError for a grammar or logit controls, whose rows need a contiguous sequence
    (passes that lay out several hypothetical continuations cannot give them one)."""
    if sampling.grammar is not None:
        raise ParamError("response_format", f"structured output is not supported in {where}")
    controls = sampling.controls
    if controls.active:
        name = (controls.penalties_set() or ("logit_bias" if controls.logit_bias else "min_tokens",))[0]
        raise ParamError(name, f"'{name}' is not supported in {where}")
