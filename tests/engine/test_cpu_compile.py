"""The compiled CPU decoder (``--cpu-compile``) equals the eager reference.

* logits of prefill, decode, denoise, draft, verify and ragged passes through the compiled
  decoder against the unfused model on the reference attention, fp32 within 1e-5, with no
  graph compiled after the warm-up's two (one token, several tokens); passes of 1-4 rows
  leave the graph for the eager few-row kernel where it is built;
* on the embedded model, every mode's greedy output through the compiled engine is the
  eager engine's, token for token (batched and alone), and self_spec still equals AR greedy.
"""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from kernels import cpu_gemv, cpu_ops, cpu_sgemm
from server.config import DEFAULT_MODEL_DIR, EngineConfig
from server.engine.cpu_compile import CompiledDecoder
from server.engine.engine import LLMEngine
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from server.engine.work import DECODE, PREFILL, Work
from server.options import GENERATE, add_arguments, resolve
from tests.engine.helpers import make_engine
from tests.fixtures.spy import count_calls
from tests.engine.test_cpu_fast_path import _drive, _fresh_model

# inductor compiles C++; without a compiler the engine falls back to eager (tested below)
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="no C++ compiler for torch.compile")


@needs_compiler
@pytest.mark.parametrize("few_row_kernel", [False, True])
def test_compiled_logits_equal_reference_and_graphs_are_reused(few_row_kernel: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if few_row_kernel and not cpu_gemv.available():
        pytest.skip("no C compiler for kernels/cpu_gemv.c")
    monkeypatch.setattr(cpu_gemv, "enabled", few_row_kernel)
    fast = make_engine(_fresh_model("tiny"), cpu_compile=True)
    compiled = fast.runner.compiled
    assert compiled is not None
    calls = []
    inner = compiled._compiled
    compiled._compiled = lambda ids, pos: calls.append(len(ids)) or inner(ids, pos)
    graphs_before = counters["stats"]["unique_graphs"]

    ref = make_engine(_fresh_model("tiny"))
    ref.model = ref.runner.model = _fresh_model("tiny")
    got, expected = _drive(fast, False, 1), _drive(ref, True, 1)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs_before, "a pass recompiled"
    # every pass (10, the lookahead commit's two segments and the quadratic cycle among them)
    # but the drafts that use the adapter went through the graph, whatever its length; with
    # the few-row kernel, the three 2-row decode passes ran eagerly through it
    assert len(calls) == 10 - int(fast.model.has_draft_lora) * 2 - 3 * few_row_kernel and len(set(calls)) >= 3
    assert not few_row_kernel or min(calls) > cpu_gemv.MAX_ROWS


@needs_compiler
def test_bf16_graph_packs_every_projection_and_stays_close_to_eager() -> None:
    model = _fresh_model("tiny").to(torch.bfloat16)
    if cpu_ops.prepack_linear_weight(model.head.weight) is None:
        pytest.skip("this CPU has no oneDNN bf16")
    before = counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"]
    fast = make_engine(model, cpu_compile=True)
    # the several-token graph: (qkv, o, gate/up, down) per layer, all through oneDNN's packed
    # GEMM (the one-token graph's projections are the few-row kernel's op)
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] - before == 4 * len(model.layers)
    assert fast.model.packed_head is not None
    eager = make_engine(_fresh_model("tiny").to(torch.bfloat16))
    for a, b in zip(_drive(fast, False, 2), _drive(eager, False, 2)):
        # other roundings of the same bf16 math: within a few bf16 steps of the logits' scale
        assert (a - b).abs().max() <= 0.02 * b.abs().max()


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_graph_runs_the_few_row_kernel(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone decode pass goes through the one-token graph, whose projections call
    ``kernels.cpu_gemv`` (bf16; fp32 keeps MKL's one-row GEMV); its logits equal the eager
    path's."""
    if not cpu_gemv.available():
        pytest.skip("no C compiler for kernels/cpu_gemv.c")
    fast = make_engine(_fresh_model("tiny").to(dtype), cpu_compile=True)
    eager = make_engine(_fresh_model("tiny").to(dtype))
    assert fast.runner.compiled is not None
    kernel_calls = count_calls(monkeypatch, cpu_gemv, "linear")
    graph_calls = []
    inner = fast.runner.compiled._one_token
    fast.runner.compiled._one_token = lambda ids, pos: graph_calls.append(len(ids)) or inner(ids, pos)
    params = RequestParams(SamplingParams(max_tokens=1), DecodeParams(mode="ar"))
    logits = []
    for engine in (fast, eager):
        req = engine.add_request("r", [5, 9, 11, 40, 7], params)
        engine.kv.allocate(req.table, 16)
        engine.runner.run([(req, Work(PREFILL, req.prompt_ids, [4]))])
        req.num_computed = 5
        kernel_calls["n"] = 0
        logits.append(engine.runner.run([(req, Work(DECODE, [13], [0]))])[0])
        if engine is fast:
            layers = len(fast.model.layers)
            assert graph_calls == [1]
            # the head is packed outside the graph: pair panels where they run take it from cpu_gemv
            head = 0 if isinstance(fast.model.packed_head, cpu_sgemm.PairPanelWeight) else 1
            assert kernel_calls["n"] == (4 * layers + head if dtype == torch.bfloat16 else 0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits[0], logits[1], atol=tol * logits[1].abs().max().item(), rtol=0)


def test_failed_compile_falls_back_to_the_eager_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(self, *args):  # type: ignore[no-untyped-def]
        raise RuntimeError("C++ compiler not found")

    monkeypatch.setattr(CompiledDecoder, "warm_up", no_compiler)
    engine = make_engine(_fresh_model("tiny").to(torch.bfloat16), cpu_compile=True)
    assert engine.runner.compiled is None
    # the eager path gets the prepacked bf16 weights it would have had without --cpu-compile
    assert (engine.model.packed_head is not None) == (cpu_ops.prepack_linear_weight(engine.model.head.weight) is not None)
    params = RequestParams(SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), DecodeParams(mode="ar"))
    assert len(engine.generate([[5, 6, 7]], params)[0]["token_ids"]) == 4


def test_cpu_compile_flag_reaches_the_engine_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, GENERATE)
    on = resolve(GENERATE, vars(parser.parse_args(["--cpu-compile"])), {})
    assert on.engine_config().cpu_compile is True
    off = resolve(GENERATE, vars(parser.parse_args([])), {"NLD_CPU_COMPILE": "false"})
    assert off.engine_config().cpu_compile is False


