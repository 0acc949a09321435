"""The CPU fast path equals the plain PyTorch reference.

* ``CpuPagedAttention`` against ``kernels.reference`` (attention output and the cache
  contents it leaves) on ragged batches mixing decode rows, causal chunks and bidirectional
  blocks, partial pages and empty prefixes, through gather + SDPA, through the C kernel, and
  through both in one batch; segments with the quadratic self-speculation mask among them;
* the engine's logits through the fast path (fused projections, the per-step attention
  plan) against the unfused model on the reference attention, over prefill, decode,
  denoise, draft, verify, lookahead-commit and quadratic self_spec passes, fp32 within 1e-5 of the logits' scale.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from kernels import cpu_paged_attention
from kernels.attention_metadata import AttentionMetadata
from kernels.reference import paged_attention_reference, store_kv_reference
from server.engine import cpu_attention
from server.engine.cpu_attention import CpuPagedAttention, _prefix_rows
from server.engine.cpu_threads import configure_cpu_threads, default_cpu_threads
from server.engine.modes.diffusion import COMMIT_LOOKAHEAD, DENOISE
from server.engine.modes.self_spec import DRAFT, VERIFY
from server.engine.modes.self_spec_quadratic import SPEC_CYCLE
from server.engine.work import DECODE, PREFILL, Work
from server.engine.batch import HostBatch
from server.model.loader import load_model
from server.config import DEFAULT_MODEL_DIR, EngineConfig
from server.engine.engine import LLMEngine
from tests.engine.helpers import make_engine, model_for
from server.engine.params import DecodeParams, RequestParams, SamplingParams


def _ragged_case(seed: int, dtype: torch.dtype, group: int):
    """A random ragged batch over a random paged cache (2 layers): (host lists, tensors)."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    layers, num_pages, page_size, hkv, d = 2, 40, 4, 2, 8
    kc = torch.randn(layers, num_pages, page_size, hkv, d, generator=g).to(dtype)
    vc = torch.randn(layers, num_pages, page_size, hkv, d, generator=g).to(dtype)
    free = list(range(num_pages))
    rnd.shuffle(free)
    # (context, query length, causal): decodes, a causal chunk, bidirectional blocks, empty prefix
    specs = [(rnd.choice([0, 3, 4, 9, 17]), rnd.choice([1, 1, 3, 5]), rnd.random() < 0.6) for _ in range(6)]
    specs += [(0, 4, True), (6, 5, False), (10, 1, True)]
    slots, ctx_lens, qsl, causal, tables = [], [], [0], [], []
    for ctx, n, is_causal in specs:
        pages = [free.pop() for _ in range(-(-(ctx + n) // page_size))]
        tables.append(pages)
        writes = is_causal
        slots.extend(pages[p // page_size] * page_size + p % page_size if writes else -1 for p in range(ctx, ctx + n))
        ctx_lens.append(ctx)
        qsl.append(qsl[-1] + n)
        causal.append(is_causal)
    t = qsl[-1]
    q = torch.randn(t, hkv * group, d, generator=g).to(dtype)
    k = torch.randn(t, hkv, d, generator=g).to(dtype)
    v = torch.randn(t, hkv, d, generator=g).to(dtype)
    return (slots, ctx_lens, qsl, causal, tables), (q, k, v, kc, vc)


def _reference(host, tensors, scale: float, layer: int, mask_blocks: list[int] | None = None):
    slots, ctx_lens, qsl, causal, tables = host
    q, k, v, kc, vc = tensors
    width = max(len(p) for p in tables)
    bt = torch.tensor([p + [0] * (width - len(p)) for p in tables], dtype=torch.int32)
    meta = AttentionMetadata(bt, torch.tensor(ctx_lens, dtype=torch.int32), torch.tensor(qsl, dtype=torch.int32),
                             torch.tensor(causal), max(b - a for a, b in zip(qsl, qsl[1:])),
                             None if mask_blocks is None else torch.tensor(mask_blocks, dtype=torch.int32))
    out = paged_attention_reference(q, k, v, kc[layer], vc[layer], meta, scale)
    store_kv_reference(k, v, kc[layer], vc[layer], torch.tensor(slots))
    return out


@pytest.fixture(params=["sdpa", "kernel", "mixed"])
def attention_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which of CpuPagedAttention's two paths the segments take: gather + SDPA, the C kernel
    (``kernels.cpu_paged_attention``) for every segment whatever its length, or both in one
    batch as served (decode rows in the kernel, longer segments through SDPA)."""
    if request.param != "sdpa" and not cpu_paged_attention.available():
        pytest.skip("no C compiler for kernels/cpu_paged_attention.c")
    monkeypatch.setattr(cpu_paged_attention, "enabled", request.param != "sdpa")
    if request.param == "kernel":
        monkeypatch.setattr(cpu_attention, "NATIVE_MAX_QUERY_LEN", 1 << 20)
    return request.param


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("group", [1, 3])
def test_cpu_attention_matches_reference_fp32(seed: int, group: int, attention_path: str) -> None:
    host, tensors = _ragged_case(seed, torch.float32, group)
    q, k, v, kc, vc = tensors
    ref_kc, ref_vc = kc.clone(), vc.clone()
    ctx = CpuPagedAttention(kc, vc, *host, num_q_heads=q.shape[1], scale=0.35)
    assert (ctx.native is not None) == (attention_path != "sdpa")
    assert (len(ctx.groups) > 0) == (attention_path != "kernel")
    for layer in range(2):
        expected = _reference(host, (q, k, v, ref_kc, ref_vc), 0.35, layer)
        got = ctx.attend(layer, q, k, v)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_quadratic_segments_match_reference(dtype: torch.dtype, attention_path: str) -> None:
    """Segments with the quadratic self-speculation mask (``mask_block`` W > 0: sub-blocks of
    W rows, head rows stored, mask rows not), next to a decode row, a causal chunk and a
    bidirectional block; with and without a cached prefix. They never take the C kernel."""
    g = torch.Generator().manual_seed(11)
    layers, num_pages, page_size, hkv, d, group = 2, 24, 4, 2, 8, 3
    kc = torch.randn(layers, num_pages, page_size, hkv, d, generator=g).to(dtype)
    vc = torch.randn(layers, num_pages, page_size, hkv, d, generator=g).to(dtype)
    # (context, query length, causal, mask_block)
    specs = [(5, 6, True, 2), (0, 8, False, 4), (9, 1, True, 0), (3, 3, True, 0), (6, 5, False, 0), (2, 6, True, 3)]
    slots, ctx_lens, qsl, causal, tables, mask_blocks = [], [], [0], [], [], []
    free = list(range(num_pages))
    for ctx, n, is_causal, w in specs:
        pages = [free.pop() for _ in range(-(-(ctx + n) // page_size))]
        tables.append(pages)
        for i in range(n):  # quadratic: each sub-block's head row is stored (its position: ctx + sub-block)
            stored = (i % w == 0) if w else is_causal
            p = ctx + (i // w if w else i)
            slots.append(pages[p // page_size] * page_size + p % page_size if stored else -1)
        ctx_lens.append(ctx)
        qsl.append(qsl[-1] + n)
        causal.append(is_causal)
        mask_blocks.append(w)
    host = (slots, ctx_lens, qsl, causal, tables)
    t = qsl[-1]
    q = torch.randn(t, hkv * group, d, generator=g).to(dtype)
    k, v = torch.randn(t, hkv, d, generator=g).to(dtype), torch.randn(t, hkv, d, generator=g).to(dtype)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    ctx = CpuPagedAttention(kc, vc, *host, num_q_heads=q.shape[1], scale=0.35, mask_blocks=mask_blocks)
    if ctx.native is not None:
        assert not any(mask_blocks[s] for s in range(len(specs)) if qsl[s] in ctx.native.q_start.tolist())
    for layer in range(2):
        expected = _reference(host, (q, k, v, ref_kc, ref_vc), 0.35, layer, mask_blocks)
        got = ctx.attend(layer, q, k, v)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)


def test_cpu_attention_bf16_close_to_reference(attention_path: str) -> None:
    host, tensors = _ragged_case(7, torch.bfloat16, 3)
    q, k, v, kc, vc = tensors
    ref_kc, ref_vc = kc.clone(), vc.clone()
    ctx = CpuPagedAttention(kc, vc, *host, num_q_heads=q.shape[1], scale=0.35)
    got = ctx.attend(1, q, k, v)
    expected = _reference(host, (q, k, v, ref_kc, ref_vc), 0.35, 1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(kc, ref_kc)


def test_uniform_decode_batch_needs_no_mask_only_when_prefixes_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_paged_attention, "enabled", False)  # the SDPA path's plan
    kc = torch.zeros(1, 8, 4, 1, 2)
    same = CpuPagedAttention(kc, kc.clone(), [5, 13], [5, 5], [0, 1, 2], [True, True], [[0, 1], [2, 3]], 1, 1.0)
    assert len(same.groups) == 1 and same.groups[0].mask is None and same.groups[0].rows is None
    ragged = CpuPagedAttention(kc, kc.clone(), [5, 9], [5, 1], [0, 1, 2], [True, True], [[0, 1], [2, 3]], 1, 1.0)
    assert ragged.groups[0].mask is not None


def _drive(engine, reference: bool, seed: int) -> list[torch.Tensor]:
    """Logits of a scripted series of passes over two requests (prefill, decode, denoise,
    draft with the adapter where the model has one, verify)."""
    runner = engine.runner
    if reference:
        runner.cpu_attention = False
    params = RequestParams(SamplingParams(max_tokens=1), DecodeParams(mode="ar"))
    rnd = random.Random(seed)
    vocab = engine.model_config.vocab_size
    reqs = [engine.add_request(f"r{i}", [rnd.randrange(4, vocab) for _ in range(n)], params) for i, n in enumerate((11, 23))]
    for r in reqs:
        engine.kv.allocate(r.table, 64)
    logits: list[torch.Tensor] = []

    def run(works):
        batch = list(zip(reqs, works))
        out = runner.run(batch)
        logits.extend(out)
        for r, w in batch:
            r.num_computed += len(w.written_rows())

    run([Work(PREFILL, r.prompt_ids, [len(r.prompt_ids) - 1]) for r in reqs])
    for _ in range(3):
        run([Work(DECODE, [rnd.randrange(4, vocab)], [0]) for _ in reqs])
    mask = engine.model_config.mask_token_id
    run([Work(DENOISE, [mask] * 8, list(range(8))) for _ in reqs])
    run([Work(DRAFT, [5] + [mask] * 3, [1, 2, 3], lora=True) for _ in reqs])
    run([Work(VERIFY, [rnd.randrange(4, vocab) for _ in range(4)], [0, 1, 2, 3]) for _ in reqs])
    # a ragged batch: one decode row next to a denoise block
    run([Work(DECODE, [7], [0]), Work(DENOISE, [mask] * 8, list(range(8)))])
    # a diffusion commit with lookahead (two segments: committed rows, then the next canvas)
    # next to a decode row
    run([Work(COMMIT_LOOKAHEAD, [9, 10, 11] + [mask] * 4, [2, 3, 4, 5, 6], kv_rows=[0, 1, 2], block_start=3),
         Work(DECODE, [8], [0])])
    # a quadratic self_spec cycle (three sub-blocks of a head and two masks) next to a decode row
    run([Work(SPEC_CYCLE, [12, mask, mask, 13, mask, mask, 14, mask, mask], [0, 1, 2, 3, 6], lora=True,
              lora_rows=[1, 2, 4, 5, 7, 8], position_offsets=[0, 1, 2, 1, 2, 3, 2, 3, 4], kv_rows=[0, 3, 6],
              sub_block=3),
         Work(DECODE, [6], [0])])
    return logits


def _fresh_model(which: str):
    """A new, unfused fp32 copy of the tiny random model or of the embedded model."""
    if which == "tiny":
        return copy.deepcopy(model_for(3))
    return load_model(str(DEFAULT_MODEL_DIR), dtype=torch.float32)


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_engine_fast_path_logits_equal_reference(which: str, attention_path: str) -> None:
    def engine(model):  # type: ignore[no-untyped-def]
        if which == "tiny":
            return make_engine(model)
        return LLMEngine(model, EngineConfig(model=str(DEFAULT_MODEL_DIR), device="cpu", kv_cache_tokens=4096,
                                             max_model_len=256, page_size=8))

    fast = engine(_fresh_model(which))
    assert fast.model.fused_kernels and fast.runner.cpu_attention
    # the reference: the unfused model (q/k/v and gate/up apart) on kernels.ops' reference attention
    ref = engine(_fresh_model(which))
    ref.model = ref.runner.model = _fresh_model(which)
    assert not ref.model.fused_kernels
    got, expected = _drive(fast, False, 1), _drive(ref, True, 1)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        # fp32 within 1e-5 of the logits' scale: other summation orders (fused GEMMs, the C
        # kernels) move a logit by a few of the largest logit's ulps, small logits included
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-5)


def test_cpu_threads_default_uses_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_cpu_threads(16) == 3, "an explicit OMP_NUM_THREADS wins"
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert default_cpu_threads(1) == 1
    assert default_cpu_threads(2) == 2
    assert default_cpu_threads(16) == 16
    assert default_cpu_threads(0) == 1
    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError):
            configure_cpu_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("seed", range(4))
def test_prefix_rows_follow_the_page_tables(seed: int) -> None:
    """Every cached position maps to page * page_size + offset of its own table; padding is
    row 0; the segment's own slots follow when it stores its K/V."""
    rnd = random.Random(seed)
    page_size = rnd.choice([1, 4, 16])
    ctx = [rnd.choice([0, 1, page_size, 37]) for _ in range(rnd.randint(1, 5))]
    tables = [rnd.sample(range(200), -(-c // page_size) + rnd.randint(0, 2)) for c in ctx]
    own = [[rnd.randrange(3200) for _ in range(3)] for _ in ctx] if seed % 2 else None
    prefix_len = max(ctx)
    want = []
    for i, (t, c) in enumerate(zip(tables, ctx)):
        want += [t[p // page_size] * page_size + p % page_size for p in range(c)] + [0] * (prefix_len - c)
        want += own[i] if own is not None else []
    assert _prefix_rows(tables, ctx, prefix_len, page_size, own).tolist() == want
