"""Quadratic (one-pass) self-speculation: one forward per cycle verifies the current drafts
and drafts the next block for every possible acceptance length.

State between cycles, as in linear mode: the seed (last emitted token, at position L =
``num_computed``) has no K/V yet, and ``drafts`` d_1..d_D (possibly none) follow it.
Heads are h_0 = seed, h_j = d_j. The pass is D+1 sub-blocks ``[h_j, MASK x K]``, sub-block
j at positions L+j .. L+j+K (positions repeat across sub-blocks), with the quadratic mask:
head j sees the cache and heads 0..j (a causal verify of the drafts); the masks of
sub-block j see the cache, heads 0..j and their whole sub-block (a draft conditioned on
accepting j drafts). Only the heads' K/V are written (slots L..L+D).

With ``a`` drafts accepted (longest prefix where head row j-1 predicts d_j; rejection
sampling at temperature > 0, exactly as linear mode) and the bonus b from head row a, the
emitted tokens are d_1..d_a, b; the cache is cut back to L+1+a, b is the new seed, and
the next drafts are the predictions of sub-block a's masks 2..K (positions L+a+2 ..
L+a+K; mask 1 sits at the bonus's position and is superseded by it). Only those rows'
logits are computed: the work's ``followup`` picks them once the head logits have
decided ``a``. The first cycle after a prefill (or a preemption) has no drafts: one
sub-block ``[seed, MASK x K]`` that emits the AR token and drafts the next block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.modes.base import sample_spec
from server.engine.request import Request
from server.engine.sampler import SALT_DRAFT, SALT_SAMPLE, RowResult, RowSpec
from server.engine.work import Work, WorkKind

SPEC_CYCLE = WorkKind("spec_cycle", writes_kv=True, attention="quadratic")


@dataclass(frozen=True)
class CycleLayout:
    """Geometry of one cycle: ``heads`` = D+1 heads, ``masks`` = K masks per sub-block."""

    heads: int
    masks: int

    @property
    def width(self) -> int:
        return self.masks + 1

    @property
    def num_tokens(self) -> int:
        return self.heads * self.width

    def head_row(self, j: int) -> int:
        return j * self.width

    def draft_rows(self, accepted: int) -> list[int]:
        """Rows of sub-block ``accepted`` whose predictions become the next drafts."""
        first = self.head_row(accepted)
        return list(range(first + 2, first + self.width))


def cycle_tokens(draft_length: int, drafts: int) -> int:
    """Tokens of a cycle verifying ``drafts`` drafts with ``draft_length + 1`` masks each."""
    return (drafts + 1) * (draft_length + 2)


def layout_for(req: Request, draft_length: int, drafts: list[int]) -> CycleLayout:
    """The cycle's geometry: K = draft_length + 1 masks, fewer near the end of the request
    (no point drafting past what may be emitted) or of the context (no mask at or past
    ``max_model_len``: sub-block D's last mask sits at L + D + K)."""
    heads = len(drafts) + 1
    room = req.max_model_len - 1 - req.num_computed - len(drafts)
    masks = max(0, min(draft_length + 1, req.remaining_tokens, room))
    return CycleLayout(heads, masks)


def cycle_work(seed: int, drafts: list[int], layout: CycleLayout, mask_id: int, followup) -> Work:  # type: ignore[no-untyped-def]
    """The cycle's work; ``logit_rows`` are the heads (the followup adds the draft rows)."""
    heads = [seed] + drafts
    tokens: list[int] = []
    offsets: list[int] = []
    for j, head in enumerate(heads):
        tokens += [head] + [mask_id] * layout.masks
        offsets += list(range(j, j + layout.width))
    head_rows = [layout.head_row(j) for j in range(layout.heads)]
    mask_rows = [r for r in range(len(tokens)) if r % layout.width]
    return Work(
        SPEC_CYCLE,
        tokens,
        logit_rows=head_rows,
        lora=True,
        lora_rows=mask_rows,
        position_offsets=offsets,
        kv_rows=head_rows,
        sub_block=layout.width,
        followup=followup,
    )


def row_specs(req: Request, work: Work, layout: CycleLayout) -> list[RowSpec]:
    """Head rows: greedy (sampling at temperature > 0 is rejection sampling, done by the
    mode); draft rows: the request's sampling at their positions with the draft salt."""
    base = req.num_computed
    specs = [RowSpec(0.0, 0, 1.0, req.seed, base + j + 1, SALT_SAMPLE) for j in range(layout.heads)]
    for r in work.logit_rows[layout.heads :]:
        position = base + work.offsets()[r]
        specs.append(sample_spec(req, position, SALT_DRAFT))
    return specs


def next_drafts(req: Request, results: list[RowResult], layout: CycleLayout) -> list[int]:
    """The drafts of the next cycle, from the draft rows' results (after the emission)."""
    return [r.token for r in results[layout.heads :]][: max(0, req.remaining_tokens)]


def draft_logits(logits: torch.Tensor, layout: CycleLayout) -> torch.Tensor:
    return logits[layout.heads :]