@pytest.fixture(scope="module")
def engines() -> tuple[LLMEngine, LLMEngine]:
    def build(compile_cpu: bool) -> LLMEngine:
        cfg = EngineConfig(model=str(DEFAULT_MODEL_DIR), max_model_len=512, kv_cache_tokens=8192, cpu_compile=compile_cpu)
        return LLMEngine.from_pretrained(cfg)

    return build(False), build(True)


@needs_compiler
@pytest.mark.parametrize("mode", ["ar", "diffusion", "self_spec"])
def test_compiled_engine_decodes_like_eager(engines: tuple[LLMEngine, LLMEngine], mode: str) -> None:
    eager, compiled = engines
    assert compiled.runner.compiled is not None and eager.runner.compiled is None
    prompts = [eager.tokenizer.encode(p) for p in ("To be, or not to be", "It is a truth", "ROMEO.\nBut soft")]
    params = RequestParams(SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), DecodeParams(mode=mode))  # type: ignore[arg-type]
    want = [o["token_ids"] for o in eager.generate(prompts, params)]
    got = [o["token_ids"] for o in compiled.generate(prompts, params)]
    assert got == want
    # alone, an AR request's decode passes are one token long: the other graph
    assert [o["token_ids"] for o in compiled.generate(prompts[:1], params)] == want[:1]
    if mode == "self_spec":
        ar = RequestParams(SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), DecodeParams(mode="ar"))
        assert got == [o["token_ids"] for o in compiled.generate(prompts, ar)]
    compiled.check_integrity()
