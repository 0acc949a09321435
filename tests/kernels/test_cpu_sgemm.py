"""``kernels.cpu_sgemm`` (fp32 projections on 16-column panels): its packed layout against the
formula in the C source's header, its sums against float64, each row's independence of the
others, its AVX2 build, the dispatch in ``kernels.cpu_ops``, its fallbacks, and a fused model
through it."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from kernels import cpu_amx, cpu_ops, cpu_sgemm
from server.model.model import DenseAttention
from server.model.tiny import tiny_nld_config
from tests.fixtures.c_kernels import assert_packing_falls_back, build_for_isa
from tests.fixtures.spy import count_calls
from tests.fixtures.tiny_models import random_model

needs_kernel = pytest.mark.skipif(not cpu_sgemm.available(), reason="no AVX-512F/AVX2 build (or no C compiler)")
needs_pairs = pytest.mark.skipif(not cpu_sgemm.pairs_available(), reason="no AVX512-BF16 build (or no C compiler)")

# (N, K): one panel pair; K of one; odd K; real projection shapes of the embedded model
SHAPES = [(32, 16), (64, 1), (96, 37), (640, 384), (384, 1152)]
# one register tile (up to 12 rows on AVX-512), several tiles cut evenly, MAX_ROWS
ROWS = [1, 2, 5, 8, 12, 13, 16, 25, 64]


def fp32_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """How far K fused multiply-adds in fp32 may drift from the exact dot products."""
    return x.shape[-1] * 2.0**-24 * (x.double().abs() @ w.double().abs().T) * 1.01


def test_pack_follows_the_documented_layout() -> None:
    """packed[p][k][c] = w[16 p + c][k] (kernels/cpu_sgemm.c). Pure torch: runs on any CPU."""
    n, k = 64, 5
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    got = cpu_sgemm.pack(w)
    assert (got.n, got.k) == (n, k) and got.panels.numel() == n * k and got.panels.is_contiguous()
    want = [w[16 * p + c, kk] for p in range(n // 16) for kk in range(k) for c in range(16)]
    assert torch.equal(got.panels, torch.stack(want))


@needs_kernel
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_sums_are_within_fp32_rounding_of_float64(rows: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 7 + k + rows)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    got = cpu_sgemm.linear(x, cpu_sgemm.pack(w))
    exact = x.double() @ w.double().T
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert ((got.double() - exact).abs() <= fp32_bound(x, w)).all()


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_other_rows() -> None:
    """The header's promise: one FMA chain per output, so a row computed alone, in any batch,
    at any place in it, is bit-identical (what makes a verify row equal a decode step)."""
    g = torch.Generator().manual_seed(2)
    w = cpu_sgemm.pack(torch.randn(640, 384, generator=g))
    x = torch.randn(64, 384, generator=g)
    alone = torch.cat([cpu_sgemm.linear(x[i:i + 1], w) for i in range(64)])
    for rows in (2, 5, 8, 13, 16, 31, 64):
        start = 64 - rows
        assert torch.equal(cpu_sgemm.linear(x[start:], w), alone[start:]), rows


@needs_kernel
def test_leading_dims_strided_rows_empty_input_and_nan() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 24, generator=g)
    packed = cpu_sgemm.pack(w)
    x = torch.randn(3, 5, 48, generator=g)[..., ::2]  # [3, 5, 24], not contiguous
    got = cpu_sgemm.linear(x, packed)
    assert got.shape == (3, 5, 64)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w), atol=1e-5, rtol=1e-5)
    assert cpu_sgemm.linear(torch.empty(0, 24), packed).shape == (0, 64)
    xn = torch.randn(20, 24, generator=g)
    xn[17, 5] = math.nan
    out = cpu_sgemm.linear(xn, packed)
    assert out[17].isnan().all() and not out[[0, 16, 18]].isnan().any(), "a NaN stays in its row"


def _bf16_exact(n: int, k: int, seed: int) -> torch.Tensor:
    """An fp32 ``[n, k]`` weight whose values are bf16 numbers (a bf16 checkpoint in fp32)."""
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).bfloat16().float()


def test_bf16_values_pack_as_bf16_and_nothing_else_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pure torch: the packed values are the weight's, in bf16 only where that is exact."""
    w = _bf16_exact(64, 40, 1)
    packed = cpu_sgemm.pack(w)
    assert packed.bf16 and packed.panels.dtype == torch.bfloat16
    assert torch.equal(packed.panels.float().view(4, 40, 16).transpose(1, 2).reshape(64, 40), w)
    near = w.clone()
    near[3, 7] += 2.0**-12  # one value between two bf16 numbers
    assert not cpu_sgemm.pack(near).bf16
    nan = w.clone()
    nan[0, 0] = math.nan
    assert not cpu_sgemm.pack(nan).bf16
    monkeypatch.setattr(cpu_sgemm, "bf16_panels", False)
    assert not cpu_sgemm.pack(w).bf16


