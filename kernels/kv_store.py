"""Triton kernel writing fresh K/V rows into the paged caches by slot mapping.

Invariants:

* ``k``/``v`` are ``[T, Hkv, D]``; ``k_cache``/``v_cache`` are ``[num_pages, page_size, Hkv, D]``
  with the same dtype as ``k``/``v`` (checked by ``kernels.ops``).
* Row ``t`` goes to flat slot ``slot_mapping[t]``: ``page = slot // page_size``,
  ``offset = slot % page_size``. A negative slot (-1) means "do not write" (bidirectional rows,
  padding); those programs exit without touching memory.
* One program per token row; it copies all ``Hkv x D`` values of that row for K and V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["kv_store"]


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, page_size,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcp, stride_kco, stride_kch, stride_vcp, stride_vco, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    page = slot // page_size
    offset = slot % page_size

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]

    k_row = tl.load(k_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :],
                    mask=mask)
    v_row = tl.load(v_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :],
                    mask=mask)
    tl.store(k_cache_ptr + page * stride_kcp + offset * stride_kco
             + offs_h[:, None] * stride_kch + offs_d[None, :], k_row, mask=mask)
    tl.store(v_cache_ptr + page * stride_vcp + offset * stride_vco
             + offs_h[:, None] * stride_vch + offs_d[None, :], v_row, mask=mask)


def kv_store(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Launch the store (inputs assumed validated by ``kernels.ops``); in place, no sync."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    # Moving bit patterns only, so bf16 needs no special care (even in the interpreter).
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
