"""The unit of work a request contributes to a forward pass, and the kinds of pass.

A work kind is a small value type rather than a closed enum: each mode declares the kinds
it runs (``DecodeMode.work_kinds``) and the registry collects them, so a new mode can add
a kind (with its own attention pattern) without editing this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How the rows of one work attend to each other (every kind sees its whole cached prefix):
# "causal": row i sees rows <= i; "bidirectional": every row sees every row of the segment.
# A future kind with a custom mask adds a value here and a branch in the attention kernels.
AttentionKind = Literal["causal", "bidirectional"]


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

    Its tokens sit at positions ``start .. start + len(token_ids) - 1`` where ``start`` is the
    request's ``num_computed`` (every kind of pass starts right after the cached prefix).
    ``kind`` says whether K/V are written and how rows attend; ``logit_rows`` lists the
    segment rows whose logits are needed. ``lora`` selects the draft-only adapter."""

    kind: WorkKind
    token_ids: list[int]
    logit_rows: list[int]
    lora: bool = False

    @property
    def writes_kv(self) -> bool:
        return self.kind.writes_kv

    @property
    def causal(self) -> bool:
        return self.kind.attention == "causal"

    def __len__(self) -> int:
        return len(self.token_ids)
