"""Logprobs of AR tokens: the chosen token's log-probability and the top alternatives,
under the raw (untempered) distribution, through the whole engine."""

from __future__ import annotations

import math

import torch

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from server.engine.sampler import RowSpec, select_tokens
from server.model.model import DenseAttention
from server.model.tiny import tiny_nld_config
from tests.fixtures.tiny_models import random_model


def test_select_tokens_logprobs_match_log_softmax() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    specs = [RowSpec(0.0, 0, 1.0, 1, 5, 1, logprobs=4), RowSpec(0.7, 0, 1.0, 2, 6, 1, logprobs=0), RowSpec(0.0, 0, 1.0, 3, 7, 1)]
    res = select_tokens(logits, specs, mask_token_id=None)
    ref = torch.log_softmax(logits, dim=-1)
    assert res[0].token == int(logits[0].argmax())
    assert math.isclose(res[0].logprob, float(ref[0, res[0].token]), abs_tol=1e-5)
    top = torch.topk(ref[0], 4)
    assert [t for t, _ in res[0].top_logprobs] == top.indices.tolist()
    assert all(math.isclose(v, float(w), abs_tol=1e-5) for (_, v), w in zip(res[0].top_logprobs, top.values))
    assert res[1].top_logprobs == [] and math.isclose(res[1].logprob, float(ref[1, res[1].token]), abs_tol=1e-5)
    assert res[2].logprob is None and res[2].top_logprobs is None


def test_engine_ar_logprobs_equal_dense_model() -> None:
    model = random_model(tiny_nld_config(), seed=5)
    eng = LLMEngine(model, EngineConfig(model="tiny", kv_cache_tokens=2048, max_model_len=128))
    prompt = [5, 9, 17, 33]
    eng.add_request("r", prompt, RequestParams(SamplingParams(max_tokens=5, temperature=0, logprobs=2, ignore_eos=True), DecodeParams()))
    tokens, logprobs = [], []
    while eng.has_work:
        for out in eng.step():
            tokens += out.new_token_ids
            logprobs += out.new_logprobs or []
    assert len(tokens) == len(logprobs) == 5
    seq = prompt + tokens
    with torch.no_grad():
        t = len(seq)
        hidden = model(torch.tensor(seq), torch.arange(t), DenseAttention(torch.ones(t, t, dtype=torch.bool).tril()))
        ref = torch.log_softmax(model.compute_logits(hidden), dim=-1)
    for i, lp in enumerate(logprobs):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_id == tokens[i]
        assert math.isclose(lp.logprob, float(row[tokens[i]]), abs_tol=1e-4)
        assert [tok for tok, _ in lp.top] == torch.topk(row, 2).indices.tolist()
