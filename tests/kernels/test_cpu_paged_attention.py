"""``kernels.cpu_paged_attention`` (the C short-segment attention) against float64 attention
over the same pages, for every code path the C source has (AVX-512, AVX2, plain C)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from kernels import cpu_paged_attention
from tests.fixtures.c_kernels import build_for_isa

needs_kernel = pytest.mark.skipif(not cpu_paged_attention.available(),
                                  reason="no C compiler to build kernels/cpu_paged_attention.c")


def _case(seed: int, dtype: torch.dtype, group: int, d: int):
    """Random pages and segments (context, queries, causal) -> plan, tensors, dense float64 answer."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    num_pages, page_size, hkv = 128, 4, 2
    kc = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    free = list(range(num_pages))
    rnd.shuffle(free)
    # contexts below, at and across the kernel's blocks of 16 keys (ragged tails included)
    specs = [(rnd.choice([0, 1, 4, 7, 13, 15, 16, 31, 45, 77]), rnd.choice([1, 1, 2, 5]), rnd.random() < 0.5)
             for _ in range(5)]
    q_start, q_len, ctx, causal, tables = [], [], [], [], []
    t = 0
    for c, n, is_causal in specs:
        tables.append([free.pop() for _ in range(-(-c // page_size))])
        q_start.append(t), q_len.append(n), ctx.append(c), causal.append(is_causal)
        t += n + 1  # a row between segments that no segment owns
    q = torch.randn(t, hkv * group, d, generator=g).to(dtype)
    kv = torch.randn(t, 2 * hkv, d, generator=g).to(dtype)
    k, v = kv[:, :hkv], kv[:, hkv:]  # strided views, as the model's fused QKV gives them
    scale = 1 / math.sqrt(d)
    want = torch.zeros(t, hkv * group, d, dtype=torch.float64)
    for s in range(len(specs)):
        rows = [p * page_size + j % page_size for j, p in enumerate(tables[s][j // page_size] for j in range(ctx[s]))]
        keys = torch.cat([kc.reshape(-1, hkv, d)[rows], k[q_start[s] : q_start[s] + q_len[s]]]).double()
        vals = torch.cat([vc.reshape(-1, hkv, d)[rows], v[q_start[s] : q_start[s] + q_len[s]]]).double()
        for i in range(q_len[s]):
            seen = ctx[s] + (i + 1 if causal[s] else q_len[s])
            for head in range(hkv * group):
                kvh = head // group
                w = torch.softmax(keys[:seen, kvh] @ q[q_start[s] + i, head].double() * scale, dim=0)
                want[q_start[s] + i, head] = w @ vals[:seen, kvh]
    plan = cpu_paged_attention.SegmentPlan(q_start, q_len, ctx, causal, tables)
    return plan, (q, k, v, kc, vc), scale, want, q_start, q_len


def _check(lib, seed: int, dtype: torch.dtype, group: int, d: int) -> None:  # type: ignore[no-untyped-def]
    plan, (q, k, v, kc, vc), scale, want, q_start, q_len = _case(seed, dtype, group, d)
    out = torch.full(q.shape, 7.0, dtype=dtype)
    cpu_paged_attention.attend(plan, q, k, v, kc, vc, out, scale, lib)
    owned = torch.zeros(q.shape[0], dtype=torch.bool)
    for a, n in zip(q_start, q_len):
        owned[a : a + n] = True
    assert (out[~owned] == 7.0).all(), "rows outside the segments are not written"
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: the output's one rounding
    torch.testing.assert_close(out[owned].double(), want[owned], atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_float64_attention_over_the_pages(seed: int, group: int, dtype: torch.dtype) -> None:
    _check(None, seed, dtype, group, 16)


@needs_kernel
@pytest.mark.parametrize("isa", ["avx2", "plain"])
def test_other_instruction_sets(isa: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NLD_KERNEL_CACHE", str(tmp_path))
    lib = cpu_paged_attention._bind(build_for_isa(cpu_paged_attention.SOURCE, isa))
    for dtype in (torch.float32, torch.bfloat16):
        for d in (16, 12):  # 12: not a multiple of the vector width
            _check(lib, 5, dtype, 3, d)


@needs_kernel
def test_head_dim_not_a_multiple_of_the_vector_width() -> None:
    _check(None, 6, torch.float32, 2, 12)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_heads(dtype: torch.dtype) -> None:
    """head_dim 64 (several vectors per row, as in SmolLM2) with grouped query heads."""
    for seed in (21, 22):
        _check(None, seed, dtype, 3, 64)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 8])
def test_task_split_per_segment_or_per_head(threads: int) -> None:
    """Five segments are one task each at 1-2 threads and a task per (segment, KV head) at 8
    (fewer segments than twice the threads): the same answer either way."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            _check(None, 11, dtype, 3, 16)
    finally:
        torch.set_num_threads(before)


def _segment_rows_alone(lib, seed: int, d: int, isa_lengths: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
    """A causal segment of L queries over ``ctx`` cached keys, against each of its rows attended
    alone (one query over ``ctx + i`` cached keys: the earlier rows' keys stored in the pages)."""
    g = torch.Generator().manual_seed(seed)
    page_size, hkv, group = 4, 2, 3
    for ctx in (0, 3, 13, 16, 29):
        for length in isa_lengths:
            total = ctx + length
            pages = list(range(-(-total // page_size)))
            kc = torch.randn(len(pages), page_size, hkv, d, generator=g)
            vc = torch.randn(len(pages), page_size, hkv, d, generator=g)
            q = torch.randn(length, hkv * group, d, generator=g)
            # the segment's own keys are the cache's next rows (as a decode step would find them)
            k = kc.view(-1, hkv, d)[ctx:total].clone()
            v = vc.view(-1, hkv, d)[ctx:total].clone()
            together = torch.empty_like(q)
            plan = cpu_paged_attention.SegmentPlan([0], [length], [ctx], [True], [pages])
            cpu_paged_attention.attend(plan, q, k, v, kc, vc, together, 0.125, lib)
            for i in range(length):
                alone = torch.empty(1, *q.shape[1:])
                plan = cpu_paged_attention.SegmentPlan([0], [1], [ctx + i], [True], [pages])
                cpu_paged_attention.attend(plan, q[i : i + 1], k[i : i + 1], v[i : i + 1], kc, vc, alone, 0.125, lib)
                assert torch.equal(alone[0], together[i]), (ctx, length, i)


@needs_kernel
@pytest.mark.parametrize("d", [16, 64, 24])
def test_a_rows_result_does_not_depend_on_its_segments_length(d: int) -> None:
    """A verify row equals the decode step at its position bit for bit: every key's score and
    every value's FMA are computed the same way whatever the segment's length (blocks of 16
    keys, the last one partial; d = 24 takes the scalar path)."""
    _segment_rows_alone(None, 3, d, (2, 5, 16, 17))


@needs_kernel
def test_a_rows_result_does_not_depend_on_its_segments_length_avx2(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NLD_KERNEL_CACHE", str(tmp_path))
    _segment_rows_alone(cpu_paged_attention._bind(build_for_isa(cpu_paged_attention.SOURCE, "avx2")), 4, 16, (3, 17))


@needs_kernel
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("d", [16, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quadratic_segments_against_float64(seed: int, d: int, dtype: torch.dtype) -> None:
    """Segments with the quadratic self-speculation mask (kernels.reference.segment_mask), next
    to causal and bidirectional ones, against float64 attention under that mask."""
    from kernels.reference import segment_mask

    g = torch.Generator().manual_seed(seed)
    num_pages, page_size, hkv, group = 64, 4, 2, 3
    kc = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    # (ctx, L, causal, sub_block): quadratic of widths 2-4 (over 20 keys: a partial key block)
    specs = [(7, 9, False, 3), (0, 4, True, 0), (13, 12, False, 4), (3, 6, False, 2), (18, 1, True, 0)]
    tables, q_start, t = [], [], 0
    for i, (c, n, _, _) in enumerate(specs):
        tables.append(list(range(i * 12, i * 12 + -(-c // page_size))))
        q_start.append(t)
        t += n
    q = torch.randn(t, hkv * group, d, generator=g).to(dtype)
    k, v = torch.randn(t, hkv, d, generator=g).to(dtype), torch.randn(t, hkv, d, generator=g).to(dtype)
    scale = 1 / math.sqrt(d)
    want = torch.zeros(t, hkv * group, d, dtype=torch.float64)
    for s, (c, n, causal, w) in enumerate(specs):
        rows = [tables[s][j // page_size] * page_size + j % page_size for j in range(c)]
        keys = torch.cat([kc.reshape(-1, hkv, d)[rows], k[q_start[s] : q_start[s] + n]]).double()
        vals = torch.cat([vc.reshape(-1, hkv, d)[rows], v[q_start[s] : q_start[s] + n]]).double()
        inside = segment_mask(n, causal, w, torch.device("cpu"))
        for i in range(n):
            seen = torch.cat([torch.ones(c, dtype=torch.bool), inside[i]])
            for head in range(hkv * group):
                w_ = torch.softmax(keys[seen, head // group] @ q[q_start[s] + i, head].double() * scale, dim=0)
                want[q_start[s] + i, head] = w_ @ vals[seen, head // group]
    plan = cpu_paged_attention.SegmentPlan(q_start, [n for _, n, _, _ in specs], [c for c, _, _, _ in specs],
                                           [causal for _, _, causal, _ in specs], tables, [w for *_, w in specs])
    out = torch.empty_like(q)
    cpu_paged_attention.attend(plan, q, k, v, kc, vc, out, scale)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
