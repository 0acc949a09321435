"""``mode: "auto"``: per request and per cycle, pick the lossless decoder (ar, or self_spec
linear / quadratic with a draft length) that the cost model says is fastest.

At every cycle boundary (never inside a linear draft -> verify cycle) each candidate plan p
is scored by the batch's expected emission rate over the pass time it implies:

    J(p) = (r_p + others) / T(base + n_p)

``r_p`` is the tokens per step the request emits under p (ar: 1; linear with d drafts:
E(d) / 2, two passes per cycle; quadratic: E(d)), ``n_p`` the tokens it adds to every pass
(ar: 1; linear: d + 1; quadratic: (d + 1)(d + 2)), E(d) the expected accepted prefix plus
bonus from the request's observed acceptance (prior: every request's), ``T`` the measured
pass time (``server.engine.cost_model``), ``base`` the tokens the rest of the batch will put
into the next pass (``cost_model.recurring_tokens``: a prompt prefilled in the last pass
counts one token) and ``others`` the tokens per step the rest of the batch emits (the
measured average per request, times the other requests). Counting others at what they really emit
matters when they speculate too: their tokens are then worth more, and the extra tokens of
this request's plan slow them down; scored at one each, every request of a busy batch on a
compute-bound device would keep drafting, each choice right for itself and the batch slower
than under AR.
Idle, J is the request's own tokens per second; under load, ``others`` dominates and a long
pass only slows every request down. ``T`` is the measured time of a whole engine step, so
that per-step costs outside the forward pass count against plans that take more steps.
Acceptance is only observed on cycles that run: where the prior ranks AR first for a request
alone (a compute-bound CPU), an engine serving one request at a time stays on AR. Every
candidate is lossless, so at temperature 0 the output is AR greedy whatever is picked; at
temperature > 0 it is distributed as AR sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.cost_model import AcceptanceEstimate, CostModel, recurring_tokens
from server.engine.kv_cache import KVCacheManager
from server.engine.modes.ar import AutoregressiveMode
from server.engine.modes.base import DecodeMode, mode_state, refuse_sequence_controls
from server.engine.modes.self_spec import DRAFT, VERIFY, SelfSpecParams, SelfSpeculativeMode, SpecState
from server.engine.modes.self_spec_quadratic import SPEC_CYCLE, cycle_tokens
from server.engine.outputs import RequestStats
from server.engine.params import ModeParams, ResolveContext, SamplingParams
from server.engine.request import Request
from server.engine.sampler import RowResult, RowSpec
from server.engine.work import DECODE, PREFILL, Work

DRAFT_LENGTHS = (3, 7, 15)  # blocks 4, 8, 16


@dataclass(frozen=True)
class Plan:
    """A lossless decoder: ``variant`` None = ar, else self_spec with ``drafts`` drafts."""

    variant: str | None = None
    drafts: int = 0

    @property
    def label(self) -> str:
        return "ar" if self.variant is None else f"self_spec_{self.variant}"

    @property
    def pass_tokens(self) -> int:
        if self.variant is None:
            return 1
        if self.variant == "linear":
            return self.drafts + 1
        return cycle_tokens(self.drafts, self.drafts)

    def tokens_per_step(self, acceptance: AcceptanceEstimate) -> float:
        if self.variant is None:
            return 1.0
        per_cycle = acceptance.expected_tokens(self.drafts)
        return per_cycle / 2 if self.variant == "linear" else per_cycle


AR_PLAN = Plan()


@dataclass(frozen=True)
class AutoParams(ModeParams):
    mask_token_id: int | None
    plans: tuple[Plan, ...]
    cost: CostModel = field(compare=False, hash=False, repr=False)


@dataclass
class AutoState(SpecState):
    plan: Plan = AR_PLAN
    mid_cycle: bool = False  # a linear draft ran; its verify must follow
    last_pass_tokens: int = 0  # this request's share of the next pass's load (cost_model.recurring_tokens)
    acceptance: dict[str, AcceptanceEstimate] = field(default_factory=dict)


def choose(plans: tuple[Plan, ...], cost: CostModel, acceptance: dict[str, AcceptanceEstimate], own_tokens: int) -> Plan:
    """The plan with the highest J (see the module docstring); ties go to the earlier plan."""
    load = cost.pass_time
    base = max(0, load.load_tokens - own_tokens)
    others = max(0, load.load_requests - 1) * load.emitted_per_request
    best, best_score = plans[0], -1.0
    for plan in plans:
        acc = acceptance.get(plan.variant or "", AcceptanceEstimate())
        score = (plan.tokens_per_step(acc) + others) / load.time(base + plan.pass_tokens)
        if score > best_score:
            best, best_score = plan, score
    return best


class _PlannedSpec(SelfSpeculativeMode):
    """self_spec whose knobs come from the request's current auto plan."""

    def spec_params(self, req: Request) -> SelfSpecParams:
        p = req.params.decode
        assert isinstance(p, AutoParams) and p.mask_token_id is not None
        plan = mode_state(req, AutoState).plan
        assert plan.variant is not None
        return SelfSpecParams(
            mode="self_spec",
            mask_token_id=p.mask_token_id,
            block_length=plan.drafts + 1,
            draft_length=plan.drafts,
            variant=plan.variant,
        )


