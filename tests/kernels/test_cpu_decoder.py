"""``kernels.cpu_decoder`` and the runner's whole-pass path (``server.engine.cpu_decoder_pass``):

* a pass through it equals the eager fused path bit for bit (hidden states and the K/V it
  stores) when both attend in the C kernel, and within fp32 rounding of the eager path's SDPA
  attention, on ragged batches of every pass kind (prefill, decode, denoise, draft, verify,
  lookahead commit, quadratic self_spec cycle, mixed);
* decode passes equal the default eager path bit for bit;
* the runner sends a pass here exactly when it applies (fp32 panels or a bf16 model's pair
  panels, at most ``MAX_ROWS`` rows, no adapter rows), and the switch and a missing compiler
  fall back;
* all of this holds for a model served in bf16 on pair panels too, where a verify row equals
  the decode step bit for bit and self-speculation at temperature 0 is AR greedy.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kernels import cpu_amx, cpu_decoder, cpu_paged_attention, cpu_sgemm
from server.engine import cpu_attention, cpu_decoder_pass
from server.engine.batch import HostBatch
from server.engine.modes.diffusion import COMMIT_LOOKAHEAD, DENOISE
from server.engine.modes.self_spec import DRAFT, VERIFY
from server.engine.modes.self_spec_quadratic import SPEC_CYCLE
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from server.engine.work import DECODE, PREFILL, Work
from server.model.model import LoraDelta
from tests.engine.helpers import make_engine, model_for
from tests.fixtures.spy import count_calls

needs_kernel = pytest.mark.skipif(not cpu_decoder.available(), reason="no C compiler (or no AVX-512F/AVX2 panels)")
needs_pairs = pytest.mark.skipif(not (cpu_decoder.available() and cpu_sgemm.pairs_available()),
                                 reason="no C compiler (or no AVX512-BF16 pair panels)")
# the weights a test engine serves: fp32; fp32 holding bf16 values (bf16 panels); a bf16 model
WEIGHTS = [pytest.param("fp32", marks=needs_kernel), pytest.param("bf16_values", marks=needs_kernel),
           pytest.param("bf16", marks=needs_pairs)]


def _engine(seed: int = 3, bf16_values: bool = False, bf16: bool = False, **overrides):  # type: ignore[no-untyped-def]
    """An engine on a private copy of the tiny model; ``bf16_values``: its weights rounded to
    bf16 numbers (as a bf16 checkpoint served in fp32), so that they pack as bf16 panels;
    ``bf16``: the model served in bf16, on pair panels where the CPU has AVX512-BF16 (AMX tiles,
    where present, would take the weights first: the caller switches them off)."""
    model = model_for.__wrapped__(seed)  # unfused, unpacked: the rounding below must come before packing
    if bf16_values:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    return make_engine(model.to(torch.bfloat16) if bf16 else model, **overrides)


def _weights_engine(weights: str, monkeypatch: pytest.MonkeyPatch, seed: int = 3):  # type: ignore[no-untyped-def]
    """``_engine`` for one of ``WEIGHTS``."""
    monkeypatch.setattr(cpu_amx, "enabled", False)
    return _engine(seed, bf16_values=weights == "bf16_values", bf16=weights == "bf16")


def _requests(engine, rnd: random.Random, lengths: tuple[int, ...] = (11, 23, 5)):  # type: ignore[no-untyped-def]
    params = RequestParams(SamplingParams(max_tokens=1), DecodeParams(mode="ar"))
    vocab = engine.model_config.vocab_size
    reqs = [engine.add_request(f"r{i}", [rnd.randrange(4, vocab) for _ in range(n)], params)
            for i, n in enumerate(lengths)]
    for r in reqs:
        engine.kv.allocate(r.table, 96)
    return reqs


def _passes(engine, rnd: random.Random) -> list[list[Work]]:  # type: ignore[no-untyped-def]
    """One batch of works per pass, for three requests: prefills, decodes, then every
    multi-row kind, ragged mixes among them."""
    vocab, mask = engine.model_config.vocab_size, engine.model_config.mask_token_id

    def tok() -> int:
        return rnd.randrange(4, vocab)

    return [
        [Work(DECODE, [tok()], [0]) for _ in range(3)],
        [Work(DENOISE, [mask] * 8, list(range(8))) for _ in range(3)],
        [Work(DRAFT, [5] + [mask] * 3, [1, 2, 3], lora=True) for _ in range(3)],
        [Work(VERIFY, [tok() for _ in range(4)], [0, 1, 2, 3]) for _ in range(3)],
        [Work(DECODE, [7], [0]), Work(DENOISE, [mask] * 8, list(range(8))), Work(VERIFY, [tok(), tok()], [0, 1])],
        [Work(COMMIT_LOOKAHEAD, [9, 10, 11] + [mask] * 4, [2, 3, 4, 5, 6], kv_rows=[0, 1, 2], block_start=3),
         Work(DECODE, [8], [0]), Work(PREFILL, [tok() for _ in range(6)], [5])],
        [Work(SPEC_CYCLE, [tok(), mask, mask, tok(), mask, mask, tok(), mask, mask], [0, 1, 2, 3, 6],
              position_offsets=[0, 1, 2, 1, 2, 3, 2, 3, 4], kv_rows=[0, 3, 6], sub_block=3),
         Work(DECODE, [8], [0]), Work(VERIFY, [tok(), tok(), tok()], [0, 1, 2])],
    ]


def _run_both(engine, reqs, works: list[Work], whole: bool):  # type: ignore[no-untyped-def]
    """Hidden states of one pass and the caches it leaves, from a copy of the caches (the
    pass's writes do not carry over to the next run)."""
    runner = engine.runner
    saved = runner.kv.k_cache.clone(), runner.kv.v_cache.clone()
    keep = runner.cpu_pass
    if not whole:
        runner.cpu_pass = None
    try:
        hb = HostBatch.build(list(zip(reqs, works)), engine.runner.page_size)
        with torch.inference_mode():
            hidden = runner.forward_eager(hb)
        caches = runner.kv.k_cache.clone(), runner.kv.v_cache.clone()
    finally:
        runner.cpu_pass = keep
        runner.kv.k_cache.copy_(saved[0])
        runner.kv.v_cache.copy_(saved[1])
    return hidden, caches


def _advance(engine, reqs, works: list[Work]) -> None:  # type: ignore[no-untyped-def]
    """Run the pass for real and move each request past the rows it wrote."""
    engine.runner.run(list(zip(reqs, works)))
    for r, w in zip(reqs, works):
        r.num_computed += len(w.written_rows())


@pytest.mark.parametrize("seed,weights", [(0, "fp32"), (1, "fp32"), (0, "bf16_values"),
                                          pytest.param(0, "bf16", marks=needs_pairs),
                                          pytest.param(1, "bf16", marks=needs_pairs)])
@needs_kernel
def test_whole_pass_equals_the_eager_fused_path(seed: int, weights: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _weights_engine(weights, monkeypatch)
    assert engine.runner.cpu_pass is not None, "tiny model with panel-sized projections"
    packed = engine.model.layers[0].self_attn.packed
    assert packed is not None
    assert (isinstance(packed[0], cpu_sgemm.PairPanelWeight) if weights == "bf16"
            else packed[0].bf16 == (weights == "bf16_values"))
    # the eager path attends longer segments in SDPA: fp32 rounding apart, or bf16 rounding
    tol = 3e-2 if weights == "bf16" else 1e-5
    rnd = random.Random(seed)
    reqs = _requests(engine, rnd)
    _advance(engine, reqs, [Work(PREFILL, r.prompt_ids, [len(r.prompt_ids) - 1]) for r in reqs])
    for works in _passes(engine, rnd):
        # the eager path with every segment in the C attention kernel: the same kernels in the
        # same order, so the same bits
        monkeypatch.setattr(cpu_attention, "NATIVE_MAX_QUERY_LEN", 1 << 20)
        got, got_caches = _run_both(engine, reqs, works, whole=True)
        same, same_caches = _run_both(engine, reqs, works, whole=False)
        if not any(w.kind == SPEC_CYCLE for w in works):  # the eager path attends quadratic segments in SDPA
            assert torch.equal(got, same), [w.kind for w in works]
            assert all(torch.equal(a, b) for a, b in zip(got_caches, same_caches))
        # as served, longer segments of the eager path attend through SDPA: fp32 rounding apart
        monkeypatch.setattr(cpu_attention, "NATIVE_MAX_QUERY_LEN", 1)
        sdpa, sdpa_caches = _run_both(engine, reqs, works, whole=False)
        torch.testing.assert_close(got, sdpa, atol=tol, rtol=tol)
        for a, b in zip(got_caches, sdpa_caches):
            assert torch.equal(a[0], b[0]), "layer 0's K/V come before any attention"
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
        _advance(engine, reqs, works)


@needs_kernel
def test_decode_passes_equal_the_default_eager_path() -> None:
    engine = _engine()
    rnd = random.Random(5)
    reqs = _requests(engine, rnd, (3, 17, 40, 9))
    _advance(engine, reqs, [Work(PREFILL, r.prompt_ids, [len(r.prompt_ids) - 1]) for r in reqs])
    for _ in range(3):
        works = [Work(DECODE, [rnd.randrange(4, 300)], [0]) for _ in reqs]
        (got, got_caches), (same, same_caches) = (_run_both(engine, reqs, works, whole) for whole in (True, False))
        assert torch.equal(got, same) and all(torch.equal(a, b) for a, b in zip(got_caches, same_caches))
        _advance(engine, reqs, works)


@needs_kernel
def test_bf16_panels_serve_the_fp32_panels_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 checkpoint in fp32 packs bf16 panels: the same logits, bit for bit, as fp32 ones."""
    from kernels import cpu_sgemm

    def logits(bf16_panels: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(cpu_sgemm, "bf16_panels", bf16_panels)
        engine = _engine(bf16_values=True)
        assert engine.model.packed_head is not None and engine.model.packed_head.bf16 == bf16_panels
        rnd = random.Random(4)
        reqs = _requests(engine, rnd, (7, 12))
        out = [engine.runner.run([(r, Work(PREFILL, r.prompt_ids, [len(r.prompt_ids) - 1])) for r in reqs])]
        for r in reqs:
            r.num_computed = len(r.prompt_ids)
        for works in _passes(engine, rnd)[:2]:
            out.append(engine.runner.run(list(zip(reqs, works[:2]))))
        return [t for step in out for t in step]

    assert all(torch.equal(a, b) for a, b in zip(logits(True), logits(False), strict=True))


@needs_kernel
def test_runner_sends_a_pass_here_only_when_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine()
    calls = count_calls(monkeypatch, cpu_decoder.DecoderPass, "__call__")
    rnd = random.Random(2)
    reqs = _requests(engine, rnd, (11, 23))
    mask = engine.model_config.mask_token_id
    _advance(engine, reqs, [Work(PREFILL, r.prompt_ids, [len(r.prompt_ids) - 1]) for r in reqs])
    assert calls["n"] == 1
    _advance(engine, reqs, [Work(DECODE, [5], [0]), Work(DENOISE, [mask] * 8, list(range(8)))])
    assert calls["n"] == 2
    # a quadratic self_spec cycle (its mask is the C attention's too)
    cycle = Work(SPEC_CYCLE, [12, mask, mask, 13, mask, mask], [0, 1, 2, 3], lora=True, lora_rows=[1, 2, 4, 5],
                 position_offsets=[0, 1, 2, 1, 2, 3], kv_rows=[0, 3], sub_block=3)
    _advance(engine, reqs, [cycle, Work(DECODE, [6], [0])])
    assert calls["n"] == 3
    # a segment of more rows than MAX_ROWS (a long prefill chunk)
    long = [Work(PREFILL, [7] * (cpu_decoder_pass.MAX_ROWS + 1), [0]), Work(DECODE, [6], [0])]
    engine.kv.allocate(reqs[0].table, reqs[0].num_computed + cpu_decoder_pass.MAX_ROWS + 1)
    _advance(engine, reqs, long)
    assert calls["n"] == 3
    _advance(engine, reqs, [Work(DECODE, [5], [0]), Work(DECODE, [6], [0])])
    assert calls["n"] == 4


@needs_kernel
def test_draft_adapter_rows_run_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_for.__wrapped__(3)
    cfg = model.config
    for layer in model.layers:
        layer.self_attn.draft_lora = LoraDelta(cfg.num_heads * cfg.head_dim, cfg.hidden_size, rank=4, scale=1.0)
    engine = make_engine(model)
    calls = count_calls(monkeypatch, cpu_decoder.DecoderPass, "__call__")
    reqs = _requests(engine, random.Random(0), (9,))
    _advance(engine, reqs, [Work(PREFILL, reqs[0].prompt_ids, [8])])
    assert calls["n"] == 1
    _advance(engine, reqs, [Work(DRAFT, [5, 300, 300], [1, 2], lora=True)])
    assert calls["n"] == 1, "the adapter's rows need the eager model"


def test_models_it_does_not_take(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _engine().runner.cpu_pass is not None or not cpu_decoder.available()
    with monkeypatch.context() as switched:
        switched.setattr(cpu_decoder, "enabled", False)
        assert _engine().runner.cpu_pass is None
    bf16 = make_engine(model_for.__wrapped__(3).to(torch.bfloat16))
    if cpu_amx.available():
        assert bf16.runner.cpu_pass is None, "AMX tiles keep the eager path"
    with monkeypatch.context() as no_amx:
        no_amx.setattr(cpu_amx, "enabled", False)
        bf16 = make_engine(model_for.__wrapped__(3).to(torch.bfloat16))
        assert (bf16.runner.cpu_pass is not None) == (cpu_decoder.available() and cpu_sgemm.pairs_available())
        no_amx.setattr(cpu_sgemm, "enabled", False)
        assert make_engine(model_for.__wrapped__(3).to(torch.bfloat16)).runner.cpu_pass is None, "no pair panels"
    half = make_engine(model_for.__wrapped__(3).to(torch.float16))
    assert half.runner.cpu_pass is None, "fp16 has neither panels"
    # hidden 48: projections whose widths are not whole panel pairs keep oneDNN's layout
    from server.model.tiny import tiny_nld_config
    from tests.fixtures.tiny_models import random_model

    odd = random_model(tiny_nld_config(hidden_size=48, intermediate_size=80), seed=0)
    assert make_engine(odd).runner.cpu_pass is None


@needs_kernel
def test_switch_and_missing_compiler_fall_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NLD_KERNEL_CACHE", str(tmp_path))
    try:
        cpu_decoder._library.cache_clear()
        monkeypatch.setenv("NLD_CPU_DECODER", "0")
        assert not cpu_decoder.available()
        assert _engine().runner.cpu_pass is None
        monkeypatch.delenv("NLD_CPU_DECODER")
        cpu_decoder._library.cache_clear()
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        assert not cpu_decoder.available(), "a failed build is not an error"
    finally:
        cpu_decoder._library.cache_clear()


@needs_kernel
def test_served_text_is_the_eager_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy text in every mode through the engine, with and without the whole-pass path."""
    from tests.engine.helpers import to_params

    prompts = [[5, 9, 13, 7], [11, 4, 4, 20, 31, 8]]
    specs = [dict(mode="ar", max_tokens=12, ignore_eos=True),
             dict(mode="diffusion", block_length=4, max_tokens=12, ignore_eos=True),
             dict(mode="self_spec", block_length=4, max_tokens=12, ignore_eos=True)]
    for spec in specs:
        outs = []
        for whole in (True, False):
            engine = _engine()
            if not whole:
                engine.runner.cpu_pass = None
            calls = count_calls(monkeypatch, cpu_decoder.DecoderPass, "__call__")
            outs.append([o["token_ids"] for o in engine.generate(prompts, to_params(spec))])
            assert (calls["n"] > 0) == whole, spec
        assert outs[0] == outs[1], spec
    assert cpu_paged_attention.available()


@pytest.mark.parametrize("weights", WEIGHTS)
def test_verify_rows_equal_decode_steps_bit_for_bit(weights: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the whole pass every row is computed alone (row-independent projections and
    elementwise ops, attention whose per-row result does not depend on the segment's length),
    so a self_spec verify pass gives, row for row, the logits and K/V that AR's decode steps
    give at the same positions: self-speculation at temperature 0 is AR greedy by construction."""
    rnd = random.Random(9)
    prompt = [rnd.randrange(4, 300) for _ in range(21)]
    tokens = [rnd.randrange(4, 300) for _ in range(17)]

    def prefilled():  # type: ignore[no-untyped-def]
        engine = _weights_engine(weights, monkeypatch)
        assert engine.runner.cpu_pass is not None
        reqs = _requests(engine, random.Random(0), (len(prompt),))
        reqs[0].prompt_ids[:] = prompt
        _advance(engine, reqs, [Work(PREFILL, prompt, [len(prompt) - 1])])
        return engine, reqs

    engine, reqs = prefilled()
    steps = []
    for t in tokens:
        steps.append(engine.runner.run([(reqs[0], Work(DECODE, [t], [0]))])[0])
        reqs[0].num_computed += 1
    decoded = torch.cat(steps)
    decode_cache = engine.runner.kv.k_cache.clone()
    engine, reqs = prefilled()
    verified = engine.runner.run([(reqs[0], Work(VERIFY, tokens, list(range(len(tokens)))))])[0]
    assert torch.equal(verified, decoded)
    assert torch.equal(engine.runner.kv.k_cache, decode_cache)


@needs_kernel
def test_rotary_rows_from_the_table_are_the_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached rotary table grows by powers of two as positions appear and gives the values
    ``rope_tables`` computes; positions past ``ROPE_TABLE_POSITIONS`` are computed per pass."""
    monkeypatch.setattr(cpu_decoder_pass, "ROPE_TABLE_POSITIONS", 64)
    whole = _engine().runner.cpu_pass
    assert whole is not None
    model = whole.model
    for positions, table in (([0], 1), ([3, 1, 2], 4), ([5, 40, 7], 64), ([63, 2], 64), ([64, 9, 700], 64)):
        got = whole._rope_rows(torch.tensor(positions), max(positions))
        want = model.rope_tables(torch.tensor(positions))
        assert whole._rope.shape[1] == table
        assert len(got) == 4 and all(g.is_contiguous() and torch.equal(g, w) for g, w in zip(got, want))


@needs_pairs
def test_bf16_self_spec_is_ar_greedy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Served in bf16 through the whole pass, self-speculation at temperature 0 gives AR's
    greedy text (every pass here is at most MAX_ROWS rows): bf16 rounding no longer depends on
    the pass's shape."""
    from tests.engine.helpers import to_params

    engine = _weights_engine("bf16", monkeypatch, seed=5)
    calls = count_calls(monkeypatch, cpu_decoder.DecoderPass, "__call__")
    prompts = [[5, 9, 13, 7], [11, 4, 4, 20, 31, 8], [40, 41, 42]]
    texts = {}
    for mode, knobs in (("ar", {}), ("self_spec", {"draft_length": 3}), ("self_spec", {"draft_length": 7})):
        spec = dict(mode=mode, max_tokens=24, ignore_eos=True, **knobs)
        texts[(mode, knobs.get("draft_length"))] = [o["token_ids"] for o in engine.generate(prompts, to_params(spec))]
    assert calls["n"] > 0
    assert texts[("self_spec", 3)] == texts[("ar", None)] == texts[("self_spec", 7)]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_a_pass_over_max_rows_runs_in_groups_of_whole_segments(weights: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass of more than MAX_ROWS rows whose segments each fit runs as several calls over
    consecutive segments, with the one call's results bit for bit (a lookahead commit's block
    segment reads the slots its causal segment stored in an earlier call)."""
    engine = _weights_engine(weights, monkeypatch)
    rnd = random.Random(6)
    reqs = _requests(engine, rnd)
    _advance(engine, reqs, [Work(PREFILL, r.prompt_ids, [len(r.prompt_ids) - 1]) for r in reqs])
    monkeypatch.setattr(cpu_attention, "NATIVE_MAX_QUERY_LEN", 1 << 20)
    calls = count_calls(monkeypatch, cpu_decoder.DecoderPass, "__call__")
    for works in _passes(engine, rnd)[1:]:  # multi-row passes of 9-24 rows
        monkeypatch.setattr(cpu_decoder_pass, "MAX_ROWS", 9)
        calls["n"] = 0
        grouped = _run_both(engine, reqs, works, whole=True)
        assert calls["n"] >= 2 or sum(len(w) for w in works) <= 9, [w.kind for w in works]
        monkeypatch.setattr(cpu_decoder_pass, "MAX_ROWS", 1 << 20)
        calls["n"] = 0
        single = _run_both(engine, reqs, works, whole=True)
        assert calls["n"] == 1
        assert torch.equal(grouped[0], single[0]), [w.kind for w in works]
        assert all(torch.equal(a, b) for a, b in zip(grouped[1], single[1]))
        _advance(engine, reqs, works)
