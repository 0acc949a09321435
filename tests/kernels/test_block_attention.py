"""Paged attention: Triton kernels vs the PyTorch reference vs a naive dense implementation.

Every batch mixes decode rows (query length 1), prefill chunks with and without a cached
prefix, and bidirectional segments; prefixes span several pages whose ids are shuffled, and
every cache slot outside a sequence's prefix holds NaN so that any read past the contract
(padding pages, the tail of a partly filled page) poisons the result.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

from kernels import ops
from kernels.attention_metadata import AttentionMetadata
from kernels.block_attention import block_attention, choose_block_sizes, choose_num_splits
from kernels.reference import paged_attention_reference

# (context_len, query_len, causal)
MIXED = [
    (0, 7, True),     # first prefill chunk
    (37, 1, True),    # decode, prefix over 3 pages (page 16) with a partial last page
    (45, 9, True),    # prefill chunk after a prefix
    (21, 6, False),   # bidirectional canvas after a prefix
    (0, 5, False),    # bidirectional, no prefix
    (32, 1, True),    # decode exactly at a page boundary
]
LONG = [
    (150, 1, True),   # decode, long prefix
    (97, 5, True),    # verify-style causal chunk
    (130, 8, False),  # denoise block over a long prefix
    (0, 3, True),     # no prefix: every split but the last is empty
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@dataclass
class Batch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    causal: torch.Tensor
    scale: float
    max_query_len: int

    @property
    def meta(self) -> AttentionMetadata:
        return AttentionMetadata(self.block_tables, self.context_lens, self.query_start_loc, self.causal,
                                 self.max_query_len)

    def args(self) -> tuple:
        return (self.q, self.k, self.v, self.k_cache, self.v_cache, self.meta, self.scale)


def make_batch(specs, num_kv_heads: int, group: int, head_dim: int, page_size: int,
               dtype: torch.dtype, device: torch.device, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    pages_needed = [math.ceil(ctx / page_size) for ctx, _, _ in specs]
    max_pages = max(max(pages_needed), 1) + 1  # one spare column of padding
    num_pages = sum(pages_needed) + 3  # a few pages belong to nobody
    page_ids = torch.randperm(num_pages, generator=gen).tolist()

    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    block_tables = torch.empty(len(specs), max_pages, dtype=torch.int32)
    for s, ((ctx, _, _), n) in enumerate(zip(specs, pages_needed)):
        own = [page_ids.pop() for _ in range(n)]
        # Padding columns point at a foreign page: reading one would pull in NaN or junk.
        block_tables[s] = torch.tensor(own + [page_ids[0]] * (max_pages - n), dtype=torch.int32)
        for p in range(ctx):
            page, off = own[p // page_size], p % page_size
            k_cache[page, off] = torch.randn(num_kv_heads, head_dim, generator=gen)
            v_cache[page, off] = torch.randn(num_kv_heads, head_dim, generator=gen)

    q_lens = [q_len for _, q_len, _ in specs]
    num_tokens = sum(q_lens)
    q = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=gen)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    return Batch(
        q=dev(q), k=dev(k), v=dev(v), k_cache=dev(k_cache), v_cache=dev(v_cache),
        block_tables=block_tables.to(device),
        context_lens=torch.tensor([c for c, _, _ in specs], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        causal=torch.tensor([c for _, _, c in specs], dtype=torch.bool, device=device),
        scale=1.0 / math.sqrt(head_dim),
        max_query_len=max(q_lens),
    )


def naive_attention(b: Batch) -> torch.Tensor:
    """Independent dense version: per sequence and query head, in float64, explicit mask."""
    out = torch.zeros(b.q.shape, dtype=torch.float64)
    group = b.q.shape[1] // b.k.shape[1]
    page_size = b.k_cache.shape[1]
    starts = b.query_start_loc.tolist()
    for s, ctx in enumerate(b.context_lens.tolist()):
        start, end = starts[s], starts[s + 1]
        keys, values = [], []
        for p in range(ctx):  # the prefix, one slot at a time through the block table
            page = int(b.block_tables[s, p // page_size])
            keys.append(b.k_cache[page, p % page_size])
            values.append(b.v_cache[page, p % page_size])
        for t in range(start, end):  # then the segment's own fresh keys
            keys.append(b.k[t])
            values.append(b.v[t])
        K = torch.stack(keys).double().cpu()  # [N, Hkv, D]
        V = torch.stack(values).double().cpu()
        n_keys = K.shape[0]
        mask = torch.zeros(end - start, n_keys, dtype=torch.bool)
        for i in range(end - start):
            for j in range(n_keys):
                mask[i, j] = j < ctx or not bool(b.causal[s]) or (j - ctx) <= i
        for h in range(b.q.shape[1]):
            qh = b.q[start:end, h].double().cpu()
            scores = qh @ K[:, h // group].T * b.scale
            scores = scores.masked_fill(~mask, float("-inf"))
            out[start:end, h] = torch.softmax(scores, dim=-1) @ V[:, h // group]
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all(), "non-finite output (a masked slot was read?)"
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=tol, rtol=tol), f"max abs error {err:.3g}"


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_matches_naive(dtype, group, page_size):
    b = make_batch(MIXED, num_kv_heads=2, group=group, head_dim=16, page_size=page_size,
                   dtype=dtype, device=torch.device("cpu"))
    out = paged_attention_reference(*b.args())
    assert out.dtype == dtype and out.shape == b.q.shape
    assert_close(out, naive_attention(b), dtype)


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(dtype, group, page_size, device):
    b = make_batch(MIXED, num_kv_heads=2, group=group, head_dim=16, page_size=page_size,
                   dtype=dtype, device=device)
    # Default tiles: 64 keys, so key tiles cross page boundaries for both page sizes.
    out = block_attention(*b.args(), num_splits=1)
    assert out.dtype == dtype
    assert_close(out, paged_attention_reference(*b.args()), dtype)


@pytest.mark.parametrize("group", [1, 4])
def test_triton_small_tiles(group, device):
    """16-row / 16-key tiles: several query blocks per segment (causal tile skipping) and key
    tiles that lie inside one 32-slot page."""
    b = make_batch(MIXED + [(40, 21, True)], num_kv_heads=2, group=group, head_dim=16,
                   page_size=32, dtype=torch.float32, device=device, seed=1)
    out = block_attention(*b.args(), num_splits=1, block_m=16, block_n=16)
    assert_close(out, paged_attention_reference(*b.args()), torch.float32)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_kv_matches_reference(dtype, group, num_splits, device):
    b = make_batch(LONG, num_kv_heads=2, group=group, head_dim=16, page_size=16, dtype=dtype,
                   device=device, seed=2)
    out = block_attention(*b.args(), num_splits=num_splits, block_n=32)
    assert_close(out, paged_attention_reference(*b.args()), dtype)


def test_split_kv_chosen_automatically(device):
    # One decode row, wide block table: the grid is tiny and the prefix bound long.
    b = make_batch([(600, 1, True)], num_kv_heads=2, group=2, head_dim=16, page_size=32,
                   dtype=torch.float32, device=device, seed=3)
    _, block_q, _ = choose_block_sizes(b.max_query_len, 2, 16)
    q_blocks = math.ceil(b.max_query_len / block_q)
    assert choose_num_splits(1, q_blocks, 2, b.block_tables.shape[1] * 32, device) > 1
    assert_close(block_attention(*b.args()), paged_attention_reference(*b.args()), torch.float32)


def test_split_heuristic_stays_off_for_big_grids(monkeypatch):
    cpu = torch.device("cpu")
    assert choose_num_splits(64, 4, 8, 4096, cpu) == 1  # enough programs already
    assert choose_num_splits(1, 1, 1, 128, cpu) == 1  # prefix too short to be worth it
    assert 1 < choose_num_splits(1, 1, 1, 1 << 16, cpu) <= 16
    # the H200's 132 SMs: a block pass at batch 8 (128 programs) splits, decode at batch 32 does not
    import kernels.block_attention as ba

    monkeypatch.setattr(ba, "_num_sms", lambda device: 132)
    assert choose_num_splits(8, 2, 8, 4096, cpu) == 3
    assert choose_num_splits(32, 1, 8, 4096, cpu) == 1
    assert choose_num_splits(8, 1, 8, 4096, cpu) == 5


def test_odd_head_dim_and_group(device):
    """head_dim 24 (padded to 32 in the kernel), 3 query heads per KV head, q a strided view."""
    b = make_batch(MIXED, num_kv_heads=1, group=3, head_dim=24, page_size=16,
                   dtype=torch.float32, device=device, seed=4)
    fused = torch.cat([b.q, b.k, b.v], dim=1)  # [T, Hq + 2 Hkv, D] like a fused QKV projection
    b.q = fused[:, :3]
    assert not b.q.is_contiguous()
    expected = naive_attention(b)
    assert_close(paged_attention_reference(*b.args()), expected, torch.float32)
    assert_close(block_attention(*b.args(), num_splits=1), expected, torch.float32)
    assert_close(block_attention(*b.args(), num_splits=3, block_n=16), expected, torch.float32)


def test_bf16_runs_and_is_close(device):
    b = make_batch(MIXED, num_kv_heads=2, group=2, head_dim=16, page_size=16,
                   dtype=torch.bfloat16, device=device, seed=5)
    out = block_attention(*b.args(), num_splits=1)
    assert out.dtype == torch.bfloat16
    assert_close(out, paged_attention_reference(*b.args()), torch.bfloat16)


def test_ops_dispatch_cpu(force_reference, monkeypatch):
    b = make_batch(MIXED, num_kv_heads=2, group=2, head_dim=16, page_size=16,
                   dtype=torch.float32, device=torch.device("cpu"), seed=6)
    ref = ops.paged_attention(*b.args())
    assert torch.equal(ref, paged_attention_reference(*b.args()))
    monkeypatch.setenv("NLD_FORCE_TRITON", "1")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs the interpreter")
    assert_close(ops.paged_attention(*b.args()), ref, torch.float32)
    # max_query_len omitted: computed from query_start_loc.
    no_len = AttentionMetadata(b.block_tables, b.context_lens, b.query_start_loc, b.causal)
    assert_close(ops.paged_attention(b.q, b.k, b.v, b.k_cache, b.v_cache, no_len, b.scale), ref, torch.float32)


def test_empty_batch(device, force_triton):
    b = make_batch([(5, 1, True)], num_kv_heads=1, group=1, head_dim=16, page_size=16,
                   dtype=torch.float32, device=device)
    q = b.q[:0]
    empty = AttentionMetadata(b.block_tables[:0], b.context_lens[:0], b.query_start_loc[:1], b.causal[:0], 0)
    out = block_attention(q, b.k[:0], b.v[:0], b.k_cache, b.v_cache, empty, b.scale)
    assert out.shape == (0, 1, 16)
    cpu = make_batch([(5, 1, True)], num_kv_heads=1, group=1, head_dim=16, page_size=16,
                     dtype=torch.float32, device=torch.device("cpu"))
    empty = AttentionMetadata(cpu.block_tables[:0], cpu.context_lens[:0], cpu.query_start_loc[:1], cpu.causal[:0])
    out = paged_attention_reference(cpu.q[:0], cpu.k[:0], cpu.v[:0], cpu.k_cache, cpu.v_cache, empty, cpu.scale)
    assert out.shape == (0, 1, 16)


def _bad_inputs():
    """(description, mutate(args list) -> None, message fragment)."""

    def setter(indices, fn):
        indices = (indices,) if isinstance(indices, int) else indices

        def mutate(args):
            for i in indices:
                args[i] = fn(args[i])
        return mutate

    return [
        ("q rank", setter(0, lambda t: t[0]), "q must be"),
        ("q dtype", setter(0, lambda t: t.half()), "dtype"),
        ("k rows", setter((1, 2), lambda t: t[1:]), "rows"),
        ("gqa", setter(0, lambda t: torch.cat([t, t[:, :1]], dim=1)), "multiple of"),
        ("cache heads", setter((3, 4), lambda t: t[:, :, :1].contiguous()), "does not match"),
        ("cache layout", setter(3, lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)),
         "contiguous"),
        ("q last dim", setter(0, lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)),
         "last"),
        ("int dtype", setter(5, lambda t: t.long()), "int32"),
        ("context_lens dtype", setter(6, lambda t: t.long()), "context_lens"),
        ("query_start_loc len", setter(7, lambda t: t[:-1]), "query_start_loc"),
        ("causal dtype", setter(8, lambda t: t.int()), "causal"),
        ("scale", setter(9, lambda s: -1.0), "scale"),
        ("max_query_len", setter(10, lambda m: 1.5), "max_query_len"),
        ("int kv", setter(1, lambda t: t.int()), "float16/bfloat16/float32"),
    ]


@pytest.mark.parametrize("name,mutate,fragment", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_ops_rejects_bad_inputs(name, mutate, fragment, force_reference):
    b = make_batch(MIXED, num_kv_heads=2, group=2, head_dim=16, page_size=16,
                   dtype=torch.float32, device=torch.device("cpu"))
    # the flat argument list of before: q, k, v, k_cache, v_cache, 4 metadata tensors, scale, max_query_len
    args = [b.q, b.k, b.v, b.k_cache, b.v_cache, b.block_tables, b.context_lens, b.query_start_loc, b.causal,
            b.scale, b.max_query_len]
    mutate(args)
    meta = AttentionMetadata(args[5], args[6], args[7], args[8], args[10])
    with pytest.raises(ValueError, match=fragment):
        ops.paged_attention(*args[:5], meta, args[9])
