"""CUDA-graph replay of uniform batches.

A graph is captured per (batch-size bucket, query length, quadratic mask or not): query
length 1 for AR decode, the block length for denoise, draft, verify and commit passes,
B + 1 for a diffusion denoise pass with its guess row (``guess_seed``), B * (B + 1) for a
quadratic self-speculation cycle of block B. A batch whose works all have
the same query length ``q`` and whose size fits a bucket is padded to the bucket with dummy
sequences (slot -1, so they write nothing; empty prefix; causal) and replayed. Mixed or
prefill batches run eagerly.

Invariant: every input the graph reads lives in a static buffer that is fully rewritten
before each replay, and padded rows never touch the KV cache.

On the CPU (``capture=False``) the same padded static-buffer path runs eagerly, so tests can
check that padding changes nothing.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch

from kernels.ops import AttentionMetadata
from server.engine.batch import BatchMetadata, HostBatch, KVTensors, padded_tables
from server.model.model import DecoderModel

logger = logging.getLogger(__name__)


@dataclass
class StaticBuffers:
    input_ids: torch.Tensor
    positions: torch.Tensor
    lora: torch.Tensor
    slots: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    causal: torch.Tensor
    mask_block: torch.Tensor | None  # only in graphs of quadratic-mask batches
    block_tables: torch.Tensor
    hidden: torch.Tensor | None = None


class GraphRunner:
    """Replays uniform batches from graphs captured per (batch bucket, query length).

    Invariants (see the module docstring): a graph's inputs are its static buffers, fully
    rewritten by ``_fill`` before each replay; padded rows have slot -1 and an empty prefix,
    so they never touch the cache; ``try_run`` returns exactly the real rows' hidden states."""

    def __init__(
        self,
        model: DecoderModel,
        kv: KVTensors,
        device: torch.device,
        max_pages_per_seq: int,
        batch_sizes: tuple[int, ...],
        query_lens: tuple[int, ...],
        capture: bool,
    ) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.max_pages_per_seq = max_pages_per_seq
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.query_lens = tuple(sorted(set(query_lens)))
        self.capture = capture
        self.buffers: dict[tuple[int, int, bool], StaticBuffers] = {}
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0

    def bucket(self, hb: HostBatch) -> tuple[int, int, bool] | None:
        """The (batch bucket, query length, quadratic mask) that can run ``hb``, or None (run
        eagerly). A batch with a quadratic-mask segment gets its own graphs (the kernel
        variant that reads ``mask_block``)."""
        q = hb.query_lens[0]
        if q not in self.query_lens or any(n != q for n in hb.query_lens):
            return None
        if any(len(t) > self.max_pages_per_seq for t in hb.tables):
            return None
        i = bisect.bisect_left(self.batch_sizes, len(hb.query_lens))
        return (self.batch_sizes[i], q, any(hb.mask_block)) if i < len(self.batch_sizes) else None

    def _alloc(self, b: int, q: int, quadratic: bool) -> StaticBuffers:
        dev = self.device
        n = b * q
        return StaticBuffers(
            input_ids=torch.zeros(n, dtype=torch.int64, device=dev),
            positions=torch.zeros(n, dtype=torch.int64, device=dev),
            lora=torch.zeros(n, dtype=torch.bool, device=dev),
            slots=torch.full((n,), -1, dtype=torch.int64, device=dev),
            context_lens=torch.zeros(b, dtype=torch.int32, device=dev),
            query_start_loc=torch.arange(0, n + 1, q, dtype=torch.int32, device=dev),
            causal=torch.ones(b, dtype=torch.bool, device=dev),
            mask_block=torch.zeros(b, dtype=torch.int32, device=dev) if quadratic else None,
            block_tables=torch.zeros((b, self.max_pages_per_seq), dtype=torch.int32, device=dev),
        )

    def _forward(self, buf: StaticBuffers, q: int) -> torch.Tensor:
        attention = AttentionMetadata(
            buf.block_tables, buf.context_lens, buf.query_start_loc, buf.causal, q, buf.mask_block
        )
        meta = BatchMetadata(attention, buf.slots)
        lora = buf.lora if self.model.has_draft_lora else None
        return self.model(buf.input_ids, buf.positions, self.kv.context(meta), lora)

    def _fill(self, buf: StaticBuffers, hb: HostBatch, b: int, q: int) -> None:
        real = len(hb.query_lens)
        pad_tokens = (b - real) * q
        tables = padded_tables(hb.tables, b, self.max_pages_per_seq)
        host = {
            "input_ids": torch.tensor(hb.input_ids + [0] * pad_tokens, dtype=torch.int64),
            "positions": torch.tensor(hb.positions + list(range(q)) * (b - real), dtype=torch.int64),
            "lora": torch.tensor(hb.lora + [False] * pad_tokens, dtype=torch.bool),
            "slots": torch.tensor(hb.slots + [-1] * pad_tokens, dtype=torch.int64),
            "context_lens": torch.tensor(hb.context_lens + [0] * (b - real), dtype=torch.int32),
            "causal": torch.tensor(hb.causal + [True] * (b - real), dtype=torch.bool),
            "block_tables": tables,
        }
        if buf.mask_block is not None:
            host["mask_block"] = torch.tensor(hb.mask_block + [0] * (b - real), dtype=torch.int32)
        for name, value in host.items():
            getattr(buf, name).copy_(value, non_blocking=True)

    def try_run(self, hb: HostBatch) -> torch.Tensor | None:
        """Hidden states [T, hidden] for ``hb`` via a graph (captured on first use), or None."""
        key = self.bucket(hb)
        if key is None:
            return None
        b, q, quadratic = key
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = self._alloc(b, q, quadratic)
        self._fill(buf, hb, b, q)
        if not self.capture:
            return self._forward(buf, q)[: hb.num_tokens]
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(buf, key)
        graph.replay()
        self.replays += 1
        assert buf.hidden is not None
        return buf.hidden[: hb.num_tokens]

    def _capture(self, buf: StaticBuffers, key: tuple[int, int, bool]) -> torch.cuda.CUDAGraph:
        b, q, _ = key
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # the warm-up pass compiles the Triton kernels; it writes only the real rows' slots,
        # which the replay below rewrites with the same values
        with torch.cuda.stream(stream):
            self._forward(buf, q)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            buf.hidden = self._forward(buf, q)
        self.graphs[key] = graph
        logger.info("captured CUDA graph for batch %d x query length %d", b, q)
        return graph
