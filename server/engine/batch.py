"""The inputs of one ragged forward pass, shared by the eager runner and the CUDA-graph path.

The batch is flat: the works' tokens are concatenated; per sequence we pass its cached
prefix length, query start offset, page table and attention kind (causal, bidirectional, or
the quadratic mask with its sub-block width). A work is one sequence, except a
"causal_then_block" work, which is two of the same request: its causal rows, then its block,
whose cached prefix includes the slots the causal rows write in the same pass (every
attention path stores a layer's K/V before it attends). Rows carry explicit positions; K/V
of the rows a work writes go to the slots of their positions; every other row gets slot -1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.ops import AttentionMetadata, paged_attention, store_kv
from server.engine.request import Request
from server.engine.work import Work


@dataclass
class HostBatch:
    """The batch's inputs as host lists (built once per step, copied to the device once)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    lora: list[bool] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    causal: list[bool] = field(default_factory=list)
    mask_block: list[int] = field(default_factory=list)  # per sequence; > 0: quadratic mask
    tables: list[list[int]] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)  # flat row indices whose logits are needed
    query_lens: list[int] = field(default_factory=list)
    work_starts: list[int] = field(default_factory=list)  # per work: its first flat row

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @classmethod
    def build(cls, batch: list[tuple[Request, Work]], page_size: int) -> "HostBatch":
        hb = cls()
        for req, work in batch:
            start, n = req.num_computed, len(work)
            offset = hb.num_tokens
            hb.input_ids.extend(work.token_ids)
            positions = [start + o for o in work.offsets()]
            hb.positions.extend(positions)
            hb.lora.extend(work.row_lora())
            slots = [-1] * n
            pages = req.table.pages
            for r in work.written_rows():
                p = positions[r]
                slots[r] = pages[p // page_size] * page_size + p % page_size
            hb.slots.extend(slots)
            hb.work_starts.append(offset)
            for first, end, causal, mask_block in work.segments():
                hb.context_lens.append(start + first)
                hb.query_start_loc.append(offset + end)
                hb.causal.append(causal)
                hb.mask_block.append(mask_block)
                hb.tables.append(list(req.table.pages))
                hb.query_lens.append(end - first)
            hb.logit_rows.extend(offset + r for r in work.logit_rows)
        return hb


@dataclass
class BatchMetadata:
    """Attention inputs of one ragged batch (see docs/design.md, "The attention contract"):
    the kernels' per-segment metadata plus where each row's K/V go."""

    attention: AttentionMetadata
    slot_mapping: torch.Tensor  # [T] int64, -1 = do not write


class PagedAttention:
    """The model's AttentionContext over the paged cache."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: BatchMetadata, scale: float) -> None:
        self.k_cache, self.v_cache, self.meta, self.scale = k_cache, v_cache, meta, scale

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        store_kv(k, v, kc, vc, self.meta.slot_mapping)  # first: a later segment may read these slots
        return paged_attention(q, k, v, kc, vc, self.meta.attention, self.scale)


@dataclass
class KVTensors:
    """The paged K/V cache of every layer ([layers, pages, page_size, kv_heads, head_dim]) and
    the attention scale: what a forward pass needs besides its batch."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    scale: float

    def context(self, meta: BatchMetadata) -> PagedAttention:
        return PagedAttention(self.k_cache, self.v_cache, meta, self.scale)


def padded_tables(tables: list[list[int]], rows: int, width: int) -> torch.Tensor:
    """Page tables as a zero-padded [rows, width] int32 host tensor."""
    out = torch.zeros((rows, width), dtype=torch.int32)
    for s, t in enumerate(tables):
        if t:
            out[s, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return out
