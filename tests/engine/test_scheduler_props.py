"""Scheduler and KV cache: property tests (random arrivals, aborts and preemption under a tiny
page pool) and deterministic unit tests of KVCacheManager."""

from __future__ import annotations

import functools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.engine.kv_cache import KVCacheManager, PageTable
from tests.engine.helpers import Driver, make_engine, model_for, to_params

# ------------------------------------------------------------------------------ properties
MAX_LEN = 48
PAGE = 4
POOL = 56  # 14 pages: one full-length sequence plus two pages, so concurrent requests preempt
MODEL_SEED = 3

_rng = random.Random(7)
_shared = [_rng.randrange(3, 300) for _ in range(9)]
PROMPTS = [
    _shared + [_rng.randrange(3, 300) for _ in range(n)] for n in (1, 6, 11)
] + [[_rng.randrange(3, 300) for _ in range(n)] for n in (3, 14, 20)]
SPECS = [
    dict(mode="ar", max_tokens=12),
    dict(mode="ar", max_tokens=30),
    dict(mode="diffusion", block_length=4, refine_steps=2, policy="threshold", max_tokens=13),
    dict(mode="diffusion", block_length=8, refine_steps=8, policy="low_confidence", max_tokens=30),
    dict(mode="diffusion", block_length=8, refine_steps=3, policy="leftmost", max_tokens=21, seed_first_position=False),
    dict(mode="diffusion", block_length=4, refine_steps=4, policy="low_confidence", max_tokens=1),
    dict(mode="diffusion", block_length=4, refine_steps=2, threshold=0.2, lookahead=True, max_tokens=17),
    dict(mode="self_spec", block_length=4, max_tokens=20),
    dict(mode="self_spec", block_length=8, max_tokens=33),
    dict(mode="self_spec", block_length=2, max_tokens=5),
]


@functools.lru_cache(maxsize=None)
def alone(prompt_idx: int, spec_idx: int) -> tuple[tuple[int, ...], str]:
    """Greedy tokens and finish reason of one request run alone on a roomy engine."""
    eng = make_engine(model_for(MODEL_SEED), max_model_len=MAX_LEN, kv_cache_tokens=1024, page_size=PAGE)
    out = eng.generate([PROMPTS[prompt_idx]], to_params(SPECS[spec_idx]))[0]
    return tuple(out["token_ids"]), out["finish_reason"]


request_st = st.fixed_dictionaries(
    {
        "prompt": st.integers(0, len(PROMPTS) - 1),
        "spec": st.integers(0, len(SPECS) - 1),
        "arrival": st.integers(0, 6),
        "abort": st.one_of(st.none(), st.integers(0, 25)),  # steps after arrival
    }
)
scenario_st = st.fixed_dictionaries(
    {
        "requests": st.lists(request_st, min_size=3, max_size=6),
        "prefix_caching": st.booleans(),
        "budget": st.sampled_from([8, 13, 2048]),
        "max_num_seqs": st.sampled_from([2, 64]),
    }
)


def test_random_arrivals_aborts_and_preemption() -> None:
    totals = {"preemptions": 0, "aborted_mid_block": 0, "aborted_mid_cycle": 0, "finished": 0, "cached": 0}

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(scenario_st)
    def run(scenario: dict) -> None:
        eng = make_engine(
            model_for(MODEL_SEED),
            max_model_len=MAX_LEN,
            kv_cache_tokens=POOL,
            page_size=PAGE,
            enable_prefix_caching=scenario["prefix_caching"],
            max_num_batched_tokens=scenario["budget"],
            max_num_seqs=scenario["max_num_seqs"],
        )
        d = Driver(eng)
        reqs = {f"q{i}": r for i, r in enumerate(scenario["requests"])}
        last_arrival = max(r["arrival"] for r in reqs.values())
        step = 0
        while step <= last_arrival or eng.has_work:
            for rid, r in reqs.items():
                if r["arrival"] == step:
                    d.add(rid, PROMPTS[r["prompt"]], to_params(SPECS[r["spec"]]))
                if r["abort"] is not None and r["arrival"] + r["abort"] == step and rid in eng.requests:
                    state = eng.requests[rid].mode_state
                    totals["aborted_mid_block"] += getattr(state, "canvas", None) is not None
                    totals["aborted_mid_cycle"] += getattr(state, "drafts", None) is not None
                    d.abort(rid)
                    eng.check_integrity()
            d.step()  # checks the pool's integrity
            step += 1
            assert step < 5000, "no progress"
        assert set(d.done) == set(reqs)
        for rid, r in reqs.items():
            got = d.done[rid]
            want_tokens, want_reason = alone(r["prompt"], r["spec"])
            if got.finish_reason == "abort":
                assert tuple(got.token_ids) == want_tokens[: len(got.token_ids)], rid
            else:
                assert (tuple(got.token_ids), got.finish_reason) == (want_tokens, want_reason), (rid, r)
                totals["finished"] += 1
                totals["cached"] += got.stats.cached_prompt_tokens
        assert not eng.requests and not eng.scheduler.running and not eng.scheduler.waiting
        assert eng.kv.num_free_pages == eng.kv.num_pages, "leaked pages"
        totals["preemptions"] += eng.scheduler.num_preemptions

    run()
    assert totals["preemptions"] > 0, totals
    assert totals["aborted_mid_block"] > 0 and totals["aborted_mid_cycle"] > 0, totals
    assert totals["finished"] > 0 and totals["cached"] > 0, totals


