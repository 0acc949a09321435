"""store_kv: Triton kernel vs the reference, -1 slots, and a store-then-attend round trip."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import ops
from kernels.attention_metadata import AttentionMetadata
from kernels.kv_store import kv_store
from kernels.reference import paged_attention_reference, store_kv_reference


def _setup(num_tokens, num_kv_heads, head_dim, page_size, num_pages, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, dtype)
    return k, v, k_cache, v_cache


def _slots(num_tokens, page_size, num_pages, seed=0):
    """Distinct random slots with every third row skipped (-1)."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:num_tokens]
    slots[::3] = -1
    return slots


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_store_matches_reference(dtype, page_size, slot_dtype, device):
    k, v, k_cache, v_cache = _setup(13, 2, 24, page_size, 4, dtype, device)
    slots = _slots(13, page_size, 4).to(device=device, dtype=slot_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_reference(k, v, k_ref, v_ref, slots)
    kv_store(k, v, k_cache, v_cache, slots)
    # A pure copy: bit-exact, and slots that were not targeted keep their old contents.
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_reference_store_semantics():
    k, v, k_cache, v_cache = _setup(5, 1, 16, 16, 3, torch.float32, torch.device("cpu"))
    before = k_cache.clone()
    slots = torch.tensor([17, -1, 0, 47, -1])
    store_kv_reference(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache[1, 1], k[0]) and torch.equal(v_cache[1, 1], v[0])
    assert torch.equal(k_cache[0, 0], k[2]) and torch.equal(v_cache[2, 15], v[3])
    touched = torch.zeros(3, 16, dtype=torch.bool)
    touched[1, 1] = touched[0, 0] = touched[2, 15] = True
    assert torch.equal(k_cache[~touched], before[~touched])


def test_all_slots_skipped_and_empty(device, force_triton):
    k, v, k_cache, v_cache = _setup(4, 1, 16, 16, 2, torch.float32, device)
    before = k_cache.clone()
    ops.store_kv(k, v, k_cache, v_cache, torch.full((4,), -1, dtype=torch.int64, device=device))
    ops.store_kv(k[:0], v[:0], k_cache, v_cache, torch.empty(0, dtype=torch.int64, device=device))
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("use_triton", [False, True])
def test_store_then_attend_round_trip(use_triton, device, monkeypatch):
    """Prefill a causal sequence in two chunks through the cache; the second chunk's output must
    equal the one-shot prefill. A bidirectional segment with -1 slots leaves the cache alone."""
    if use_triton:
        monkeypatch.setenv("NLD_FORCE_TRITON", "1")
    else:
        monkeypatch.delenv("NLD_FORCE_TRITON", raising=False)
        device = torch.device("cpu")
    num_kv_heads, group, head_dim, page_size, total, first = 2, 2, 16, 16, 40, 23
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(total, num_kv_heads * group, head_dim, generator=gen).to(device)
    k = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(device)
    v = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(device)
    k_cache = torch.zeros(6, page_size, num_kv_heads, head_dim, device=device)
    v_cache = torch.zeros_like(k_cache)
    pages = [4, 1, 5]  # non-contiguous pages of the sequence
    block_tables = torch.tensor([pages], dtype=torch.int32, device=device)
    slot_of = [pages[p // page_size] * page_size + p % page_size for p in range(total)]
    scale = 1.0 / math.sqrt(head_dim)
    i32 = dict(dtype=torch.int32, device=device)
    yes = torch.tensor([True], device=device)

    whole = AttentionMetadata(block_tables, torch.tensor([0], **i32), torch.tensor([0, total], **i32), yes, total)
    one_shot = ops.paged_attention(q, k, v, k_cache, v_cache, whole, scale)

    # A bidirectional draft over the empty cache writes nothing (-1 slots).
    ops.store_kv(k[:first], v[:first], k_cache, v_cache,
                 torch.full((first,), -1, dtype=torch.int64, device=device))
    assert not k_cache.any()

    # Chunk 1: positions 0..first-1, stored; chunk 2 attends over them through the pages.
    ops.store_kv(k[:first], v[:first], k_cache, v_cache,
                 torch.tensor(slot_of[:first], dtype=torch.int64, device=device))
    rest = AttentionMetadata(block_tables, torch.tensor([first], **i32), torch.tensor([0, total - first], **i32),
                             yes, total - first)
    second = ops.paged_attention(q[first:], k[first:], v[first:], k_cache, v_cache, rest, scale)
    torch.testing.assert_close(second, one_shot[first:], atol=1e-5, rtol=1e-5)
    whole_cpu = AttentionMetadata(block_tables.cpu(), torch.tensor([0], dtype=torch.int32),
                                  torch.tensor([0, total], dtype=torch.int32), yes.cpu())
    expected = paged_attention_reference(q.cpu(), k.cpu(), v.cpu(), k_cache.cpu(), v_cache.cpu(), whole_cpu, scale)
    torch.testing.assert_close(one_shot.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["length", "dtype", "slot dtype", "cache shape"])
def test_store_rejects_bad_inputs(case, force_reference):
    k, v, k_cache, v_cache = _setup(4, 2, 16, 16, 2, torch.float32, torch.device("cpu"))
    slots = torch.arange(4)
    if case == "length":
        slots, fragment = slots[:3], "slot_mapping must have 4"
    elif case == "dtype":
        k, v, fragment = k.half(), v.half(), "share one dtype"
    elif case == "slot dtype":
        slots, fragment = slots.float(), "slot_mapping must be"
    else:
        k_cache, v_cache, fragment = k_cache[..., :8], v_cache[..., :8], "does not match"
    with pytest.raises(ValueError, match=fragment):
        ops.store_kv(k, v, k_cache, v_cache, slots)
