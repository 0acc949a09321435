"""The CPU's whole-pass path: an fp32 or bf16 forward pass as one C call (``kernels.cpu_decoder``).

On the embedded model the Python between a decode step's kernels took longer than the kernels
(on SmolLM2-135M, with 30 wider layers, about a tenth of a pass). The runner sends a pass here when

* the model runs on the fused path (not a compiled decoder) with every projection packed as
  ``kernels.cpu_sgemm`` panels: fp32 (the CPU default) on fp32 or bf16 panels, or bf16 on
  pair panels (a CPU with AVX512-BF16 and no AMX), and the C kernels are built;
* each of the pass's segments has at most ``MAX_ROWS`` rows (a larger pass runs as several
  calls, each over consecutive whole segments of at most ``MAX_ROWS`` rows in all: segments only
  read the cache and their own rows, and a later segment of a lookahead commit reads the slots
  an earlier one wrote, which the earlier call has stored), and the pass has no draft-adapter
  rows and no image features (causal, bidirectional and quadratic self-speculation segments
  all attend in the C kernel).

Everything else runs the eager fused path, which uses the same kernels. Embeddings and rotary
tables are computed here with the model's own modules; the C side does the layers and the
final norm. Single-row segments (decode steps) give the eager path's hidden states bit for
bit; longer segments attend in the C kernel instead of SDPA (same math, another summation
order).

Each row is computed on its own here, so a row's result does not depend on the rest of the
batch: a self_spec verify row gives the logits and K/V of AR's decode step at its position bit
for bit, and a request's greedy text does not change with what it is batched with (as long as
no pass it is in holds a segment over ``MAX_ROWS`` rows, a long prefill chunk: such a pass takes
the eager path, the same for every mode).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kernels import cpu_decoder
from kernels.cpu_paged_attention import SegmentPlan
from kernels.cpu_sgemm import PairPanelWeight, PanelWeight
from server.engine.batch import HostBatch, KVTensors
from server.model.model import DecoderModel

# Rows per C call. A pass with a longer segment (a long prefill chunk) keeps the eager path: MKL's
# GEMM and SDPA's tiled attention win there, and the Python around them is a small share of the pass.
MAX_ROWS = 128
# Rotary tables of positions below this come from a table built once (4 x positions x
# head_dim fp32, grown by powers of two as positions appear); later ones are computed per pass.
ROPE_TABLE_POSITIONS = 8192


class CpuDecoderPass:
    """A model and its caches bound to ``kernels.cpu_decoder`` (see the module docstring)."""

    def __init__(self, model: DecoderModel, kv: KVTensors) -> None:
        layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            assert attn.packed is not None and mlp.packed is not None
            (qkv, o), (gate_up, down) = attn.packed, mlp.packed
            assert all(isinstance(w, (PanelWeight, PairPanelWeight)) for w in (qkv, o, gate_up, down))
            layers.append(cpu_decoder.LayerWeights(layer.input_layernorm.weight.detach(), qkv, o,
                                                   layer.post_attention_layernorm.weight.detach(), gate_up, down))
        self.model = model
        self._rope = torch.empty(4, 0, model.config.head_dim)  # cos_q, sin_q, cos, sin per position
        self.decoder = cpu_decoder.DecoderPass(layers, model.norm.weight.detach(), model.norm.eps, kv.k_cache,
                                               kv.v_cache, model.config.num_heads, kv.scale)

    @classmethod
    def for_model(cls, model: DecoderModel, kv: KVTensors) -> "CpuDecoderPass | None":
        """The whole-pass path for this model, or None where it cannot run."""
        page_size, dtype = kv.k_cache.shape[2], kv.k_cache.dtype
        packed = [p for layer in model.layers for p in (layer.self_attn.packed or (None,)) + (layer.mlp.packed or (None,))]
        kind = {torch.float32: PanelWeight, torch.bfloat16: PairPanelWeight}.get(dtype)
        if not (model.fused_kernels and kv.k_cache.device.type == "cpu" and kind is not None
                and model.norm.weight.dtype == dtype and page_size & (page_size - 1) == 0
                and packed and all(isinstance(p, kind) for p in packed) and cpu_decoder.available()):
            return None
        return cls(model, kv)

    @staticmethod
    def takes(hb: HostBatch) -> bool:
        """Whether ``hb`` runs here (the runner also keeps adapter rows and images eager)."""
        return 0 < hb.num_tokens and max(hb.query_lens) <= MAX_ROWS

    def __call__(self, hb: HostBatch) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` of the batch (K/V of its rows with a slot stored).
        Called inside ``ModelRunner.run``'s inference mode."""
        t, segs = hb.num_tokens, len(hb.context_lens)
        write_rows = [row for row, slot in enumerate(hb.slots) if slot >= 0]
        width = max(1, max(len(pages) for pages in hb.tables))
        # every int64 input in one tensor (one conversion from Python lists), then views
        quadratic = any(hb.mask_block)
        ints = torch.tensor(
            hb.input_ids + hb.positions + write_rows + [hb.slots[row] for row in write_rows]
            + hb.query_start_loc[:-1] + hb.query_lens + hb.context_lens + (hb.mask_block if quadratic else [])
            + [p for pages in hb.tables for p in pages + [0] * (width - len(pages))], dtype=torch.int64)
        w, q = len(write_rows), segs if quadratic else 0
        ids, positions, rows, slots, q_start, q_len, ctx, sub_block, tables = ints.split(
            [t, t, w, w, segs, segs, segs, q, segs * width])
        segments = SegmentPlan.of_tensors(q_start, q_len, ctx, torch.tensor(hb.causal, dtype=torch.uint8),
                                          tables.view(segs, width), t, sub_block if quadratic else None)
        x = F.embedding(ids, self.model.embed_tokens.weight)
        rope = self._rope_rows(positions, max(hb.positions))
        if t <= MAX_ROWS:
            return self.decoder(x, *rope, rows, slots, segments)
        outs = []
        for s0, s1 in _groups(hb.query_lens, MAX_ROWS):
            r0, r1 = hb.query_start_loc[s0], hb.query_start_loc[s1]
            writes = (rows >= r0) & (rows < r1)
            group = SegmentPlan.of_tensors(q_start[s0:s1] - r0, q_len[s0:s1], ctx[s0:s1], segments.causal[s0:s1],
                                           segments.tables[s0:s1], r1 - r0,
                                           sub_block[s0:s1] if quadratic else None)
            outs.append(self.decoder(x[r0:r1], *(table[r0:r1] for table in rope), rows[writes] - r0, slots[writes],
                                     group))
        return torch.cat(outs)

    def _rope_rows(self, positions: torch.Tensor, top: int) -> list[torch.Tensor]:
        """The model's rotary tables (``rope_tables``) at ``positions`` (largest ``top``), four
        contiguous ``[T, head_dim]`` tensors: rows of the cached table, the same values the
        model computes per pass (elementwise functions of the position)."""
        if top >= ROPE_TABLE_POSITIONS:
            return [t.contiguous() for t in self.model.rope_tables(positions)]
        if top >= self._rope.shape[1]:
            size = min(ROPE_TABLE_POSITIONS, 1 << top.bit_length())
            self._rope = torch.stack(self.model.rope_tables(torch.arange(size)))
        return list(self._rope.index_select(1, positions))


def _groups(lengths: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive runs ``[s0, s1)`` of segments, each of at most ``limit`` rows in all (every
    length is at most ``limit``), greedily from the first."""
    groups, start, rows = [], 0, 0
    for i, n in enumerate(lengths):
        if rows + n > limit:
            groups.append((start, i))
            start, rows = i, 0
        rows += n
    groups.append((start, len(lengths)))
    return groups
