"""``kernels.cpu_gemv`` (the few-row CPU projection) against float64 products, its dispatch
rules, its build cache and fallbacks, and the fused model through it."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from kernels import cpu_gemv, cpu_ops
from server.model.model import DenseAttention
from server.model.tiny import tiny_nld_config
from tests.fixtures.c_kernels import bf16_ulp, build_for_isa
from tests.fixtures.spy import count_calls
from tests.fixtures.tiny_models import random_model

needs_kernel = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler to build kernels/cpu_gemv.c")

# odd sizes exercise every tail: N not a multiple of the 4-row blocks, K not a multiple of the
# 16- or 8-wide vectors; the larger ones are real projection shapes
SHAPES = [(1, 1), (7, 5), (13, 37), (130, 250), (640, 384), (1537, 1536)]


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", SHAPES)
def test_fp32_equals_float64_products(rows: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 31 + k + rows)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    got = cpu_gemv.linear(x, w)
    want = x.double() @ w.double().T
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    # fp32 summation of k products: error within k * eps * sum|x_i w_i|
    bound = k * 2.0**-23 * (x.double().abs() @ w.double().abs().T)
    assert ((got.double() - want).abs() <= bound + 1e-30).all()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_is_the_fp32_sum_rounded_once(rows: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 17 + k + rows)
    x, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    got = cpu_gemv.linear(x, w)
    exact = x.double() @ w.double().T  # bf16 products are exact in float64
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # one rounding to bf16 (half an ulp) plus the fp32 summation error
    bound = 0.5 * bf16_ulp(exact) + k * 2.0**-23 * (x.double().abs() @ w.double().abs().T) * 1.01
    assert ((got.double() - exact).abs() <= bound).all()
    # where the fp32 sum is far from a rounding boundary, the result is that sum rounded
    assert (got == exact.float().bfloat16()).float().mean() > 0.95


@needs_kernel
def test_leading_dims_strided_inputs_and_nan() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(50, 24, generator=g)
    x = torch.randn(2, 1, 48, generator=g)[..., ::2]  # [2, 1, 24], not contiguous
    got = cpu_gemv.linear(x, w)
    assert got.shape == (2, 1, 50)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w), atol=1e-5, rtol=1e-5)
    xb = torch.randn(1, 24, generator=g).bfloat16()
    xb[0, 3] = math.nan
    assert cpu_gemv.linear(xb, w.bfloat16()).isnan().all()


@needs_kernel
@pytest.mark.parametrize("isa", ["avx2", "plain"])
def test_other_instruction_sets(isa: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AVX2 and plain-C code paths (what a CPU without AVX-512 builds) give the same sums."""
    monkeypatch.setenv("NLD_KERNEL_CACHE", str(tmp_path))
    lib = cpu_gemv._bind(build_for_isa(cpu_gemv.SOURCE, isa))
    g = torch.Generator().manual_seed(9)
    for rows, (n, k) in ((1, (13, 37)), (3, (130, 250)), (4, (9, 16))):
        for dtype in (torch.float32, torch.bfloat16):
            x, w = torch.randn(rows, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
            got = cpu_gemv.linear(x, w, lib).double()
            want = x.double() @ w.double().T
            bound = k * 2.0**-23 * (x.double().abs() @ w.double().abs().T) * 1.01
            if dtype == torch.bfloat16:
                bound = bound + 0.5 * bf16_ulp(want)
            assert ((got - want).abs() <= bound).all(), (isa, rows, n, k, dtype)


def test_dispatch_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_gemv, "available", lambda: True)
    w32, wb = torch.randn(8, 16), torch.randn(8, 16).bfloat16()
    rows = lambda m, dt=torch.float32: torch.randn(m, 16).to(dt)  # noqa: E731
    assert cpu_gemv.applies(rows(1, torch.bfloat16), wb)
    assert cpu_gemv.applies(rows(cpu_gemv.MAX_ROWS, torch.bfloat16), wb)
    assert not cpu_gemv.applies(rows(cpu_gemv.MAX_ROWS + 1, torch.bfloat16), wb)
    assert not cpu_gemv.applies(rows(0, torch.bfloat16), wb)
    assert not cpu_gemv.applies(rows(1), w32), "fp32 at one row stays on MKL's sgemv"
    assert cpu_gemv.applies(rows(cpu_gemv.MIN_ROWS_FP32), w32)
    assert not cpu_gemv.applies(rows(2), wb), "mixed dtypes"
    assert not cpu_gemv.applies(rows(2, torch.float16), wb.half()), "no fp16 kernel"
    assert not cpu_gemv.applies(rows(2), torch.randn(16, 8).T), "weight not contiguous"
    assert not cpu_gemv.applies(rows(2), w32.clone().requires_grad_()), "autograd needs the GEMM"
    with torch.no_grad():
        assert cpu_gemv.applies(rows(2), w32.clone().requires_grad_())
    monkeypatch.setattr(cpu_gemv, "enabled", False)
    assert not cpu_gemv.applies(rows(2), w32)


def test_build_cache_and_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NLD_KERNEL_CACHE", str(tmp_path))
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    try:
        cpu_gemv._library.cache_clear()
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        assert not cpu_gemv.available(), "a failed build is not an error"
        torch.testing.assert_close(cpu_ops.linear(x, w), torch.nn.functional.linear(x, w))
        cpu_gemv._library.cache_clear()
        monkeypatch.delenv("CC")
        monkeypatch.setenv("NLD_CPU_GEMV", "0")
        assert not cpu_gemv.available(), "switched off by the environment"
        monkeypatch.delenv("NLD_CPU_GEMV")
        cpu_gemv._library.cache_clear()
        if not cpu_gemv.available():
            pytest.skip("no C compiler")
        built = list(tmp_path.glob("cpu_gemv-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu_gemv._library.cache_clear()
        assert cpu_gemv.available() and built[0].stat().st_mtime_ns == stamp, "the second load reuses the build"
    finally:
        cpu_gemv._library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_model_few_rows_through_the_kernel(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode-like passes (1-4 rows) of the fused CPU model run their projections and the head
    through the kernel; fp32 logits equal the unfused model's, bf16 the plain GEMM's."""
    monkeypatch.delenv("NLD_FORCE_TRITON", raising=False)
    model = random_model(tiny_nld_config(), seed=7)
    fused = copy.deepcopy(model)
    fused.fuse_projections()
    model, fused = model.to(dtype), fused.to(dtype)
    calls = count_calls(monkeypatch, cpu_gemv, "linear")
    g = torch.Generator().manual_seed(8)
    for batch, t in ((1, 1), (2, 1), (1, 4), (4, 1)):
        if dtype == torch.float32 and batch * t < cpu_gemv.MIN_ROWS_FP32:
            continue
        ids = torch.randint(0, 300, (batch, t), generator=g)
        pos = torch.arange(t).expand(batch, t)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        calls["n"] = 0
        with torch.inference_mode():
            got = fused.compute_logits(fused(ids, pos, DenseAttention(mask)))
            monkeypatch.setattr(cpu_gemv, "enabled", False)
            plain = fused.compute_logits(fused(ids, pos, DenseAttention(mask)))
            monkeypatch.setattr(cpu_gemv, "enabled", True)
            unfused = model.compute_logits(model(ids, pos, DenseAttention(mask)))
        assert calls["n"] == 4 * model.config.num_layers + 1, (batch, t)
        if dtype == torch.float32:
            torch.testing.assert_close(got, unfused, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(got, plain, atol=3e-2, rtol=3e-2)
            assert (got.argmax(-1) == plain.argmax(-1)).float().mean() >= 0.75