class AutoMode(DecodeMode):
    """Picks ar / self_spec linear / self_spec quadratic (and the draft length) per cycle."""

    name = "auto"
    work_kinds = (PREFILL, DECODE, DRAFT, VERIFY, SPEC_CYCLE)
    metric_histograms = ("spec_decode_acceptance_length",)

    def __init__(self) -> None:
        self.ar = AutoregressiveMode()
        self.spec = _PlannedSpec()

    def check_sampling(self, params: ModeParams, sampling: SamplingParams) -> None:
        refuse_sequence_controls(sampling, "mode 'auto' (it may pick quadratic self_spec)")

    def make_params(self, values: dict[str, Any], ctx: ResolveContext) -> AutoParams:
        plans: list[Plan] = [AR_PLAN]
        if ctx.mask_token_id is not None:
            for variant in ("linear", "quadratic"):
                for d in DRAFT_LENGTHS:
                    plan = Plan(variant, d)
                    if plan.pass_tokens <= ctx.max_pass_tokens and d + 1 < ctx.max_model_len:
                        plans.append(plan)
        cost = ctx.cost_model if isinstance(ctx.cost_model, CostModel) else CostModel()
        return AutoParams(mode=self.name, mask_token_id=ctx.mask_token_id, plans=tuple(plans), cost=cost)

    def largest_pass(self, params: ModeParams) -> tuple[int, str | None]:
        return 1, None  # plans that do not fit the budget are never offered

    @staticmethod
    def _state(req: Request) -> AutoState:
        return mode_state(req, AutoState)

    @staticmethod
    def _params(req: Request) -> AutoParams:
        p = req.params.decode
        assert isinstance(p, AutoParams)
        return p

    def _inner(self, work: Work) -> DecodeMode:
        return self.ar if work.kind in (PREFILL, DECODE) else self.spec

    def next_work(self, req: Request, budget: int) -> Work | None:
        st = self._state(req)
        p = self._params(req)
        if req.num_computed < len(req.token_ids) - 1 or len(req.token_ids) == req.num_prompt:
            return self.ar.next_work(req, budget)  # prefill: the same for every decoder
        if not st.mid_cycle:
            acceptance = {v: self._acceptance(req, st, v) for v in ("linear", "quadratic")}
            fitting = tuple(pl for pl in p.plans if pl.pass_tokens <= budget) or (AR_PLAN,)
            plan = choose(fitting, p.cost, acceptance, st.last_pass_tokens or st.plan.pass_tokens)
            if plan.variant != "quadratic" or st.plan.variant != "quadratic":
                st.drafts, st.draft_probs = None, None  # drafts carry over only between quadratic cycles
            st.plan = plan
        if st.plan.variant is None:
            return self.ar.next_work(req, budget)
        return self.spec.next_work(req, budget)

    def _acceptance(self, req: Request, st: AutoState, variant: str) -> AcceptanceEstimate:
        own = st.acceptance.get(variant)
        if own is None:
            prior = self._params(req).cost.global_acceptance(variant)
            own = st.acceptance[variant] = AcceptanceEstimate(prior_rate=prior.rate)
        return own

    def pass_label(self, req: Request, work: Work) -> str:
        return "ar" if work.kind in (PREFILL, DECODE) else self._state(req).plan.label

    def kv_tokens_needed(self, req: Request, work: Work) -> int:
        return self._inner(work).kv_tokens_needed(req, work)

    def row_specs(self, req: Request, work: Work) -> list[RowSpec]:
        return self._inner(work).row_specs(req, work)

    def apply(self, req: Request, work: Work, results: list[RowResult], logits: torch.Tensor) -> None:
        st = self._state(req)
        self._inner(work).apply(req, work, results, logits)
        st.mid_cycle = work.kind is DRAFT
        st.last_pass_tokens = recurring_tokens(req, work)  # its share of the load the engine reports
        if work.kind in (VERIFY, SPEC_CYCLE) and st.plan.variant is not None:
            drafts = len(work.written_rows()) - 1
            accepted = req.stats.acceptance_lengths[-1] - 1
            self._acceptance(req, st, st.plan.variant).observe(drafts, accepted)
            self._params(req).cost.global_acceptance(st.plan.variant).observe(drafts, accepted)

    def after_pass(self, req: Request, work: Work, kv: KVCacheManager) -> None:
        self._inner(work).after_pass(req, work, kv)

    def usage_extras(self, stats: list[RequestStats]) -> dict[str, Any]:
        return self.spec.usage_extras(stats)