def test_preemption_keeps_emitted_tokens_and_outputs() -> None:
    """A deterministic preemption case: three long requests on a pool for one and a bit. Each
    ends with its solo tokens, and its streamed increments concatenate to them."""
    eng = make_engine(model_for(MODEL_SEED), max_model_len=MAX_LEN, kv_cache_tokens=POOL, page_size=PAGE)
    d = Driver(eng)
    picks = [(5, 1), (4, 7), (3, 3)]
    for i, (p, s) in enumerate(picks):
        d.add(f"p{i}", PROMPTS[p], to_params(SPECS[s]))
    d.run()
    assert eng.scheduler.num_preemptions > 0
    assert sum(d.done[f"p{i}"].stats.preemptions for i in range(3)) == eng.scheduler.num_preemptions
    for i, (p, s) in enumerate(picks):
        assert (tuple(d.done[f"p{i}"].token_ids), d.done[f"p{i}"].finish_reason) == alone(p, s)
    assert eng.kv.num_free_pages == eng.kv.num_pages


# ------------------------------------------------------------------------ KVCacheManager
def _fill(kv: KVCacheManager, tokens: list[int]) -> PageTable:
    """A request whose ``tokens`` are all computed and committed."""
    t = PageTable()
    assert kv.allocate(t, len(tokens))
    kv.cache_full_pages(t, tokens, len(tokens))
    return t


def test_prefix_hits_follow_the_hash_chain_and_never_cover_the_prompt() -> None:
    kv = KVCacheManager(num_pages=16, page_size=4)
    a = list(range(10, 22))  # 3 full pages
    ta = _fill(kv, a)
    assert len(ta.hashes) == 3

    t = PageTable()
    assert kv.match_prefix(t, a + [99]) == 12 and t.pages == ta.pages
    kv.free(t)
    t = PageTable()
    assert kv.match_prefix(t, a) == 8, "the whole prompt must never be a hit (its last token needs logits)"
    assert t.pages == ta.pages[:2]
    kv.free(t)
    t = PageTable()
    assert kv.match_prefix(t, a[:4] + [0, 0, 0, 0] + a[8:] + [1]) == 4  # page 2 differs
    kv.free(t)
    t = PageTable()
    assert kv.match_prefix(t, [0, 0, 0, 0] + a[4:] + [1]) == 0  # same page 2/3 tokens, other parent
    kv.free(t)
    t = PageTable()
    assert kv.match_prefix(t, a[:3]) == 0
    kv.free(t)
    # a partial page is never hashed
    tb = _fill(kv, [5, 6, 7, 8, 9, 10])
    assert len(tb.hashes) == 1
    kv.check_integrity([ta, tb])
    assert kv.prefix_hits == 12 + 8 + 4


def test_prefix_caching_disabled_never_hits() -> None:
    kv = KVCacheManager(num_pages=8, page_size=4, enable_prefix_caching=False)
    a = list(range(12))
    _fill(kv, a)
    t = PageTable()
    assert kv.match_prefix(t, a + [1]) == 0 and not t.pages


def test_shared_prefix_ref_counts() -> None:
    kv = KVCacheManager(num_pages=8, page_size=4)
    a = list(range(1, 11))  # 2 full pages + 2 tokens
    ta = _fill(kv, a)
    tb = PageTable()
    assert kv.match_prefix(tb, a[:8] + [50, 51]) == 8
    assert kv.allocate(tb, 10)
    assert tb.pages[:2] == ta.pages[:2] and tb.pages[2] != ta.pages[2]
    assert [kv.ref_counts[p] for p in ta.pages] == [2, 2, 1]
    kv.check_integrity([ta, tb])
    with pytest.raises(AssertionError):
        kv.check_integrity([ta])  # tb's references are unaccounted for
    kv.free(ta)
    assert [kv.ref_counts[p] for p in tb.pages] == [1, 1, 1]
    assert kv.num_free_pages == 8 - 3
    kv.check_integrity([tb])
    kv.free(tb)
    assert kv.num_free_pages == 8
    kv.check_integrity([])


