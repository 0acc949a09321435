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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.modes.base import prefill_work, sample_spec
from server.engine.request import Request, Work
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


@dataclass
class SpecState:
    drafts: list[int] | None = None
    draft_probs: torch.Tensor | None = None  # [D, V] draft distributions (temperature > 0)


class SelfSpeculativeMode:
    def __init__(self, mask_token_id: int) -> None:
        self.mask_id = mask_token_id

    @staticmethod
    def _state(req: Request) -> SpecState:
        if req.mode_state is None:
            req.mode_state = SpecState()
        return req.mode_state

    def _draft_length(self, req: Request) -> int:
        d = req.params.decode.draft_length or 1
        return max(1, min(d, req.remaining_tokens, req.max_model_len - req.num_computed - 1))

    def next_work(self, req: Request, budget: int) -> Work | None:
        st = self._state(req)
        has_seed = len(req.token_ids) > req.num_prompt
        target = len(req.token_ids) - (1 if has_seed else 0)
        if req.num_computed < target:
            return prefill_work(req, budget, target, want_logits=not has_seed, kind="prefill")
        seed = req.token_ids[-1]
        if st.drafts is None:
            d = self._draft_length(req)
            if d + 1 > budget:
                return None
            return Work("draft", [seed] + [self.mask_id] * d, causal=False, logit_rows=list(range(1, d + 1)), lora=True)
        if len(st.drafts) + 1 > budget:
            return None
        return Work("verify", [seed] + st.drafts, causal=True, logit_rows=list(range(len(st.drafts) + 1)))

    def kv_tokens_needed(self, req: Request, work: Work) -> int:
        return req.num_computed + len(work)  # a draft reserves the slots its verify will write

    def row_specs(self, req: Request, work: Work) -> list[RowSpec]:
        base = req.num_computed
        if work.kind == "prefill":
            return [sample_spec(req, base + len(work))] if work.logit_rows else []
        if work.kind == "draft":
            return [sample_spec(req, base + i, SALT_DRAFT) for i in work.logit_rows]
        # verify: greedy rows; sampling at temperature > 0 is done in apply()
        return [RowSpec(0.0, 0, 1.0, req.seed, base + i + 1, SALT_SAMPLE) for i in work.logit_rows]

    def apply(self, req: Request, work: Work, results: list[RowResult], logits: torch.Tensor) -> None:
        st = self._state(req)
        s = req.params.sampling
        if work.kind == "prefill":
            req.num_computed += len(work)
            if results:
                req.emit([results[0].token])
            return
        if work.kind == "draft":
            st.drafts = [r.token for r in results]
            if not s.greedy:
                st.draft_probs = self._probs(req, logits)
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
        allowed = logits.float().index_fill(1, torch.tensor([self.mask_id], device=dev), float("-inf"))
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
        d = torch.tensor(drafts, device=dev)
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

    def reset(self, req: Request) -> None:
        req.mode_state = None
