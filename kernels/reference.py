"""PyTorch reference of every kernel; also the production path on the CPU.

The functions here follow the attention contract of ``docs/design.md`` exactly:

* ``q`` is ``[T, Hq, D]``; ``k``/``v`` are ``[T, Hkv, D]`` (the fresh keys/values of the same
  ``T`` tokens); ``Hq % Hkv == 0`` and query head ``h`` reads KV head ``h // (Hq // Hkv)``.
* ``k_cache``/``v_cache`` are ``[num_pages, page_size, Hkv, D]``; sequence ``s`` owns the pages
  listed in ``block_tables[s]``, and token position ``p`` of its prefix lives at
  ``page = block_tables[s, p // page_size]``, ``offset = p % page_size``.
* Segment ``s`` is rows ``query_start_loc[s]:query_start_loc[s + 1]``; it sits at positions
  ``context_lens[s] ..``; its own keys come from ``k``/``v`` (never from the cache).
* ``causal[s]``: query ``i`` sees the whole prefix plus segment keys ``0..i``; otherwise it sees
  the whole prefix plus the whole segment. ``mask_block[s] = W > 0`` (optional) replaces that
  rule by the quadratic mask (``segment_mask``).

Scores, softmax and the weighted sum are computed in fp32; the output has ``q``'s dtype.
The integer metadata is read on the host (``.tolist()``), which is fine on the CPU path.

The elementwise references (``rms_norm_reference``, ``rotary_qk_reference``,
``silu_mul_reference``) spell out the math of ``server.model.layers`` (``RMSNorm.forward``,
``apply_rotary``, the SwiGLU gate) op for op, so on the CPU the fused model path gives the
same numbers as the unfused one.
"""

from __future__ import annotations

import torch

from kernels.attention_metadata import AttentionMetadata

__all__ = [
    "paged_attention_reference", "store_kv_reference", "rms_norm_reference",
    "rotary_qk_reference", "silu_mul_reference",
]


def _gather_prefix(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """Rows ``0..length-1`` of one sequence's paged cache as a dense ``[length, Hkv, D]``."""
    if length == 0:
        return cache.new_empty((0, cache.shape[2], cache.shape[3]))
    page_size = cache.shape[1]
    num_pages = -(-length // page_size)
    dense = cache.index_select(0, pages[:num_pages].long())  # [n, page_size, Hkv, D]
    return dense.reshape(num_pages * page_size, cache.shape[2], cache.shape[3])[:length]


def segment_mask(q_len: int, causal: bool, sub_block: int, device: torch.device) -> torch.Tensor:
    """``[q_len, q_len]`` bool: which of its segment's keys each query row sees.

    ``sub_block = W > 0``: the quadratic mask. The segment is sub-blocks of ``W`` rows, row 0
    of each a head: a head key of sub-block ``j`` is seen by every row of sub-blocks ``>= j``,
    and a non-head row also sees every row of its own sub-block. Otherwise causal (row ``i``
    sees keys ``0..i``) or bidirectional (every key)."""
    idx = torch.arange(q_len, device=device)
    if sub_block > 0:
        sub, is_head = idx // sub_block, idx % sub_block == 0
        sees_head = is_head[None, :] & (sub[None, :] <= sub[:, None])
        same_sub = ~is_head[:, None] & (sub[None, :] == sub[:, None])
        return sees_head | same_sub
    if causal:
        return idx[None, :] <= idx[:, None]
    return torch.ones((q_len, q_len), dtype=torch.bool, device=device)


def paged_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    meta: AttentionMetadata, scale: float,
) -> torch.Tensor:
    """Attention of every segment over its cached prefix plus its own fresh keys.

    Returns ``[T, Hq, D]`` in ``q``'s dtype. Rows of ``q`` not covered by any segment are zero.
    ``meta.max_query_len`` is not needed here.
    """
    block_tables = meta.block_tables
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.zeros_like(q)

    starts = meta.query_start_loc.tolist()
    ctx_lens = meta.context_lens.tolist()
    is_causal = meta.causal.tolist()
    sub_blocks = meta.mask_block.tolist() if meta.mask_block is not None else [0] * len(ctx_lens)
    lens = {b - a for a, b in zip(starts, starts[1:])}
    if len(ctx_lens) > 1 and len(lens) == 1 and starts[-1] == num_tokens and 0 not in lens:
        return _uniform_batch_attention(
            q, (k, v), (k_cache, v_cache), block_tables, (ctx_lens, is_causal, sub_blocks), scale
        )
    for s, ctx in enumerate(ctx_lens):
        start, end = starts[s], starts[s + 1]
        q_len = end - start
        if q_len == 0:
            continue
        pages = block_tables[s]
        keys = torch.cat([_gather_prefix(k_cache, pages, ctx), k[start:end]]).float()
        values = torch.cat([_gather_prefix(v_cache, pages, ctx), v[start:end]]).float()

        # [L, Hkv, G, D] -> [Hkv, G*L, D] so one batched matmul serves every query head of a
        # KV head (row index = g * L + i).
        qs = q[start:end].float().reshape(q_len, num_kv_heads, group, head_dim)
        qs = qs.permute(1, 2, 0, 3).reshape(num_kv_heads, group * q_len, head_dim)
        scores = torch.matmul(qs, keys.permute(1, 2, 0)) * scale  # [Hkv, G*L, N]

        if is_causal[s] or sub_blocks[s] > 0:
            prefix = torch.ones((q_len, ctx), dtype=torch.bool, device=q.device)
            own = segment_mask(q_len, is_causal[s], sub_blocks[s], q.device)
            visible = torch.cat([prefix, own], dim=1).repeat(group, 1)  # [G*L, N]
            scores = scores.masked_fill(~visible, float("-inf"))

        probs = torch.softmax(scores, dim=-1)
        ctx_out = torch.matmul(probs, values.permute(1, 0, 2))  # [Hkv, G*L, D]
        ctx_out = ctx_out.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3)
        out[start:end] = ctx_out.reshape(q_len, num_q_heads, head_dim).to(q.dtype)
    return out


