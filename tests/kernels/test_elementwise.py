"""Fused elementwise kernels (rms_norm, rotary_qk, silu_mul): Triton vs the references vs the
PyTorch modules of ``server.model.layers``; strided inputs, odd sizes, dispatch and checks."""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn import functional as F

from kernels import ops
from kernels.reference import rms_norm_reference, rotary_qk_reference, silu_mul_reference
from server.model.layers import RMSNorm, apply_rotary

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.float16]

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter")


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _close(actual, expected, dtype, tol=None):
    tol = tol if tol is not None else TOL[dtype]
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)


def _module_rms_norm(x, weight, eps):
    norm = RMSNorm(x.shape[-1], eps).to(x.device)
    with torch.no_grad():
        norm.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        return norm(x)


# ------------------------------------------------------------------------------ rms_norm
@pytest.mark.parametrize("hidden", [64, 96, 200])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference_and_module(hidden, dtype, with_residual, device, force_triton):
    x = _randn(7, hidden, dtype=dtype, device=device, seed=1, scale=3.0)
    residual = _randn(7, hidden, dtype=dtype, device=device, seed=2) if with_residual else None
    weight = (1 + 0.1 * _randn(hidden, seed=3)).to(device=device, dtype=dtype)
    y, new_res = ops.rms_norm(x, weight, 1e-5, residual)
    y_ref, res_ref = rms_norm_reference(x.cpu(), weight.cpu(), 1e-5,
                                        None if residual is None else residual.cpu())
    _close(y, y_ref, dtype)
    summed = x + residual if with_residual else x
    assert torch.equal(new_res.cpu(), res_ref) and torch.equal(new_res, summed)
    if not with_residual:
        assert new_res is x  # no copy when there is nothing to add
    # the module's math, on the summed input
    _close(y, _module_rms_norm(summed.cpu(), weight.cpu(), 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided_and_batched(dtype, device, force_triton):
    """x a column slice of a wider tensor (row stride != hidden), leading dims [B, T]."""
    wide = _randn(2, 5, 160, dtype=dtype, device=device, seed=4)
    x = wide[..., 32:128]  # [2, 5, 96], row stride 160
    residual = _randn(2, 5, 96, dtype=dtype, device=device, seed=5)
    weight = _randn(96, dtype=dtype, device=device, seed=6)
    assert not x.is_contiguous()
    y, new_res = ops.rms_norm(x, weight, 1e-6, residual)
    y_ref, res_ref = rms_norm_reference(x.cpu(), weight.cpu(), 1e-6, residual.cpu())
    assert y.shape == (2, 5, 96) and new_res.shape == (2, 5, 96)
    _close(y, y_ref, dtype)
    assert torch.equal(new_res.cpu(), res_ref)
    assert torch.equal(wide[..., 32:128], x)  # input untouched


def test_rms_norm_weight_dtype_promotion(device, force_triton):
    """fp32 weight on fp16 activations: the product is fp32 (torch promotion), as the module."""
    x = _randn(3, 48, dtype=torch.float16, device=device, seed=7)
    weight = _randn(48, device=device, seed=8)
    y, _ = ops.rms_norm(x, weight, 1e-5)
    assert y.dtype == torch.float32
    _close(y, rms_norm_reference(x.cpu(), weight.cpu(), 1e-5)[0], torch.float32, tol=1e-5)


def test_rms_norm_empty(device, force_triton):
    x = torch.empty(0, 32, device=device)
    y, r = ops.rms_norm(x, torch.ones(32, device=device), 1e-5, torch.empty(0, 32, device=device))
    assert y.shape == (0, 32) and r.shape == (0, 32)


# ----------------------------------------------------------------------------- rotary_qk
def _tables(tokens, head_dim, seed, scale_q=True):
    cos = _randn(tokens, head_dim, seed=seed)
    sin = _randn(tokens, head_dim, seed=seed + 1)
    if scale_q:  # like the Llama-4 query scale: per-token factor on the query tables
        s = 1 + 0.1 * _randn(tokens, 1, seed=seed + 2).abs()
        return cos * s, sin * s, cos, sin
    return cos, sin, cos, sin


@pytest.mark.parametrize("head_dim", [16, 24, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_fused_qkv_views(head_dim, dtype, device, force_triton):
    """q/k are strided views into a fused QKV output, as in Attention.forward."""
    tokens, hq, hkv = 9, 6, 2
    qkv = _randn(tokens, (hq + 2 * hkv) * head_dim, dtype=dtype, device=device, seed=10)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim: (hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    assert not q.is_contiguous() and not k.is_contiguous()
    tables = [t.to(device) for t in _tables(tokens, head_dim, seed=11)]
    before = qkv.clone()
    q_out, k_out = ops.rotary_qk(q, k, *tables)
    assert torch.equal(qkv, before)  # inputs untouched
    q_ref, k_ref = rotary_qk_reference(q.cpu(), k.cpu(), *[t.cpu() for t in tables])
    _close(q_out, q_ref, dtype)
    _close(k_out, k_ref, dtype)
    # and the model's own function
    cq, sq, c, s = [t.cpu() for t in tables]
    _close(q_out, apply_rotary(q.cpu(), cq, sq), dtype)
    _close(k_out, apply_rotary(k.cpu(), c, s), dtype)


def test_rotary_batched_and_real_tables(device, force_triton):
    """Leading dims [B, T] and the model's own rope tables (YaRN + query scale, high positions)."""
    from server.model.model import DecoderModel
    from server.model.config import ModelConfig
    from server.model.tiny import tiny_nld_config

    model = DecoderModel(ModelConfig.from_dict(tiny_nld_config()))
    positions = torch.tensor([[3, 4, 5], [20000, 40000, 70000]])
    rope = model.rope_tables(positions)
    assert not torch.equal(rope.cos_q, rope.cos)  # query scale active above 16384
    q = _randn(2, 3, 4, 16, seed=12, device=device)
    k = _randn(2, 3, 2, 16, seed=13, device=device)
    tables = [t.to(device) for t in rope]
    q_out, k_out = ops.rotary_qk(q, k, *tables)
    _close(q_out, apply_rotary(q.cpu(), rope.cos_q, rope.sin_q), torch.float32)
    _close(k_out, apply_rotary(k.cpu(), rope.cos, rope.sin), torch.float32)


# ------------------------------------------------------------------------------ silu_mul
@pytest.mark.parametrize("intermediate", [96, 50, 2500])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(intermediate, dtype, device, force_triton):
    gate_up = _randn(5, 2 * intermediate, dtype=dtype, device=device, seed=20, scale=4.0)
    out = ops.silu_mul(gate_up)
    _close(out, silu_mul_reference(gate_up.cpu()), dtype)
    g, u = gate_up[:, :intermediate].cpu().float(), gate_up[:, intermediate:].cpu().float()
    _close(out, (F.silu(g) * u).to(dtype), dtype)


def test_silu_mul_strided_batched(device, force_triton):
    wide = _randn(2, 3, 300, device=device, seed=21)
    gate_up = wide[..., 10:202]  # [2, 3, 192], row stride 300
    out = ops.silu_mul(gate_up)
    assert out.shape == (2, 3, 96)
    _close(out, silu_mul_reference(gate_up.cpu()), torch.float32)


# ------------------------------------------------------------------- dispatch and checks
def test_cpu_dispatch_is_the_reference(force_reference):
    x, r = _randn(4, 96, seed=30), _randn(4, 96, seed=31)
    w = _randn(96, seed=32)
    y, nr = ops.rms_norm(x, w, 1e-5, r)
    y_ref, nr_ref = rms_norm_reference(x, w, 1e-5, r)
    assert torch.equal(y, y_ref) and torch.equal(nr, nr_ref)
    # bit-identical to the module (the CPU path is numerically unchanged)
    assert torch.equal(y, _module_rms_norm(x + r, w, 1e-5))
    q, k = _randn(4, 2, 16, seed=33), _randn(4, 1, 16, seed=34)
    tables = _tables(4, 16, seed=35)
    q_out, k_out = ops.rotary_qk(q, k, *tables)
    assert torch.equal(q_out, apply_rotary(q, tables[0], tables[1]))
    assert torch.equal(k_out, apply_rotary(k, tables[2], tables[3]))
    gu = _randn(4, 64, seed=36)
    assert torch.equal(ops.silu_mul(gu), F.silu(gu[:, :32]) * gu[:, 32:])


@pytest.mark.parametrize("call,fragment", [
    (lambda: ops.rms_norm(torch.zeros(2, 8), torch.ones(7), 1e-5), "weight"),
    (lambda: ops.rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-5, torch.zeros(2, 7)), "residual"),
    (lambda: ops.rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-5, torch.zeros(2, 8).half()),
     "residual dtype"),
    (lambda: ops.rms_norm(torch.zeros(2, 8, dtype=torch.int32), torch.ones(8), 1e-5), "x must"),
    (lambda: ops.rotary_qk(torch.zeros(2, 2, 7), torch.zeros(2, 1, 7), *[torch.zeros(2, 7)] * 4),
     "even"),
    (lambda: ops.rotary_qk(torch.zeros(2, 2, 8), torch.zeros(3, 1, 8), *[torch.zeros(2, 8)] * 4),
     "does not match"),
    (lambda: ops.rotary_qk(torch.zeros(2, 2, 8), torch.zeros(2, 1, 8), *[torch.zeros(2, 6)] * 4),
     "cos_q"),
    (lambda: ops.silu_mul(torch.zeros(2, 7)), "even"),
])
def test_checks(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


def test_rms_norm_wide_rows_fall_back_to_reference(force_triton, monkeypatch):
    from kernels import elementwise

    assert ops._MAX_RMS_NORM_COLS == elementwise.MAX_RMS_NORM_COLS

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the Triton kernel must not be used for rows this wide")

    monkeypatch.setattr(elementwise, "rms_norm_triton", boom)
    x = _randn(2, elementwise.MAX_RMS_NORM_COLS + 2, seed=40)
    w = torch.ones(x.shape[-1])
    y, _ = ops.rms_norm(x, w, 1e-5)
    assert torch.equal(y, rms_norm_reference(x, w, 1e-5)[0])
