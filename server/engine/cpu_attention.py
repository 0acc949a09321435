"""The engine's attention over the paged cache on the CPU, planned once per forward pass.

``kernels.reference.paged_attention_reference`` (the contract's reference) reads the batch
metadata back from tensors, gathers whole pages and rebuilds its masks in every layer. Here
everything that depends only on the batch's shape is computed once per step from the host
lists (``HostBatch``) and every layer reuses it:

* the flat cache rows to write (``slot >= 0``) and the rows of the batch they come from;
* per group of segments of one query length ``L``: the batch rows of its queries, the flat
  cache rows of each segment's prefix (padded to the group's longest prefix) and the
  visibility mask (additive: 0 or -inf, in the attention's math dtype), laid out for queries
  grouped by KV head (row ``g * L + i``), or None when every key is visible.

Decode rows (segments of one query) skip all that where ``kernels.cpu_paged_attention`` is
built: after the stores, one C call per layer attends every such segment straight from its
pages in fp32 (no gathered copies, no mask). The other segments:

Per layer: one ``index_copy_`` per cache for the stores, then per group one ``index_select``
per cache (prefix and, for segments that store their K/V, their own rows read back; other
segments concatenate their fresh keys) and one ``scaled_dot_product_attention`` whose batch
is (sequence, KV head), so a KV head's keys are never repeated for its query heads. Same
visibility as the reference (see docs/design.md, "The attention contract"); padded prefix
rows are masked out and every query sees at least its own segment, so no softmax row is
empty. The math is fp32 like the reference's, except for bf16 tensors, which attend in bf16
(torch's CPU flash kernel accumulates in fp32; outputs within about one bf16 rounding of the
reference's): casting the gathered prefix to fp32 in every layer cost more than the attention
itself (bf16 decode at batch 16 over 200 tokens: 1.19 -> 0.75 ms per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from kernels import cpu_paged_attention
from kernels.reference import segment_mask

# Segments of at most this many queries (decode rows) attend in kernels.cpu_paged_attention
# where it is built. SmolLM2-135M, a batch-16 decode over 249-256 cached tokens (ragged, so
# SDPA needs a mask), interleaved A/B: attention 19-21 ms per pass against 21-27 ms for
# gather + SDPA in bf16, 23.5-25.6 against 27-30 ms in fp32; at 2-8 queries per segment the
# kernel measured 0.6-2.2x of SDPA, mixed, so those segments keep SDPA.
NATIVE_MAX_QUERY_LEN = 1


@dataclass
class SegmentGroup:
    """Segments of one query length, attended as one batch."""

    num_seqs: int
    query_len: int
    rows: torch.Tensor | None  # [S * L] batch rows of the group's tokens; None = all rows, in order
    prefix_rows: torch.Tensor | None  # [S * K] flat cache rows to read per segment; None: nothing to read
    prefix_len: int  # P: the longest prefix in the group
    stored: bool  # the segments' own K/V are read from the cache too (K = P + L; else K = P)
    mask: torch.Tensor | None  # [S, 1, G * L, P + L] additive: 0 visible, -inf hidden; None = all visible


def _group_mask(ctx_lens: list[int], causal: list[bool], mask_blocks: list[int], q_len: int, prefix_len: int,
                group: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Visibility of key ``j`` (prefix slots ``0..P-1``, then the segment's ``L`` keys) to
    query ``i``: a real prefix key (``j < ctx``), or a segment key that
    ``kernels.reference.segment_mask`` shows it (causal, bidirectional, or the quadratic
    self-speculation mask where ``mask_block > 0``). Additive (0 or -inf) in ``dtype``: SDPA
    would convert a bool mask in every layer; this is built once per step."""
    padded = any(c != prefix_len for c in ctx_lens)
    if not padded and not (q_len > 1 and (any(causal) or any(mask_blocks))):
        return None
    kinds = {kind: segment_mask(q_len, *kind, torch.device("cpu")) for kind in set(zip(causal, mask_blocks))}
    inside = torch.stack([kinds[kind] for kind in zip(causal, mask_blocks)])  # [S, L, L]
    prefix = torch.arange(prefix_len) < torch.tensor(ctx_lens)[:, None]  # [S, P]
    visible = torch.cat([prefix[:, None, :].expand(-1, q_len, -1), inside], dim=-1)  # [S, L, P + L]
    hidden = ~visible.repeat(1, group, 1).unsqueeze(1)
    return torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, float("-inf"))