def _uniform_batch_attention(
    q: torch.Tensor,
    fresh: tuple[torch.Tensor, torch.Tensor],
    cache: tuple[torch.Tensor, torch.Tensor],
    block_tables: torch.Tensor,
    segments: tuple[list[int], list[bool], list[int]],
    scale: float,
) -> torch.Tensor:
    """The same attention for a batch whose segments all have one length (e.g. all decode
    rows): every sequence's prefix is gathered at once, padded to the longest, and one
    masked batched attention replaces the per-sequence loop. ``fresh`` = (k, v), ``cache`` =
    (k_cache, v_cache), ``segments`` = (context lengths, causal flags, quadratic sub-block
    widths) as host lists."""
    (k, v), (k_cache, v_cache), (ctx_lens, is_causal, sub_blocks) = fresh, cache, segments
    num_seqs = len(ctx_lens)
    q_len = q.shape[0] // num_seqs
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    page_size = k_cache.shape[1]
    max_ctx = max(ctx_lens)
    num_pages = -(-max_ctx // page_size)
    pages = block_tables[:, :num_pages].long()
    fresh_k = k.view(num_seqs, q_len, num_kv_heads, head_dim)
    fresh_v = v.view(num_seqs, q_len, num_kv_heads, head_dim)
    prefix_k = k_cache[pages].reshape(num_seqs, num_pages * page_size, num_kv_heads, head_dim)[:, :max_ctx]
    prefix_v = v_cache[pages].reshape(num_seqs, num_pages * page_size, num_kv_heads, head_dim)[:, :max_ctx]
    # padded prefix slots (past a shorter sequence's prefix) may hold anything: zero them
    dev = q.device
    in_prefix = torch.arange(max_ctx, device=dev)[None, :] < torch.tensor(ctx_lens, device=dev)[:, None]
    prefix_k = prefix_k.masked_fill(~in_prefix[:, :, None, None], 0)
    prefix_v = prefix_v.masked_fill(~in_prefix[:, :, None, None], 0)
    keys = torch.cat([prefix_k, fresh_k], dim=1).float().permute(0, 2, 3, 1)  # [S, Hkv, D, N]
    values = torch.cat([prefix_v, fresh_v], dim=1).float().permute(0, 2, 1, 3)  # [S, Hkv, N, D]
    qs = q.float().view(num_seqs, q_len, num_kv_heads, group, head_dim)
    qs = qs.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, group * q_len, head_dim)
    scores = torch.matmul(qs, keys) * scale  # [S, Hkv, G*L, N]

    own = torch.stack([segment_mask(q_len, c, w, dev) for c, w in zip(is_causal, sub_blocks)])
    visible = torch.cat([in_prefix[:, None, :].expand(num_seqs, q_len, max_ctx), own], dim=2)
    visible = visible.repeat(1, group, 1)  # [S, G*L, N]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values)  # [S, Hkv, G*L, D]
    out = out.view(num_seqs, num_kv_heads, group, q_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(num_seqs * q_len, num_q_heads, head_dim).to(q.dtype)


def store_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write row ``t`` of ``k``/``v`` to flat cache slot ``slot_mapping[t]`` in place.

    ``page = slot // page_size``, ``offset = slot % page_size``; rows whose slot is negative
    (-1) are skipped.
    """
    keep = slot_mapping >= 0
    if not bool(keep.any()):
        return
    slots = slot_mapping[keep].long()
    page_size = k_cache.shape[1]
    pages, offsets = slots // page_size, slots % page_size
    k_cache[pages, offsets] = k[keep].to(k_cache.dtype)
    v_cache[pages, offsets] = v[keep].to(v_cache.dtype)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, new_residual)``: ``x = x + residual`` first when a residual is given (the sum, in
    ``x``'s dtype, is ``new_residual``; otherwise ``new_residual`` is ``x`` itself), then
    ``y = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)``, as ``RMSNorm.forward``."""
    if residual is not None:
        x = x + residual
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype), x


def rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox (rotate-half) rotary of ``x`` ``[..., H, D]`` with tables ``[..., D]`` (fp32 math,
    output in ``x``'s dtype)."""
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)).to(x.dtype)


def rotary_qk_reference(
    q: torch.Tensor, k: torch.Tensor, cos_q: torch.Tensor, sin_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotate-half rotary: ``q`` ``[..., Hq, D]`` with the query tables, ``k``
    ``[..., Hkv, D]`` with the plain ones (tables ``[..., D]``, fp32); as ``apply_rotary``."""
    return rotate_half_reference(q, cos_q, sin_q), rotate_half_reference(k, cos, sin)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` over the halves ``g, u`` of the last dimension, in fp32, cast back."""
    n = gate_up.shape[-1] // 2
    g, u = gate_up[..., :n].float(), gate_up[..., n:].float()
    return (torch.nn.functional.silu(g) * u).to(gate_up.dtype)
