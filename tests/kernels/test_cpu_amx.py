"""``kernels.cpu_amx`` (bf16 projections on AMX tiles): its packed layout against the formula in
the C source's header, its products against float64, the dispatch in ``kernels.cpu_ops``, its
fallbacks, and a fused model through it."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from kernels import cpu_amx, cpu_ops
from server.model.model import DenseAttention
from server.model.tiny import tiny_nld_config
from tests.fixtures.c_kernels import assert_packing_falls_back, bf16_ulp
from tests.fixtures.spy import count_calls
from tests.fixtures.tiny_models import random_model

needs_amx = pytest.mark.skipif(not cpu_amx.available(), reason="no AMX-BF16 on this CPU (or no C compiler)")

# (N, K): one tile; a last group of 1 block (80 = 4 + 1 blocks); real projection shapes
SHAPES = [(16, 32), (80, 64), (48, 96), (960, 576), (576, 1536)]
# 1-16 rows: one chunk; 17-32: both halves of a chunk; more: several chunks, ragged last one
ROWS = [1, 5, 16, 17, 31, 32, 33, 64, 100]


def test_pack_follows_the_documented_layout() -> None:
    """packed[g][kb][j][p][c][2] = w[64 g + 16 j + c][32 kb + 2 p + {0, 1}] (kernels/cpu_amx.c);
    the last group holds the leftover blocks. Pure torch: runs on any CPU."""
    n, k = 80, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = cpu_amx.pack(w)
    assert (got.n, got.k) == (n, k) and got.tiles.numel() == n * k and got.tiles.is_contiguous()
    want = []
    for g in range(0, n // 16, 4):
        blocks = min(4, n // 16 - g)
        for kb in range(k // 32):
            for j in range(blocks):
                for p in range(16):
                    for c in range(16):
                        row = 16 * (g + j) + c
                        want += [w[row, 32 * kb + 2 * p], w[row, 32 * kb + 2 * p + 1]]
    assert torch.equal(got.tiles, torch.stack(want))


@needs_amx
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_products_are_the_fp32_sum_rounded_once(rows: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 7 + k + rows)
    x, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    got = cpu_amx.linear(x, cpu_amx.pack(w))
    exact = x.double() @ w.double().T  # bf16 products are exact in float64
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    bound = 0.5 * bf16_ulp(exact) + k * 2.0**-23 * (x.double().abs() @ w.double().abs().T) * 1.01
    assert ((got.double() - exact).abs() <= bound).all()
    assert (got == exact.float().bfloat16()).float().mean() > 0.95


@needs_amx
def test_leading_dims_strided_rows_empty_input_and_nan() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=g).bfloat16()
    packed = cpu_amx.pack(w)
    x = torch.randn(3, 6, 128, generator=g).bfloat16()[..., ::2]  # [3, 6, 64], not contiguous
    got = cpu_amx.linear(x, packed)
    assert got.shape == (3, 6, 48)
    torch.testing.assert_close(got.float(), torch.nn.functional.linear(x, w).float(), atol=2e-2, rtol=2e-2)
    assert cpu_amx.linear(torch.empty(0, 64, dtype=torch.bfloat16), packed).shape == (0, 48)
    xn = torch.randn(20, 64, generator=g).bfloat16()
    xn[17, 5] = math.nan
    out = cpu_amx.linear(xn, packed)
    assert out[17].isnan().all() and not out[[0, 16, 18]].isnan().any(), "a NaN stays in its row"


def test_what_packs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_amx, "available", lambda: True)
    assert cpu_amx.packs(torch.zeros(64, 96, dtype=torch.bfloat16))
    assert not cpu_amx.packs(torch.zeros(64, 96)), "fp32 keeps its exact GEMM"
    assert not cpu_amx.packs(torch.zeros(64, 96, dtype=torch.float16)), "no fp16 kernel"
    assert not cpu_amx.packs(torch.zeros(40, 96, dtype=torch.bfloat16)), "N not whole 16-column blocks"
    assert not cpu_amx.packs(torch.zeros(64, 40, dtype=torch.bfloat16)), "K not whole 32-k blocks"
    monkeypatch.setattr(cpu_amx, "enabled", False)
    assert not cpu_amx.packs(torch.zeros(64, 96, dtype=torch.bfloat16))


@needs_amx
def test_cpu_ops_routes_packed_passes_through_the_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 96, generator=g).bfloat16()
    packed = cpu_ops.prepack_linear_weight(w)
    assert isinstance(packed, cpu_amx.AmxWeight)
    calls = count_calls(monkeypatch, cpu_amx, "linear")
    for rows in (5, 16, cpu_ops.PACKED_MAX_ROWS):
        x = torch.randn(rows, 96, generator=g).bfloat16()
        torch.testing.assert_close(cpu_ops.linear(x, w, packed).float(), torch.nn.functional.linear(x, w).float(),
                                   atol=2e-2, rtol=2e-2)
    assert calls["n"] == 3
    cpu_ops.linear(torch.randn(cpu_ops.PACKED_MAX_ROWS + 1, 96, generator=g).bfloat16(), w, packed)
    assert calls["n"] == 3, "larger passes take the plain GEMM"
    monkeypatch.setattr(cpu_amx, "enabled", False)
    assert not isinstance(cpu_ops.prepack_linear_weight(w), cpu_amx.AmxWeight), "oneDNN's layout instead"


def test_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_packing_falls_back(cpu_amx, "NLD_CPU_AMX", torch.randn(64, 96).bfloat16(), cpu_amx.AmxWeight, tmp_path, monkeypatch)


@needs_amx
def test_fused_bf16_model_through_the_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every projection and the head of a packed bf16 model run on the tiles at 5+ rows, and the
    logits stay those of the dense GEMMs (bf16 rounding of different fp32 sums aside)."""
    model = random_model(tiny_nld_config(), seed=8).to(torch.bfloat16)
    packed = copy.deepcopy(model)
    model.fuse_projections()
    packed.fuse_projections()
    packed.prepack_cpu_weights()
    assert isinstance(packed.packed_head, cpu_amx.AmxWeight)
    calls = count_calls(monkeypatch, cpu_amx, "linear")
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(24, 24, dtype=torch.bool).tril()
    with torch.no_grad():
        a = model.compute_logits(model(ids, torch.arange(24), DenseAttention(mask)))
        b = packed.compute_logits(packed(ids, torch.arange(24), DenseAttention(mask)))
    assert calls["n"] == 4 * len(packed.layers) + 1
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
