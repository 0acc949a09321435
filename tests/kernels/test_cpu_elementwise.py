"""``kernels.cpu_elementwise`` (RMSNorm, rotary, silu * up in one C call each) against the
PyTorch forms in ``kernels.reference`` / ``kernels.cpu_ops`` and against float64, on every code
path the compiler can build here, and its dispatch and fallbacks."""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import pytest
import torch

from kernels import cpu_elementwise, cpu_ops
from kernels.reference import rms_norm_reference, silu_mul_reference
from tests.fixtures.c_kernels import build_for_isa
from tests.fixtures.spy import count_calls

needs_kernel = pytest.mark.skipif(not cpu_elementwise.available(), reason="no C compiler")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=["native", "avx2", "plain"])
def lib(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ctypes.CDLL | None:
    """The native build, then the AVX2 and plain-C builds (what a CPU without AVX-512 gets)."""
    if not cpu_elementwise.available():
        pytest.skip("no C compiler")
    if request.param == "native":
        return None
    monkeypatch.setenv("NLD_KERNEL_CACHE", str(tmp_path))
    return cpu_elementwise._bind(build_for_isa(cpu_elementwise.SOURCE, request.param))


def _torch_rotary(q, k, cos_q, sin_q, cos, sin):  # type: ignore[no-untyped-def]
    cpu_elementwise.enabled = False
    try:
        return cpu_ops.rotary_qk(q, k, cos_q, sin_q, cos, sin)
    finally:
        cpu_elementwise.enabled = True


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 64), (5, 576), (3, 100)])
def test_rms_norm_matches_the_reference(lib: ctypes.CDLL | None, dtype: torch.dtype, rows: int, d: int) -> None:
    g = torch.Generator().manual_seed(rows * d)
    x, res = (torch.randn(rows, d, generator=g) * 3).to(dtype), torch.randn(rows, d, generator=g).to(dtype)
    w = (torch.rand(d, generator=g) + 0.5).to(dtype)
    y, same = cpu_elementwise.add_rms_norm(x, w, 1e-5, None, lib)
    assert same is x, "without a residual the new residual is x itself"
    want, _ = rms_norm_reference(x, w, 1e-5)
    y_sum, total = cpu_elementwise.add_rms_norm(x, w, 1e-5, res, lib)
    want_sum, want_total = rms_norm_reference(x, w, 1e-5, res)
    assert torch.equal(total, want_total), "the residual add is the same rounding"
    for got, ref in ((y, want), (y_sum, want_sum)):
        assert got.dtype == dtype and got.shape == ref.shape
        if dtype == torch.float32:  # only the order of the mean's sum differs
            torch.testing.assert_close(got, ref, rtol=4e-6, atol=1e-6)
        else:  # at most one bf16 step apart, where the fp32 value sat on a rounding boundary
            assert (got.float() - ref.float()).abs().le(ref.float().abs() * 2.0**-7 + 1e-30).all()
            assert (got == ref).float().mean() > 0.97


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_is_bit_identical_to_the_torch_form(lib: ctypes.CDLL | None, dtype: torch.dtype) -> None:
    """q and k as strided views of a fused QKV output with two leading dims, query tables that
    differ from the key tables (the Llama-4 scale folded in)."""
    g = torch.Generator().manual_seed(3)
    hq, hkv, d = 4, 2, 16
    qkv = torch.randn(2, 5, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q = qkv[..., : hq * d].view(2, 5, hq, d)
    k = qkv[..., hq * d : (hq + hkv) * d].view(2, 5, hkv, d)
    cos, sin = torch.randn(2, 5, d, generator=g), torch.randn(2, 5, d, generator=g)
    cos_q, sin_q = cos * 1.3, sin * 1.3
    got = cpu_elementwise.rotary_qk(q, k, cos_q, sin_q, cos, sin, lib)
    want = _torch_rotary(q, k, cos_q, sin_q, cos, sin)
    for a, b in zip(got, want):
        assert a.is_contiguous() and a.shape == b.shape and a.dtype == dtype
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_float64_and_the_reference(lib: ctypes.CDLL | None, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(6, 2 * 200, generator=g) * 6).to(dtype)
    gate_up[0, :6] = torch.tensor([100.0, -100.0, 89.0, -89.0, math.inf, -math.inf])
    gate_up[1, 0] = math.nan
    got = cpu_elementwise.silu_mul(gate_up, lib)
    g64, u64 = gate_up[:, :200].double(), gate_up[:, 200:].double()
    exact = g64 * torch.sigmoid(g64) * u64
    assert got.shape == (6, 200) and got.dtype == dtype
    assert got[1, 0].isnan()
    finite = exact.isfinite()
    finite[1, 0] = False
    ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-8
    assert ((got.double() - exact).abs() <= 4 * ulp * exact.abs() + 1e-30)[finite].all(), "exp underflows below 1e-37, as in torch"
    ref = silu_mul_reference(gate_up)
    assert (got == ref)[finite].float().mean() > (0.85 if dtype == torch.float32 else 0.99)


@needs_kernel
def test_cpu_ops_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_calls(monkeypatch, cpu_elementwise, "silu_mul")
    x = torch.randn(3, 8)
    cpu_ops.silu_mul(x)
    assert calls["n"] == 1
    cpu_ops.silu_mul(x.half())
    cpu_ops.silu_mul(x.clone().requires_grad_())
    assert calls["n"] == 1, "fp16 and autograd keep the PyTorch form"
    with torch.no_grad():
        cpu_ops.silu_mul(x.clone().requires_grad_())
    assert calls["n"] == 2
    assert not cpu_elementwise.applies(torch.zeros(1, cpu_elementwise.MAX_DIM + 1))
    assert not cpu_elementwise.applies(x, x.bfloat16()), "mixed dtypes"
    norms = count_calls(monkeypatch, cpu_elementwise, "add_rms_norm")
    cpu_ops.rms_norm(x, torch.ones(8), 1e-5, x)
    assert norms["n"] == 1
    monkeypatch.setattr(cpu_elementwise, "enabled", False)
    torch.testing.assert_close(cpu_ops.silu_mul(x), silu_mul_reference(x))
    assert calls["n"] == 2


def test_switched_off_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NLD_KERNEL_CACHE", str(tmp_path))
    try:
        cpu_elementwise._library.cache_clear()
        monkeypatch.setenv("NLD_CPU_ELEMENTWISE", "0")
        assert not cpu_elementwise.available()
        x = torch.randn(2, 8)
        assert not cpu_elementwise.applies(x)
        torch.testing.assert_close(cpu_ops.silu_mul(x), silu_mul_reference(x))
    finally:
        cpu_elementwise._library.cache_clear()
