"""The fused model path (fused projections + Triton elementwise kernels) against the unfused one.

``DecoderModel.fuse_projections()`` (called by the engine on CUDA) switches to one QKV GEMM,
one gate/up GEMM, the residual-fused RMSNorm, the q/k rotary kernel and silu*mul. Here the
Triton kernels run under the interpreter (``NLD_FORCE_TRITON=1``) on the tiny config, at
positions below and above 16384 (where the YaRN / Llama-4 query scale kicks in).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from kernels import elementwise
from server.model.model import DenseAttention
from server.model.tiny import tiny_nld_config
from tests.fixtures.tiny_models import random_model

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter")


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the Triton launches of the elementwise kernels (proves the fused path ran)."""
    calls = {"rms_norm": 0, "rotary_qk": 0, "silu_mul": 0}
    for name in calls:
        original = getattr(elementwise, f"{name}_triton")

        def spy(*args, _name=name, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(elementwise, f"{name}_triton", spy)
    return calls


def _models(seed: int = 1):  # type: ignore[no-untyped-def]
    model = random_model(tiny_nld_config(), seed=seed)
    fused = copy.deepcopy(model)
    fused.fuse_projections()
    assert fused.fused_kernels and not model.fused_kernels
    return model, fused


@pytest.mark.parametrize("start", [0, 16380, 30000])
def test_fused_model_logits_match_unfused(start, force_triton, kernel_calls):
    model, fused = _models()
    ids = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(start))
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    pos = torch.arange(start, start + 10)
    with torch.no_grad():
        a = model.compute_logits(model(ids, pos, DenseAttention(mask)))
        b = fused.compute_logits(fused(ids, pos, DenseAttention(mask)))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    layers = model.config.num_layers
    assert kernel_calls == {"rms_norm": 2 * layers + 1, "rotary_qk": layers, "silu_mul": layers}


def test_fused_model_batched_bidirectional(force_triton, kernel_calls):
    """[B, T] inputs (leading dims flattened by the ops) and a bidirectional mask."""
    model, fused = _models(seed=2)
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    pos = torch.stack([torch.arange(0, 6), torch.arange(20000, 20006)])
    mask = torch.ones(2, 6, 6, dtype=torch.bool)
    with torch.no_grad():
        a = model.compute_logits(model(ids, pos, DenseAttention(mask)))
        b = fused.compute_logits(fused(ids, pos, DenseAttention(mask)))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert kernel_calls["rotary_qk"] == model.config.num_layers


def test_fused_model_on_cpu_reference_is_bit_identical(force_reference, kernel_calls):
    """Without NLD_FORCE_TRITON the fused path runs the PyTorch references: fp32 on the CPU,
    the same numbers as the unfused model up to the GEMM fusion."""
    model, fused = _models(seed=3)
    ids = torch.randint(0, 300, (8,), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(20000, 20008)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    with torch.no_grad():
        a = model.compute_logits(model(ids, pos, DenseAttention(mask)))
        b = fused.compute_logits(fused(ids, pos, DenseAttention(mask)))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert sum(kernel_calls.values()) == 0


def test_fused_model_through_paged_runner(force_triton):
    """The engine's runner (paged attention + store_kv, all Triton) on a fused model: prefill then
    one decode step match the unfused model's dense logits."""
    from server.engine.params import ModeParams, ResolvedParams, SamplingParams
    from server.engine.request import Request
    from server.engine.runner import ModelRunner
    from server.engine.work import DECODE, PREFILL, Work

    model, fused = _models(seed=4)
    runner = ModelRunner(fused, num_pages=8, page_size=16, device=torch.device("cpu"),
                         dtype=torch.float32, max_pages_per_seq=4)
    prompt = torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    req = Request("r", prompt, ResolvedParams(SamplingParams(), ModeParams("ar")), seed=0, stop_ids=frozenset(), max_model_len=64)
    req.table.pages = [0, 1, 2, 3]
    with torch.no_grad():
        prefill = runner.run([(req, Work(PREFILL, prompt, [11]))])[0]
        req.num_computed = 12
        decode = runner.run([(req, Work(DECODE, [7], [0]))])[0]
        ids = torch.tensor(prompt + [7])
        mask = torch.ones(13, 13, dtype=torch.bool).tril()
        dense = model.compute_logits(model(ids, torch.arange(13), DenseAttention(mask)))
    torch.testing.assert_close(prefill.reshape(-1), dense[11], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decode.reshape(-1), dense[12], atol=1e-4, rtol=1e-4)