def test_lru_eviction_order_of_cached_free_pages() -> None:
    kv = KVCacheManager(num_pages=6, page_size=2)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    ta, tb = _fill(kv, a), _fill(kv, b)  # pages 0,1 and 2,3
    kv.free(ta)  # freed tail first: A's last page is older in the LRU than its first
    kv.free(tb)
    # never-used pages go first, then A's tail, A's head, B's tail, B's head
    tc = PageTable()
    assert kv.allocate(tc, 2 * 3)
    assert tc.pages == [4, 5, 1]  # 1 = A's tail page
    t = PageTable()
    assert kv.match_prefix(t, a + [0]) == 2, "A's tail page was evicted, its head survives"
    kv.free(t)  # A's head becomes most recently used
    t = PageTable()
    assert kv.match_prefix(t, b + [0]) == 4
    kv.free(t)  # B's pages now most recent: B tail, then B head
    td = PageTable()
    assert kv.allocate(td, 2)
    assert td.pages == [0], "A's head was the least recently used cached page"
    t = PageTable()
    assert kv.match_prefix(t, a + [0]) == 0
    kv.free(t)
    t = PageTable()
    assert kv.match_prefix(t, b + [0]) == 4
    kv.check_integrity([tc, td, t])


def test_eviction_forgets_the_hash() -> None:
    kv = KVCacheManager(num_pages=2, page_size=2)
    ta = _fill(kv, [1, 2, 3, 4])
    kv.free(ta)
    tb = _fill(kv, [9, 9, 8, 8])  # reuses both pages
    assert set(kv.hash_to_page.values()) == set(tb.pages)
    t = PageTable()
    assert kv.match_prefix(t, [1, 2, 3, 4, 5]) == 0
    kv.check_integrity([tb])


def test_allocate_is_all_or_nothing() -> None:
    kv = KVCacheManager(num_pages=3, page_size=4)
    t = PageTable()
    assert not kv.allocate(t, 13)
    assert t.pages == [] and kv.num_free_pages == 3
    assert kv.allocate(t, 12) and kv.num_free_pages == 0
    assert kv.allocate(t, 12)  # already holds it
    assert not kv.allocate(t, 13)


def test_truncate_across_page_boundaries() -> None:
    kv = KVCacheManager(num_pages=8, page_size=4)
    tokens = list(range(100, 114))
    t = _fill(kv, tokens)  # 4 pages, 3 hashed
    assert len(t.pages) == 4 and len(t.hashes) == 3
    kv.truncate(t, 13)
    assert len(t.pages) == 4
    kv.truncate(t, 12)
    assert len(t.pages) == 3 and len(t.hashes) == 3
    kv.truncate(t, 9)
    assert len(t.pages) == 3
    kv.truncate(t, 5)
    assert len(t.pages) == 2 and len(t.hashes) == 2
    kv.truncate(t, 1)
    assert len(t.pages) == 1 and len(t.hashes) == 1
    assert kv.num_free_pages == 7
    kv.check_integrity([t])
    # grows again after a truncation and re-hashes only what is full
    assert kv.allocate(t, 10)
    kv.cache_full_pages(t, tokens[:4] + [7] * 6, 10)
    assert len(t.hashes) == 2
    kv.check_integrity([t])
    kv.truncate(t, 0)
    assert t.pages == [] and kv.num_free_pages == 8


def test_integrity_check_catches_leaks_and_double_frees() -> None:
    kv = KVCacheManager(num_pages=4, page_size=4)
    t = PageTable()
    assert kv.allocate(t, 8)
    kv.check_integrity([t])
    with pytest.raises(AssertionError):
        kv.check_integrity([])  # a leaked page: owned by no live table
    leaked = t.pages.pop()
    with pytest.raises(AssertionError):
        kv.check_integrity([t])
    t.pages.append(leaked)
    with pytest.raises(AssertionError):
        kv.check_integrity([t, PageTable(pages=[t.pages[0]])])  # listed twice, counted once
    kv.free(t)
    kv.check_integrity([])
    with pytest.raises(AssertionError):
        kv._release(leaked)  # double free
