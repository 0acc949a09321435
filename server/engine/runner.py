"""Runs one forward pass over a ragged batch of works and returns the requested logits rows.

The batch is flat: the works' tokens are concatenated; per sequence we pass its cached
prefix length, query start offset, page table and attention kind (causal or bidirectional).
K/V of rows whose work writes the cache go to their slots; every other row gets slot -1.

Uniform batches (every work of one query length, e.g. all AR decodes or all 32-token
blocks) can be replayed from CUDA graphs (``server.engine.cuda_graphs``); anything else runs
eagerly. Both paths share ``HostBatch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.ops import paged_attention, store_kv
from server.engine.request import Request, Work
from server.engine.vision_runner import VisionRunner
from server.model.model import DecoderModel, ImageFeatures


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
    tables: list[list[int]] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)  # flat row indices whose logits are needed
    query_lens: list[int] = field(default_factory=list)

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
            hb.positions.extend(range(start, start + n))
            hb.lora.extend([work.lora] * n)
            if work.writes_kv:
                pages = req.table.pages
                hb.slots.extend(pages[p // page_size] * page_size + p % page_size for p in range(start, start + n))
            else:
                hb.slots.extend([-1] * n)
            hb.context_lens.append(start)
            hb.query_start_loc.append(hb.query_start_loc[-1] + n)
            hb.causal.append(work.causal)
            hb.tables.append(list(req.table.pages))
            hb.logit_rows.extend(offset + r for r in work.logit_rows)
            hb.query_lens.append(n)
        return hb


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

    def __init__(
        self,
        model: DecoderModel,
        num_pages: int,
        page_size: int,
        device: torch.device,
        dtype: torch.dtype,
        max_pages_per_seq: int,
        graph_query_lens: tuple[int, ...] = (),
        graph_batch_sizes: tuple[int, ...] = (),
    ) -> None:
        cfg = model.config
        self.model = model
        self.page_size = page_size
        self.device = device
        shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.scale = cfg.head_dim**-0.5
        self.max_pages_per_seq = max_pages_per_seq
        self.vision = VisionRunner(model.vision, device) if model.vision is not None else None
        self.graphs = None
        if graph_query_lens and graph_batch_sizes:
            from server.engine.cuda_graphs import GraphRunner

            self.graphs = GraphRunner(self, graph_batch_sizes, graph_query_lens, capture=device.type == "cuda")

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def forward_eager(self, hb: HostBatch, image_features: ImageFeatures | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] of the batch, run eagerly."""
        max_pages = max(1, max(len(t) for t in hb.tables))
        tables = torch.zeros((len(hb.tables), max_pages), dtype=torch.int32)
        for s, t in enumerate(hb.tables):
            if t:
                tables[s, : len(t)] = torch.tensor(t, dtype=torch.int32)
        meta = BatchMetadata(
            slot_mapping=self._to_device(hb.slots, torch.int64),
            block_tables=tables.to(self.device, non_blocking=True),
            context_lens=self._to_device(hb.context_lens, torch.int32),
            query_start_loc=self._to_device(hb.query_start_loc, torch.int32),
            causal=self._to_device(hb.causal, torch.bool),
            max_query_len=max(hb.query_lens),
        )
        lora_rows = self._to_device(hb.lora, torch.bool) if any(hb.lora) and self.model.has_draft_lora else None
        ctx = PagedAttention(self.k_cache, self.v_cache, meta, self.scale)
        ids, positions = self._to_device(hb.input_ids, torch.int64), self._to_device(hb.positions, torch.int64)
        return self.model(ids, positions, ctx, lora_rows, image_features)

    @torch.inference_mode()
    def run(self, batch: list[tuple[Request, Work]]) -> list[torch.Tensor]:
        """One forward pass. Returns, per work, the fp32 logits of its ``logit_rows``."""
        hb = HostBatch.build(batch, self.page_size)
        hidden = None
        image_features = self.vision.features_for(batch) if self.vision is not None else None
        if self.graphs is not None and image_features is None:
            hidden = self.graphs.try_run(hb)
        if hidden is None:
            hidden = self.forward_eager(hb, image_features)
        vocab = self.model.config.vocab_size
        if not hb.logit_rows:
            return [hidden.new_zeros((0, vocab), dtype=torch.float32) for _ in batch]
        logits = self.model.compute_logits(hidden[self._to_device(hb.logit_rows, torch.int64)])
        out, start = [], 0
        for _, work in batch:
            n = len(work.logit_rows)
            out.append(logits[start : start + n])
            start += n
        return out
