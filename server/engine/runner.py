"""Runs one forward pass over a ragged batch of works and returns the requested logits rows.

The batch is flat: the works' tokens are concatenated; per sequence we pass its cached
prefix length, query start offset, page table and attention kind (causal or bidirectional).
K/V of rows whose work writes the cache go to their slots; every other row gets slot -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.ops import paged_attention, store_kv
from server.engine.request import Request, Work
from server.model.model import DecoderModel


@dataclass
class BatchMetadata:
    """Attention inputs of one ragged batch (see docs/design.md, "The attention contract")."""

    slot_mapping: torch.Tensor  # [T] int64, -1 = do not write
    block_tables: torch.Tensor  # [S, max_pages] int32
    context_lens: torch.Tensor  # [S] int32
    query_start_loc: torch.Tensor  # [S + 1] int32
    causal: torch.Tensor  # [S] bool
    max_query_len: int


class PagedAttention:
    """The model's AttentionContext over the paged cache."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: BatchMetadata, scale: float) -> None:
        self.k_cache, self.v_cache, self.meta, self.scale = k_cache, v_cache, meta, scale

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.meta
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        out = paged_attention(
            q, k, v, kc, vc, m.block_tables, m.context_lens, m.query_start_loc, m.causal, self.scale, m.max_query_len
        )
        store_kv(k, v, kc, vc, m.slot_mapping)
        return out


class ModelRunner:
    """Owns the model and the KV tensors ([layers, pages, page_size, kv_heads, head_dim])."""

    def __init__(self, model: DecoderModel, num_pages: int, page_size: int, device: torch.device, dtype: torch.dtype) -> None:
        cfg = model.config
        self.model = model
        self.page_size = page_size
        self.device = device
        shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.scale = cfg.head_dim**-0.5

    def _metadata(self, batch: list[tuple[Request, Work]]) -> tuple[list[int], list[int], list[bool], BatchMetadata]:
        ids: list[int] = []
        positions: list[int] = []
        lora: list[bool] = []
        slots: list[int] = []
        ctx, qsl, causal = [], [0], []
        max_pages = max(1, max(len(r.table.pages) for r, _ in batch))
        tables = torch.zeros((len(batch), max_pages), dtype=torch.int32)
        ps = self.page_size
        for s, (req, work) in enumerate(batch):
            start = req.num_computed
            n = len(work)
            ids.extend(work.token_ids)
            positions.extend(range(start, start + n))
            lora.extend([work.lora] * n)
            if work.writes_kv:
                pages = req.table.pages
                slots.extend(pages[p // ps] * ps + p % ps for p in range(start, start + n))
            else:
                slots.extend([-1] * n)
            ctx.append(start)
            qsl.append(qsl[-1] + n)
            causal.append(work.causal)
            if req.table.pages:
                tables[s, : len(req.table.pages)] = torch.tensor(req.table.pages, dtype=torch.int32)
        dev = self.device
        meta = BatchMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            block_tables=tables.to(dev, non_blocking=True),
            context_lens=torch.tensor(ctx, dtype=torch.int32).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(dev, non_blocking=True),
            causal=torch.tensor(causal, dtype=torch.bool).to(dev, non_blocking=True),
            max_query_len=max(len(w) for _, w in batch),
        )
        return ids, positions, lora, meta

    @torch.inference_mode()
    def run(self, batch: list[tuple[Request, Work]]) -> list[torch.Tensor]:
        """One forward pass. Returns, per work, the fp32 logits of its ``logit_rows``."""
        ids, positions, lora, meta = self._metadata(batch)
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        lora_rows = torch.tensor(lora, dtype=torch.bool).to(dev) if any(lora) and self.model.has_draft_lora else None
        ctx = PagedAttention(self.k_cache, self.v_cache, meta, self.scale)
        hidden = self.model(input_ids, pos, ctx, lora_rows)
        rows: list[int] = []
        offset = 0
        for _, work in batch:
            rows.extend(offset + r for r in work.logit_rows)
            offset += len(work)
        if not rows:
            return [hidden.new_zeros((0, self.model.config.vocab_size), dtype=torch.float32) for _ in batch]
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=dev)])
        out, start = [], 0
        for _, work in batch:
            n = len(work.logit_rows)
            out.append(logits[start : start + n])
            start += n
        return out
