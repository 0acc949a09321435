"""``kernels.cpu_ops`` (the fused model path's unchecked CPU ops) against ``kernels.reference``,
and the model's fused path on the CPU against its unfused form."""

from __future__ import annotations

import copy

import pytest
import torch

from kernels import cpu_ops, reference
from kernels import ops as kernel_ops
from server.model.model import DenseAttention
from server.model.tiny import tiny_nld_config
from tests.fixtures.spy import count_calls
from tests.fixtures.tiny_models import random_model

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_reference_on_strided_views(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, t = 6, 2, 16, 5
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    cos, sin = torch.randn(t, d, generator=g), torch.randn(t, d, generator=g)
    for cos_q, sin_q in ((cos, sin), (cos * 1.5, sin * 1.5)):  # shared and separate query tables
        got = cpu_ops.rotary_qk(q, k, cos_q, sin_q, cos, sin)
        want = reference.rotary_qk_reference(q, k, cos_q, sin_q, cos, sin)
        for a, b in zip(got, want):
            assert a.dtype == dtype and a.is_contiguous()
            torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(qkv[:, : hq * d].view(t, hq, d), q), "inputs untouched"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_and_rms_norm_match_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(3, 4, 40, generator=g).to(dtype)
    got, want = cpu_ops.silu_mul(gate_up), reference.silu_mul_reference(gate_up)
    assert got.dtype == dtype and got.shape == (3, 4, 20)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    x, res, w = (torch.randn(3, 24, generator=g).to(dtype) for _ in range(3))
    for r in (None, res):
        (y, total), (want_y, want_total) = cpu_ops.rms_norm(x, w[0], 1e-6, r), reference.rms_norm_reference(x, w[0], 1e-6, r)
        assert torch.equal(total, want_total), "the residual add rounds as the reference does"
        # the C kernel's RMS sum runs in another order: within an ulp in fp32, a bf16 step at most
        torch.testing.assert_close(y.float(), want_y.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_fused_ops_choice_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NLD_FORCE_TRITON", raising=False)
    assert kernel_ops.fused_ops(torch.device("cpu")) is cpu_ops
    monkeypatch.setenv("NLD_FORCE_TRITON", "1")
    assert kernel_ops.fused_ops(torch.device("cpu")) is kernel_ops


@pytest.mark.parametrize("packed", [False, True])  # fp32 weights in oneDNN's packed layout (18 rows)
@pytest.mark.parametrize("start", [0, 16380, 30000])  # below / across / above the YaRN + Llama-4 query scale
def test_fused_model_on_cpu_matches_unfused(start: int, packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NLD_FORCE_TRITON", raising=False)
    model = random_model(tiny_nld_config(), seed=3)
    fused = copy.deepcopy(model)
    fused.fuse_projections()
    if packed:
        fused.prepack_cpu_weights()
        if fused.packed_head is None:
            pytest.skip("this torch has no oneDNN")
    calls = count_calls(monkeypatch, cpu_ops, "rotary_qk")
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(start))
    pos = torch.arange(start, start + 9).expand(2, 9)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    with torch.no_grad():
        a = model.compute_logits(model(ids, pos, DenseAttention(mask)))
        b = fused.compute_logits(fused(ids, pos, DenseAttention(mask)))
    assert calls["n"] == model.config.num_layers, "the fused path ran through kernels.cpu_ops"
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_prepacked_fp32_linear_equals_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 weights in oneDNN's packed layout: the same products within fp32 rounding, at every
    row count (one row and passes past PACKED_MAX_ROWS take the plain GEMM)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(48, 40, generator=g)
    packed = cpu_ops.prepack_linear_weight(w)
    if packed is None:
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(cpu_ops.cpu_gemv, "enabled", False)  # 2-4 rows through the packed GEMM too
    for shape in ((1, 40), (3, 40), (7, 40), (16, 40), (2, 3, 40), (cpu_ops.PACKED_MAX_ROWS + 1, 40)):
        x = torch.randn(*shape, generator=g)
        got = cpu_ops.linear(x, w, packed)
        assert got.shape == (*shape[:-1], 48) and got.dtype == torch.float32
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w), atol=1e-5, rtol=1e-5)


def test_prepacked_linear_equals_dense() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(48, 40, generator=g).bfloat16()
    packed = cpu_ops.prepack_linear_weight(w)
    if packed is None:
        pytest.skip("this CPU/torch has no oneDNN bf16 GEMM")
    for shape in ((1, 40), (7, 40), (2, 3, 40), (cpu_ops.PACKED_MAX_ROWS + 1, 40)):
        x = torch.randn(*shape, generator=g).bfloat16()
        got = cpu_ops.linear(x, w, packed)
        assert got.shape == (*shape[:-1], 48)
        torch.testing.assert_close(got.float(), torch.nn.functional.linear(x, w).float(), atol=1e-2, rtol=1e-2)


def test_model_bf16_with_packed_weights_matches_unpacked() -> None:
    """The engine packs bf16 weights on the CPU; logits through them equal the dense GEMMs'."""
    model = random_model(tiny_nld_config(), seed=5).to(torch.bfloat16)
    packed = copy.deepcopy(model)
    model.fuse_projections()
    packed.fuse_projections()
    packed.prepack_cpu_weights()
    if packed.packed_head is None:
        pytest.skip("this CPU/torch has no oneDNN bf16 GEMM")
    assert all(layer.self_attn.packed and layer.mlp.packed for layer in packed.layers)
    ids = torch.randint(0, 300, (11,), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(11, 11, dtype=torch.bool).tril()
    with torch.no_grad():
        a = model.compute_logits(model(ids, torch.arange(11), DenseAttention(mask)))
        b = packed.compute_logits(packed(ids, torch.arange(11), DenseAttention(mask)))
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
