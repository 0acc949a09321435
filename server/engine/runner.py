"""Runs one forward pass over a ragged batch of works and returns the requested logits rows.

The batch's inputs are built by ``server.engine.batch``. Uniform batches (every work of one
query length, e.g. all AR decodes or all 32-token blocks) can be replayed from CUDA graphs (``server.engine.cuda_graphs``); anything else runs
eagerly. Both paths share ``HostBatch``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from kernels.ops import AttentionMetadata, use_triton
from server.engine.batch import BatchMetadata, HostBatch, KVTensors, padded_tables
from server.engine.cpu_attention import CpuPagedAttention
from server.engine.cpu_decoder_pass import CpuDecoderPass
from server.engine.cuda_graphs import GraphRunner
from server.engine.request import Request
from server.engine.vision_runner import VisionRunner
from server.engine.work import Work
from server.model.model import DecoderModel, ImageFeatures

if TYPE_CHECKING:
    from server.engine.cpu_compile import CompiledDecoder

log = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model and the KV tensors ([layers, pages, page_size, kv_heads, head_dim]).

    Invariant: a pass writes K/V only to the slots of works whose kind writes the cache;
    the graph path (when enabled) returns the same hidden states as the eager one."""

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
        cpu_compile: bool = False,
    ) -> None:
        cfg = model.config
        self.model = model
        self.page_size = page_size
        self.device = device
        shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        zeros = torch.zeros(shape, dtype=dtype, device=device)
        self.kv = KVTensors(zeros, torch.zeros_like(zeros), cfg.head_dim**-0.5)
        self.max_pages_per_seq = max_pages_per_seq
        # the CPU attention path (server.engine.cpu_attention); False: the kernels.ops reference
        self.cpu_attention = device.type == "cpu" and not use_triton(device)
        # torch.compile'd decoder for the CPU path's passes (server.engine.cpu_compile)
        self.compiled: CompiledDecoder | None = None
        if cpu_compile and self.cpu_attention:
            self.compiled = self._compile_cpu(model)
        # fp32 passes of a few rows as one C call (server.engine.cpu_decoder_pass)
        self.cpu_pass = CpuDecoderPass.for_model(model, self.kv) if self.cpu_attention and self.compiled is None else None
        self.vision = VisionRunner(model.vision, device) if model.vision is not None else None
        self.graphs: GraphRunner | None = None
        if graph_query_lens and graph_batch_sizes:
            self.graphs = self.graph_runner(graph_batch_sizes, graph_query_lens, capture=device.type == "cuda")

    def _compile_cpu(self, model: DecoderModel) -> CompiledDecoder | None:
        """The compiled decoder, warmed up; None (and the eager fast path with its prepacked
        weights) where compiling fails, e.g. on a machine without a C++ compiler."""
        from server.engine.cpu_compile import CompiledDecoder  # imports inductor: only when asked

        try:
            compiled = CompiledDecoder(model)
            seconds = compiled.warm_up(self.kv.k_cache, self.kv.v_cache, self.kv.scale)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: serve eagerly instead
            log.warning("--cpu-compile: compiling the decoder failed, running eagerly (%s: %s)",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            model.prepack_cpu_weights()
            return None
        log.info("compiled the decoder for the CPU in %.1f s", seconds)
        return compiled

    def graph_runner(self, batch_sizes: tuple[int, ...], query_lens: tuple[int, ...], capture: bool) -> GraphRunner:
        """A CUDA-graph runner over this runner's model and cache (``capture=False``: the
        padded static-buffer path, run eagerly)."""
        return GraphRunner(self.model, self.kv, self.device, self.max_pages_per_seq, batch_sizes, query_lens, capture)

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def forward_eager(self, hb: HostBatch, image_features: ImageFeatures | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] of the batch, run eagerly."""
        lora_rows = self._to_device(hb.lora, torch.bool) if any(hb.lora) and self.model.has_draft_lora else None
        if self.cpu_attention:
            if self.cpu_pass is not None and lora_rows is None and image_features is None and self.cpu_pass.takes(hb):
                return self.cpu_pass(hb)
            ctx = CpuPagedAttention(self.kv.k_cache, self.kv.v_cache, hb.slots, hb.context_lens, hb.query_start_loc,
                                    hb.causal, hb.tables, self.model.config.num_heads, self.kv.scale, hb.mask_block)
            ids, positions = torch.tensor(hb.input_ids), torch.tensor(hb.positions)
            if (self.compiled is not None and lora_rows is None and image_features is None
                    and self.compiled.runs(len(hb.input_ids))):
                return self.compiled(ids, positions, ctx)
            return self.model(ids, positions, ctx, lora_rows, image_features)
        tables = padded_tables(hb.tables, len(hb.tables), max(1, max(len(t) for t in hb.tables)))
        attention = AttentionMetadata(
            block_tables=tables.to(self.device, non_blocking=True),
            context_lens=self._to_device(hb.context_lens, torch.int32),
            query_start_loc=self._to_device(hb.query_start_loc, torch.int32),
            causal=self._to_device(hb.causal, torch.bool),
            max_query_len=max(hb.query_lens),
            mask_block=self._to_device(hb.mask_block, torch.int32) if any(hb.mask_block) else None,
        )
        meta = BatchMetadata(attention, slot_mapping=self._to_device(hb.slots, torch.int64))
        ctx = self.kv.context(meta)
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
        return self._followups(batch, hb, hidden, out)

    def _followups(
        self, batch: list[tuple[Request, Work]], hb: HostBatch, hidden: torch.Tensor, out: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Append the logits of the rows each work's ``followup`` asks for after seeing its
        first logits (the rows are added to ``work.logit_rows``)."""
        for i, (_, work) in enumerate(batch):
            if work.followup is None:
                continue
            extra = work.followup(out[i])
            if extra:
                offset = hb.work_starts[i]
                rows = self._to_device([offset + r for r in extra], torch.int64)
                out[i] = torch.cat([out[i], self.model.compute_logits(hidden[rows])])
                work.logit_rows = work.logit_rows + extra
        return out