def _prefix_rows(tables: list[list[int]], ctx_lens: list[int], prefix_len: int, page_size: int,
                 own_slots: list[list[int]] | None) -> torch.Tensor:
    """``[S * K]`` flat cache rows: per segment, positions ``0..ctx-1`` through its pages, row
    0 as padding up to ``prefix_len`` (masked out), then its ``own_slots`` when given
    (``K = prefix_len + L``). Built with tensor ops, not a Python loop per cached token."""
    num_pages = -(-prefix_len // page_size)
    pages = torch.tensor([t[:num_pages] + [0] * (num_pages - len(t[:num_pages])) for t in tables], dtype=torch.int64)
    rows = (pages[:, :, None] * page_size + torch.arange(page_size)).view(len(tables), -1)[:, :prefix_len]
    rows = rows.masked_fill(torch.arange(prefix_len) >= torch.tensor(ctx_lens)[:, None], 0)
    if own_slots is not None:
        rows = torch.cat([rows, torch.tensor(own_slots, dtype=torch.int64)], dim=1)
    return rows.reshape(-1)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16 attends in bf16 (the flash kernel accumulates in fp32); everything else in fp32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without a dispatch when it is already that dtype (called per layer)."""
    return t if t.dtype == dtype else t.to(dtype)


class CpuPagedAttention:
    """The model's AttentionContext on the CPU (see the module docstring)."""

    def __init__(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: list[int],
        context_lens: list[int],
        query_start_loc: list[int],
        causal: list[bool],
        tables: list[list[int]],
        num_q_heads: int,
        scale: float,
        mask_blocks: list[int] | None = None,
    ) -> None:
        """Host lists per sequence (``mask_blocks``: the attention contract's ``mask_block``,
        all 0 when None) and per token (``slots``; ``-1``: not stored)."""
        mask_blocks = mask_blocks or [0] * len(context_lens)
        self.k_cache, self.v_cache, self.scale = k_cache, v_cache, scale
        assert k_cache.dim() == 5, "caches are [layers, pages, page_size, Hkv, D]"
        page_size, num_kv_heads = k_cache.shape[2], k_cache.shape[3]
        self.group = num_q_heads // num_kv_heads
        num_tokens = query_start_loc[-1]
        assert len(slots) == num_tokens, "one slot per token"

        write = [t for t, s in enumerate(slots) if s >= 0]
        self.write_slots = torch.tensor([slots[t] for t in write], dtype=torch.int64) if write else None
        self.write_rows = None if len(write) == num_tokens else torch.tensor(write, dtype=torch.int64)

        by_len: dict[int, list[int]] = {}
        for s in range(len(context_lens)):
            n = query_start_loc[s + 1] - query_start_loc[s]
            if n > 0:
                by_len.setdefault(n, []).append(s)
        # short segments attend in the C kernel, straight from the pages (no gathered copies);
        # it knows the causal and bidirectional rules only
        short = [s for n, seqs in by_len.items() if n <= NATIVE_MAX_QUERY_LEN for s in seqs if not mask_blocks[s]] \
            if cpu_paged_attention.takes(k_cache.dtype, page_size) else []
        self.native = None if not short else cpu_paged_attention.SegmentPlan(
            [query_start_loc[s] for s in short], [query_start_loc[s + 1] - query_start_loc[s] for s in short],
            [context_lens[s] for s in short], [causal[s] for s in short], [tables[s] for s in short])
        self.groups: list[SegmentGroup] = []
        in_kernel = set(short)
        for q_len, seqs in by_len.items():
            seqs = [s for s in seqs if s not in in_kernel]
            if not seqs:
                continue
            whole = len(by_len) == 1 and len(seqs) * q_len == num_tokens
            rows = None if whole else torch.tensor(
                [t for s in seqs for t in range(query_start_loc[s], query_start_loc[s + 1])], dtype=torch.int64)
            ctx = [context_lens[s] for s in seqs]
            prefix_len = max(ctx)
            # segments that store their own K/V before attending read them back with their
            # prefix in one gather (no concatenation)
            stored = all(slots[t] >= 0 for s in seqs for t in range(query_start_loc[s], query_start_loc[s + 1]))
            prefix_rows = None
            if prefix_len > 0 or stored:
                own = [slots[query_start_loc[s] : query_start_loc[s + 1]] for s in seqs] if stored else None
                prefix_rows = _prefix_rows([tables[s] for s in seqs], ctx, prefix_len, page_size, own)
            mask = _group_mask(ctx, [causal[s] for s in seqs], [mask_blocks[s] for s in seqs], q_len, prefix_len,
                               self.group, _math_dtype(k_cache.dtype))
            self.groups.append(SegmentGroup(len(seqs), q_len, rows, prefix_rows, prefix_len, stored, mask))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]``; stores k/v rows with a slot."""
        kc = self.k_cache[layer].view(-1, *k.shape[1:])
        vc = self.v_cache[layer].view(-1, *v.shape[1:])
        if self.write_slots is not None:
            rows = self.write_rows
            kc.index_copy_(0, self.write_slots, _as(k if rows is None else k.index_select(0, rows), kc.dtype))
            vc.index_copy_(0, self.write_slots, _as(v if rows is None else v.index_select(0, rows), vc.dtype))
        if self.native is not None:
            whole = self.native.rows == q.shape[0]
            out = (torch.empty if whole else torch.zeros)(q.shape, dtype=q.dtype)
            cpu_paged_attention.attend(self.native, q, k, v, self.k_cache[layer], self.v_cache[layer], out, self.scale)
        elif len(self.groups) == 1 and self.groups[0].rows is None:
            return self._attend_group(self.groups[0], q, k, v, kc, vc)
        else:
            out = torch.zeros_like(q)
        for g in self.groups:
            assert g.rows is not None
            part = self._attend_group(g, q.index_select(0, g.rows), k.index_select(0, g.rows),
                                      v.index_select(0, g.rows), kc, vc)
            out.index_copy_(0, g.rows, part)
        return out

    def _attend_group(self, g: SegmentGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        s, n = g.num_seqs, g.query_len
        hq, d = q.shape[1], q.shape[2]
        hkv = k.shape[1]
        if g.stored:
            assert g.prefix_rows is not None
            keys = kc.index_select(0, g.prefix_rows).view(s, g.prefix_len + n, hkv, d)
            values = vc.index_select(0, g.prefix_rows).view(s, g.prefix_len + n, hkv, d)
        else:
            keys, values = k.view(s, n, hkv, d), v.view(s, n, hkv, d)
            if g.prefix_rows is not None:
                pk = kc.index_select(0, g.prefix_rows).view(s, g.prefix_len, hkv, d)
                pv = vc.index_select(0, g.prefix_rows).view(s, g.prefix_len, hkv, d)
                keys, values = torch.cat([_as(pk, k.dtype), keys], dim=1), torch.cat([_as(pv, v.dtype), values], dim=1)
        # queries of one KV head side by side: [S, Hkv, G * L, D], row g * L + i
        qh = q.view(s, n, hkv, self.group, d).permute(0, 2, 3, 1, 4).reshape(s, hkv, self.group * n, d)
        math_dtype = _math_dtype(q.dtype)
        out = F.scaled_dot_product_attention(
            _as(qh, math_dtype), _as(keys.transpose(1, 2), math_dtype), _as(values.transpose(1, 2), math_dtype),
            attn_mask=None if g.mask is None else _as(g.mask, math_dtype), scale=self.scale,
        )  # [S, Hkv, G * L, D]
        out = out.view(s, hkv, self.group, n, d).permute(0, 3, 1, 2, 4).reshape(s * n, hq, d)
        return _as(out, q.dtype)
