"""Linear self-speculation: a bidirectional draft pass proposes ``draft_length`` tokens after
the seed, a causal verify pass checks them, and the longest agreeing prefix plus one bonus
token is kept.

State: the last emitted token (the seed) has no K/V yet; ``num_computed == len(token_ids) - 1``
between cycles. Draft: [seed, MASK x D] at L..L+D, cache read-only, draft LoRA on.
Verify: [seed, d1..dD], causal, writes D+1 slots; then the cache is cut back to
L + 1 + accepted and the pages past it are freed.

At temperature 0 a draft token is accepted iff it equals the verifier's argmax, so the
output is exactly AR greedy. At temperature > 0 each draft token d_i (drawn from the draft
distribution q_i) is accepted with probability min(1, p(d_i) / q_i(d_i)) and the first
rejection is replaced by a draw from norm(max(0, p - q_i)): the emitted tokens are
distributed exactly as AR sampling (speculative rejection sampling).

``variant="quadratic"`` replaces the draft and verify passes by one pass per cycle; see
``server.engine.modes.self_spec_quadratic`` for its layout. Acceptance (greedy or rejection
sampling), the emitted tokens and the accounting are the same as linear mode's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from server.engine.kv_cache import KVCacheManager
from server.engine.modes.base import DecodeMode, check_fits, mode_state, prefill_work, refuse_sequence_controls, sample_spec
from server.engine.outputs import RequestStats
from server.engine.params import ModeParams, ResolveContext, SamplingParams
from server.engine.request import ModeState, Request
from server.engine.sampler import (
    SALT_ACCEPT,
    SALT_DRAFT,
    SALT_RESIDUAL,
    SALT_SAMPLE,
    RowResult,
    RowSpec,
    filtered_probs,
    race,
    row_keys,
    uniforms,
)
from server.engine.modes import self_spec_quadratic as quad
from server.engine.work import PREFILL, Work, WorkKind

DRAFT = WorkKind("draft", writes_kv=False, attention="bidirectional")
VERIFY = WorkKind("verify", writes_kv=True, attention="causal")


@dataclass(frozen=True)
class SelfSpecParams(ModeParams):
    mask_token_id: int
    block_length: int  # only sets the default draft length
    draft_length: int
    variant: str = "linear"  # "linear": draft + verify passes; "quadratic": one pass per cycle


@dataclass
class SpecState(ModeState):
    drafts: list[int] | None = None
    draft_probs: torch.Tensor | None = None  # [D, V] draft distributions (temperature > 0)
    layout: quad.CycleLayout | None = None  # quadratic: the cycle in flight
    decision: tuple[int, int | None] | None = None  # quadratic: (accepted, sampled bonus or None)


class SelfSpeculativeMode(DecodeMode):
    """Linear self-speculation (see the module docstring). Invariant: between cycles the last
    emitted token has no K/V (``num_computed == len(token_ids) - 1``) and ``drafts`` is None;
    after a verify the cache holds exactly the accepted prefix (``after_pass`` cuts it)."""

    name = "self_spec"
    knobs = ("block_length", "draft_length", "variant")
    honours_penalties = True  # each verify row sees the drafts before it, so temperature 0 still equals AR
    needs_mask_token = True
    work_kinds = (PREFILL, DRAFT, VERIFY, quad.SPEC_CYCLE)
    metric_histograms = ("spec_decode_acceptance_length",)

    def default(self, knob: str, values: dict[str, Any], ctx: ResolveContext) -> Any:
        if knob == "draft_length":
            return max(1, values["block_length"] - 1)  # a draft fills the block after its seed
        if knob == "variant":
            return "linear"
        return super().default(knob, values, ctx)

    def check_sampling(self, params: ModeParams, sampling: SamplingParams) -> None:
        assert isinstance(params, SelfSpecParams)
        if params.variant == "quadratic":
            refuse_sequence_controls(sampling, "self_spec with variant 'quadratic'")

    def make_params(self, values: dict[str, Any], ctx: ResolveContext) -> SelfSpecParams:
        check_fits("block_length", values["block_length"], values["block_length"], ctx)
        check_fits("draft_length", values["draft_length"] + 1, values["draft_length"], ctx)
        assert ctx.mask_token_id is not None
        return SelfSpecParams(mode=self.name, mask_token_id=ctx.mask_token_id, **values)

    def largest_pass(self, params: ModeParams) -> tuple[int, str | None]:
        p = _params(params)
        if p.variant == "quadratic":
            return quad.cycle_tokens(p.draft_length, p.draft_length), "draft_length"
        return p.draft_length + 1, "draft_length"

    def usage_extras(self, stats: list[RequestStats]) -> dict[str, Any]:
        lengths = [a for s in stats for a in s.acceptance_lengths]
        return {"mean_acceptance_length": sum(lengths) / len(lengths) if lengths else 0.0}

    @staticmethod
    def _state(req: Request) -> SpecState:
        return mode_state(req, SpecState)

    def spec_params(self, req: Request) -> SelfSpecParams:
        """The knobs this request's cycles run with (``auto`` overrides it per cycle)."""
        return _params(req.params.decode)

    def pass_label(self, req: Request, work: Work) -> str:
        return f"self_spec_{self.spec_params(req).variant}"

    def _draft_length(self, req: Request) -> int:
        d = self.spec_params(req).draft_length
        return max(1, min(d, req.remaining_tokens, req.max_model_len - req.num_computed - 1))

    def next_work(self, req: Request, budget: int) -> Work | None:
        st = self._state(req)
        has_seed = len(req.token_ids) > req.num_prompt
        target = len(req.token_ids) - (1 if has_seed else 0)
        if req.num_computed < target:
            return prefill_work(req, budget, target, want_logits=not has_seed, kind=PREFILL)
        seed = req.token_ids[-1]
        if self.spec_params(req).variant == "quadratic":
            return self._cycle_work(req, st, seed, budget)
        if st.drafts is None:
            d = self._draft_length(req)
            if d + 1 > budget:
                return None
            mask = self.spec_params(req).mask_token_id
            return Work(DRAFT, [seed] + [mask] * d, logit_rows=list(range(1, d + 1)), lora=True)
        if len(st.drafts) + 1 > budget:
            return None
        return Work(VERIFY, [seed] + st.drafts, logit_rows=list(range(len(st.drafts) + 1)))

    def _cycle_work(self, req: Request, st: SpecState, seed: int, budget: int) -> Work | None:
        p = self.spec_params(req)
        room = max(0, req.max_model_len - 1 - req.num_computed)  # heads sit at L .. L + D
        drafts = (st.drafts or [])[:room]
        layout = quad.layout_for(req, p.draft_length, drafts)
        if layout.num_tokens > budget:
            return None
        st.drafts, st.layout = drafts, layout
        if st.draft_probs is not None:
            st.draft_probs = st.draft_probs[: len(drafts)]
        return quad.cycle_work(seed, drafts, layout, p.mask_token_id, lambda logits: self._decide(req, logits))

    def _decide(self, req: Request, head_logits: torch.Tensor) -> list[int]:
        """Quadratic: the acceptance, from the head rows' logits; returns the rows whose
        predictions become the next drafts (the accepted sub-block's masks)."""
        st = self._state(req)
        assert st.drafts is not None and st.layout is not None
        drafts = st.drafts
        if req.params.sampling.greedy:
            mask = torch.tensor([self.spec_params(req).mask_token_id], device=head_logits.device)
            verifier = torch.argmax(head_logits.float().index_fill(1, mask, float("-inf")), dim=-1).tolist()
            accepted = 0
            while accepted < len(drafts) and verifier[accepted] == drafts[accepted]:
                accepted += 1
            st.decision = (accepted, None)
        else:
            q = st.draft_probs if drafts else head_logits.new_zeros((0, head_logits.shape[1]))
            st.decision = self._rejection_sample(req, drafts, q, self._probs(req, head_logits))
        return st.layout.draft_rows(st.decision[0])

    def _apply_cycle(self, req: Request, st: SpecState, results: list[RowResult], logits: torch.Tensor) -> None:
        assert st.drafts is not None and st.layout is not None and st.decision is not None
        accepted, bonus = st.decision
        if bonus is None:  # greedy: the head row's argmax
            bonus = results[accepted].token
        new_tokens = st.drafts[:accepted] + [bonus]
        req.num_computed += 1 + accepted
        req.stats.acceptance_lengths.append(accepted + 1)
        req.emit(new_tokens)
        layout = st.layout
        st.drafts = quad.next_drafts(req, results, layout)
        st.draft_probs = None
        if st.drafts and not req.params.sampling.greedy:
            st.draft_probs = self._probs(req, quad.draft_logits(logits, layout))[: len(st.drafts)]
        st.layout, st.decision = None, None

    def kv_tokens_needed(self, req: Request, work: Work) -> int:
        if work.kind is quad.SPEC_CYCLE:  # only the heads are written
            return req.num_computed + len(work.written_rows())
        return super().kv_tokens_needed(req, work)

    def row_specs(self, req: Request, work: Work) -> list[RowSpec]:
        base = req.num_computed
        if work.kind is quad.SPEC_CYCLE:
            layout = self._state(req).layout
            assert layout is not None
            return quad.row_specs(req, work, layout)
        if work.kind is PREFILL:
            return [sample_spec(req, base + len(work))] if work.logit_rows else []
        if work.kind is DRAFT:
            return [sample_spec(req, base + i, SALT_DRAFT) for i in work.logit_rows]
        # verify: greedy rows; sampling at temperature > 0 is done in apply()
        return [RowSpec(0.0, 0, 1.0, req.seed, base + i + 1, SALT_SAMPLE) for i in work.logit_rows]

    def apply(self, req: Request, work: Work, results: list[RowResult], logits: torch.Tensor) -> None:
        st = self._state(req)
        s = req.params.sampling
        if work.kind is PREFILL:
            req.num_computed += len(work)
            if results:
                req.emit([results[0].token])
            return
        if work.kind is DRAFT:
            st.drafts = [r.token for r in results]
            if not s.greedy:
                st.draft_probs = self._probs(req, logits)
            return
        if work.kind is quad.SPEC_CYCLE:
            self._apply_cycle(req, st, results, logits)
            return
        drafts = st.drafts
        assert drafts is not None
        if s.greedy:
            verifier = [r.token for r in results]
            accepted = 0
            while accepted < len(drafts) and verifier[accepted] == drafts[accepted]:
                accepted += 1
            new_tokens = drafts[:accepted] + [verifier[accepted]]
        else:
            accepted, last = self._rejection_sample(req, drafts, st.draft_probs, self._probs(req, logits))
            new_tokens = drafts[:accepted] + [last]
        req.num_computed += 1 + accepted
        st.drafts, st.draft_probs = None, None
        req.stats.acceptance_lengths.append(accepted + 1)
        req.emit(new_tokens)

    def _probs(self, req: Request, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution of each row (mask id excluded, as in every sampled row)."""
        s = req.params.sampling
        n = logits.shape[0]
        dev = logits.device
        mask = torch.tensor([self.spec_params(req).mask_token_id], device=dev)
        allowed = logits.float().index_fill(1, mask, float("-inf"))
        return filtered_probs(
            allowed,
            torch.full((n,), s.temperature, device=dev),
            torch.full((n,), s.top_k, device=dev, dtype=torch.int64),
            torch.full((n,), s.top_p, device=dev),
            use_top_k=s.top_k > 0,
            use_top_p=s.top_p < 1,
        )

    def _rejection_sample(
        self, req: Request, drafts: list[int], q: torch.Tensor | None, p: torch.Tensor
    ) -> tuple[int, int]:
        """Returns (accepted drafts, the token that follows them)."""
        assert q is not None
        dev = p.device
        d = torch.tensor(drafts, device=dev, dtype=torch.long)
        rows = torch.arange(len(drafts), device=dev)
        p_d = p[rows, d].double()  # verifier row i-1 predicts draft i
        q_d = q[rows, d].double()
        base = req.num_computed  # seed position; draft i sits at base + 1 + i
        positions = [base + 1 + i for i in range(len(drafts))]
        u = uniforms(row_keys([req.seed] * len(drafts), positions, [SALT_ACCEPT] * len(drafts), dev), 1)[:, 0]
        ok = (u * q_d < p_d).tolist()
        accepted = 0
        while accepted < len(drafts) and ok[accepted]:
            accepted += 1
        position = base + 1 + accepted
        if accepted < len(drafts):
            residual = (p[accepted] - q[accepted]).clamp(min=0)
            if float(residual.sum()) <= 0:
                residual = p[accepted]
            dist, salt = residual / residual.sum(), SALT_RESIDUAL
        else:
            dist, salt = p[accepted], SALT_SAMPLE
        keys = row_keys([req.seed], [position], [salt], dev)
        return accepted, int(race(dist[None], keys)[0])

    def after_pass(self, req: Request, work: Work, kv: KVCacheManager) -> None:
        if work.kind in (VERIFY, quad.SPEC_CYCLE):  # rejected drafts wrote slots past the accepted prefix
            kv.truncate(req.table, req.num_computed)


def _params(params: ModeParams) -> SelfSpecParams:
    own = params.of(SelfSpeculativeMode.name)
    assert isinstance(own, SelfSpecParams)
    return own