def _fp32_panels(w: torch.Tensor) -> cpu_sgemm.PanelWeight:
    n, k = w.shape
    return cpu_sgemm.PanelWeight(w.reshape(n // 16, 16, k).transpose(1, 2).contiguous().reshape(-1), n, k)


@needs_kernel
@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_panels_give_the_fp32_panels_bits(n: int, k: int) -> None:
    """Each weight widens exactly before its FMA: the same chains, so the same results."""
    w = _bf16_exact(n, k, n + k)
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(k))
    packed, wide = cpu_sgemm.pack(w), _fp32_panels(w)
    assert packed.bf16 and not wide.bf16
    for rows in ROWS:
        assert torch.equal(cpu_sgemm.linear(x[:rows], packed), cpu_sgemm.linear(x[:rows], wide)), rows


@needs_kernel
def test_avx2_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AVX2 code path (2-row tiles, two ymm per panel) keeps the bound and the row
    independence; a plain-C build says it is not available."""
    monkeypatch.setenv("NLD_KERNEL_CACHE", str(tmp_path))
    lib = cpu_sgemm._bind(build_for_isa(cpu_sgemm.SOURCE, "avx2"))
    assert lib is not None
    g = torch.Generator().manual_seed(9)
    for rows, (n, k) in ((1, (32, 37)), (3, (96, 250)), (8, (64, 16))):
        x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
        got = cpu_sgemm.linear(x, cpu_sgemm.pack(w), lib)
        assert ((got.double() - x.double() @ w.double().T).abs() <= fp32_bound(x, w)).all(), (rows, n, k)
        assert torch.equal(got[-1:], cpu_sgemm.linear(x[-1:], cpu_sgemm.pack(w), lib))
        narrow = _bf16_exact(n, k, rows)
        assert torch.equal(cpu_sgemm.linear(x, cpu_sgemm.pack(narrow), lib), cpu_sgemm.linear(x, _fp32_panels(narrow), lib))
    assert cpu_sgemm._bind(build_for_isa(cpu_sgemm.SOURCE, "plain")) is None


def test_what_packs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_sgemm, "available", lambda: True)
    assert cpu_sgemm.packs(torch.zeros(64, 96))
    assert not cpu_sgemm.packs(torch.zeros(64, 96, dtype=torch.bfloat16)), "bf16 has its own kernels"
    assert not cpu_sgemm.packs(torch.zeros(48, 96)), "N not whole pairs of 16-column panels"
    assert not cpu_sgemm.packs(torch.zeros(64)), "not a matrix"
    monkeypatch.setattr(cpu_sgemm, "enabled", False)
    assert not cpu_sgemm.packs(torch.zeros(64, 96))


@needs_kernel
def test_cpu_ops_routes_fp32_passes_through_the_panels(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 96, generator=g)
    packed = cpu_ops.prepack_linear_weight(w)
    assert isinstance(packed, cpu_sgemm.PanelWeight)
    calls = count_calls(monkeypatch, cpu_sgemm, "linear")
    for rows in (1, 3, 16, cpu_sgemm.MAX_ROWS):
        x = torch.randn(rows, 96, generator=g)
        torch.testing.assert_close(cpu_ops.linear(x, w, packed), torch.nn.functional.linear(x, w),
                                   atol=1e-5, rtol=1e-5)
    assert calls["n"] == 4, "one row and 2-4 rows too: the panels stream as fast as sgemv and cpu_gemv"
    x = torch.randn(cpu_sgemm.MAX_ROWS + 1, 96, generator=g)
    torch.testing.assert_close(cpu_ops.linear(x, w, packed), torch.nn.functional.linear(x, w))
    assert calls["n"] == 4, "larger passes take MKL's GEMM"
    xg = torch.randn(3, 96, generator=g, requires_grad=True)
    cpu_ops.linear(xg, w, packed).sum().backward()
    assert calls["n"] == 4 and xg.grad is not None, "autograd takes the GEMM (the kernel has no backward)"
    monkeypatch.setattr(cpu_sgemm, "enabled", False)
    assert not isinstance(cpu_ops.prepack_linear_weight(w), cpu_sgemm.PanelWeight), "oneDNN's layout instead"


def test_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_packing_falls_back(cpu_sgemm, "NLD_CPU_SGEMM", torch.randn(64, 96), cpu_sgemm.PanelWeight, tmp_path, monkeypatch)


@needs_kernel
def test_fused_fp32_model_through_the_panels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every projection and the head of a packed fp32 model run on the panels, and the logits
    stay the unfused model's within fp32 rounding."""
    model = random_model(tiny_nld_config(), seed=8)
    packed = copy.deepcopy(model)
    packed.fuse_projections()
    packed.prepack_cpu_weights()
    assert isinstance(packed.packed_head, cpu_sgemm.PanelWeight)
    calls = count_calls(monkeypatch, cpu_sgemm, "linear")
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(24, 24, dtype=torch.bool).tril()
    with torch.no_grad():
        a = model.compute_logits(model(ids, torch.arange(24), DenseAttention(mask)))
        b = packed.compute_logits(packed(ids, torch.arange(24), DenseAttention(mask)))
    assert calls["n"] == 4 * len(packed.layers) + 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# bf16 pair panels (a model served in bf16): K must be even
PAIR_SHAPES = [(32, 16), (64, 2), (96, 38), (640, 384), (384, 1152)]
PAIR_ROWS = ROWS + [100, cpu_sgemm.PAIR_MAX_ROWS]


def test_pack_pairs_follows_the_documented_layout() -> None:
    """pairs[p][k // 2][c][k % 2] = w[16 p + c][k]. Pure torch: runs on any CPU."""
    n, k = 64, 6
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = cpu_sgemm.pack_pairs(w)
    assert (got.n, got.k) == (n, k) and got.panels.dtype == torch.bfloat16 and got.panels.is_contiguous()
    want = [w[16 * p + c, 2 * kp + e] for p in range(n // 16) for kp in range(k // 2) for c in range(16) for e in (0, 1)]
    assert torch.equal(got.panels, torch.stack(want))


@needs_pairs
@pytest.mark.parametrize("n,k", PAIR_SHAPES)
def test_pair_sums_round_once_to_bf16(n: int, k: int) -> None:
    """fp32 sums of exact bf16 products, rounded once: at most one bf16 step (2^-8 relative)
    from the exact dot product, plus the fp32 sums' own drift."""
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    packed = cpu_sgemm.pack_pairs(w)
    for rows in PAIR_ROWS:
        x = torch.randn(rows, k, generator=g).bfloat16()
        got = cpu_sgemm.linear_pairs(x, packed)
        exact = x.double() @ w.double().T
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        bound = exact.abs() * 2.0**-8 + fp32_bound(x.float(), w.float())
        assert ((got.double() - exact).abs() <= bound).all(), rows


@needs_pairs
def test_a_pair_rows_result_does_not_depend_on_the_other_rows() -> None:
    g = torch.Generator().manual_seed(2)
    w = cpu_sgemm.pack_pairs(torch.randn(640, 384, generator=g).bfloat16())
    x = torch.randn(cpu_sgemm.PAIR_MAX_ROWS, 384, generator=g).bfloat16()
    alone = torch.cat([cpu_sgemm.linear_pairs(x[i:i + 1], w) for i in range(x.shape[0])])
    for rows in (2, 5, 8, 13, 16, 31, 64, cpu_sgemm.PAIR_MAX_ROWS):
        start = x.shape[0] - rows
        assert torch.equal(cpu_sgemm.linear_pairs(x[start:], w), alone[start:]), rows
    xn = x[:20].clone()
    xn[17, 5] = math.nan
    out = cpu_sgemm.linear_pairs(xn, w)
    assert out[17].isnan().all() and not out[[0, 16, 18]].isnan().any(), "a NaN stays in its row"


def test_what_packs_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_sgemm, "pairs_available", lambda: True)
    assert cpu_sgemm.packs_pairs(torch.zeros(64, 96, dtype=torch.bfloat16))
    assert not cpu_sgemm.packs_pairs(torch.zeros(64, 96)), "fp32 has its own panels"
    assert not cpu_sgemm.packs_pairs(torch.zeros(64, 95, dtype=torch.bfloat16)), "K odd"
    assert not cpu_sgemm.packs_pairs(torch.zeros(48, 96, dtype=torch.bfloat16)), "N not whole panel pairs"
    monkeypatch.setattr(cpu_sgemm, "enabled", False)
    assert not cpu_sgemm.packs_pairs(torch.zeros(64, 96, dtype=torch.bfloat16))


@needs_pairs
def test_cpu_ops_routes_bf16_passes_through_the_pair_panels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without AMX (whose tiles take bf16 weights first) a bf16 weight packs as pair panels,
    which run every pass of at most PAIR_MAX_ROWS rows; larger ones and autograd take the GEMM."""
    monkeypatch.setattr(cpu_amx, "enabled", False)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 96, generator=g).bfloat16()
    packed = cpu_ops.prepack_linear_weight(w)
    assert isinstance(packed, cpu_sgemm.PairPanelWeight)
    calls = count_calls(monkeypatch, cpu_sgemm, "linear_pairs")
    for rows in (1, 3, 16, cpu_sgemm.PAIR_MAX_ROWS, cpu_sgemm.PAIR_MAX_ROWS + 1):
        x = torch.randn(rows, 96, generator=g).bfloat16()
        torch.testing.assert_close(cpu_ops.linear(x, w, packed), torch.nn.functional.linear(x, w))
    assert calls["n"] == 4
    xg = torch.randn(3, 96, generator=g).bfloat16().requires_grad_()
    cpu_ops.linear(xg, w, packed).float().sum().backward()
    assert calls["n"] == 4 and xg.grad is not None, "autograd takes the GEMM (the kernel has no backward)"


def test_pair_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Switched off or unbuilt, bf16 weights keep the previous packings (AMX tiles or oneDNN's)."""
    w = torch.randn(64, 96).bfloat16()
    monkeypatch.setattr(cpu_amx, "enabled", False)
    assert_packing_falls_back(cpu_sgemm, "NLD_CPU_SGEMM", w, cpu_sgemm.PairPanelWeight, tmp_path, monkeypatch)
