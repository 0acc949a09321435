"""The CUDA-graph path pads uniform batches to a bucket with dummy sequences. On the CPU the
same static-buffer path runs eagerly (capture=False): padding must change no token, and
padded rows must never write the KV cache."""

from __future__ import annotations

import copy

import pytest
import torch

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from server.model.model import DenseAttention
from server.model.tiny import tiny_nld_config
from tests.fixtures.tiny_models import random_model

PROMPTS = [[5, 6, 7, 8, 9, 10][: k + 1] for k in range(5)]


def make_engine(graphs: bool) -> LLMEngine:
    model = random_model(tiny_nld_config(block_size=8), seed=3)
    eng = LLMEngine(model, EngineConfig(model="tiny", kv_cache_tokens=4096, max_model_len=256, enable_prefix_caching=False))
    if graphs:
        eng.runner.graphs = eng.runner.graph_runner((1, 2, 4, 8), (1, 8, 20), capture=False)
    return eng


@pytest.mark.parametrize("mode", ["ar", "diffusion", "self_spec", "quadratic"])
def test_padded_replay_path_matches_eager(mode: str) -> None:
    # quadratic: block 4 -> cycles of 4 sub-blocks x 5 rows = 20 tokens (a graph length)
    decode = DecodeParams(mode="self_spec", variant="quadratic", block_length=4) if mode == "quadratic" else DecodeParams(mode=mode)
    params = RequestParams(SamplingParams(max_tokens=24, temperature=0), decode)
    eager = [o["token_ids"] for o in make_engine(False).generate(PROMPTS, params)]
    eng = make_engine(True)
    padded = [o["token_ids"] for o in eng.generate(PROMPTS, params)]
    assert padded == eager
    assert eng.runner.graphs.buffers, "no batch went through the padded path"
    if mode == "quadratic":
        assert any(quad for _, _, quad in eng.runner.graphs.buffers), "no quadratic batch was padded"
    eng.check_integrity()
    assert eng.kv.num_free_pages == eng.kv.num_pages


def test_bucket_selection() -> None:
    eng = make_engine(True)
    graphs = eng.runner.graphs
    from server.engine.batch import HostBatch

    def hb(lens: list[int]) -> HostBatch:
        h = HostBatch()
        h.query_lens = lens
        h.tables = [[0]] * len(lens)
        return h

    assert graphs.bucket(hb([1, 1, 1])) == (4, 1, False)
    assert graphs.bucket(hb([8] * 8)) == (8, 8, False)
    quad = hb([20, 20])
    quad.mask_block = [5, 0]
    assert graphs.bucket(quad) == (2, 20, True)  # its own graphs (the mask_block kernel variant)
    assert graphs.bucket(hb([1, 8])) is None  # mixed query lengths run eagerly
    assert graphs.bucket(hb([3])) is None  # a query length with no graph
    assert graphs.bucket(hb([1] * 9)) is None  # larger than the largest bucket


def test_fused_projections_keep_logits() -> None:
    model = random_model(tiny_nld_config(), seed=1)
    fused = copy.deepcopy(model)
    fused.fuse_projections()
    ids = torch.randint(0, 300, (10,))
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    for start in (0, 30000):
        pos = torch.arange(start, start + 10)
        a = model.compute_logits(model(ids, pos, DenseAttention(mask)))
        b = fused.compute_logits(fused(ids, pos, DenseAttention(mask)))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
