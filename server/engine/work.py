"""The unit of work a request contributes to a forward pass, and the kinds of pass.

A work kind is a small value type rather than a closed enum: each mode declares the kinds
it runs (``DecodeMode.work_kinds``) and the registry collects them, so a new mode can add
a kind (with its own attention pattern) without editing this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

# How the rows of one work attend to each other (every kind sees its whole cached prefix):
# "causal": row i sees rows <= i; "bidirectional": every row sees every row of the segment;
# "quadratic": the segment is sub-blocks of ``Work.sub_block`` rows, row 0 of each a head;
# heads see the heads up to their own, other rows those heads and their whole sub-block
# (the attention kernels compute it from indices: ``mask_block`` in the attention contract);
# "causal_then_block": rows before ``Work.block_start`` are causal, the rows from it on see the
# whole segment (a block denoised over the rows committed in the same pass). The batch gives
# such a work two segments, the second reading the first's K/V from the cache (stored first).
AttentionKind = Literal["causal", "bidirectional", "quadratic", "causal_then_block"]


@dataclass(frozen=True)
class WorkKind:
    """A kind of forward pass: its name (the key in per-request pass statistics), whether
    its K/V are written to the cache, and how its rows attend to each other."""

    name: str
    writes_kv: bool
    attention: AttentionKind

    def __str__(self) -> str:
        return self.name


# Causal passes over committed tokens, shared by every mode.
PREFILL = WorkKind("prefill", writes_kv=True, attention="causal")
DECODE = WorkKind("decode", writes_kv=True, attention="causal")


@dataclass
class Work:
    """One request's share of a forward pass.

    Row ``i`` sits at position ``start + offsets[i]`` where ``start`` is the request's
    ``num_computed`` (every kind of pass starts right after the cached prefix) and
    ``offsets`` is ``position_offsets`` or, by default, ``0 .. len - 1``. ``kind`` says
    whether K/V are written and how rows attend; a writing kind writes the rows listed in
    ``kv_rows`` (default: all), each to the slot of its position. ``logit_rows`` lists the
    segment rows whose logits are needed; ``followup``, if set, is called with those logits
    (same pass) and returns further rows whose logits are then computed and appended (so a
    mode can pick rows by what the first ones say). ``lora`` selects the draft-only adapter,
    for the rows in ``lora_rows`` when given. ``sub_block``: the sub-block width of a
    "quadratic" kind; ``block_start``: the first block row of a "causal_then_block" kind."""

    kind: WorkKind
    token_ids: list[int]
    logit_rows: list[int]
    lora: bool = False
    position_offsets: list[int] | None = None
    kv_rows: list[int] | None = None
    lora_rows: list[int] | None = None
    sub_block: int = 0
    block_start: int = 0
    followup: Callable[[torch.Tensor], list[int]] | None = None

    @property
    def writes_kv(self) -> bool:
        return self.kind.writes_kv

    @property
    def causal(self) -> bool:
        return self.kind.attention != "bidirectional"

    def offsets(self) -> list[int]:
        return list(range(len(self.token_ids))) if self.position_offsets is None else self.position_offsets

    def written_rows(self) -> list[int]:
        """Rows whose K/V go to the cache."""
        if not self.writes_kv:
            return []
        return list(range(len(self.token_ids))) if self.kv_rows is None else self.kv_rows

    def row_lora(self) -> list[bool]:
        if self.lora_rows is None:
            return [self.lora] * len(self.token_ids)
        on = set(self.lora_rows) if self.lora else set()
        return [i in on for i in range(len(self.token_ids))]

    def segments(self) -> list[tuple[int, int, bool, int]]:
        """The attention segments of this work: (first row, end row, causal, mask_block).
        Rows keep their positions; a segment's cached prefix ends where its first row sits."""
        if self.kind.attention == "causal_then_block":
            assert 0 < self.block_start < len(self.token_ids) and self.position_offsets is None
            return [(0, self.block_start, True, 0), (self.block_start, len(self.token_ids), False, 0)]
        return [(0, len(self.token_ids), self.causal, self.mask_block)]

    @property
    def mask_block(self) -> int:
        """The attention contract's ``mask_block`` for this segment (0: causal flag rules)."""
        return self.sub_block if self.kind.attention == "quadratic" else 0

    def __len__(self) -> int:
        return len(self.token_ids)
