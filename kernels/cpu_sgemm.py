"""fp32 projections of several rows on prepacked weights (``kernels/cpu_sgemm.c``; its header
says why and gives the packed layout).

Built on first use by ``kernels.cpu_build``. ``available()`` is False without a C compiler, on
a CPU without AVX-512F or AVX2+FMA, or with ``NLD_CPU_SGEMM=0``; callers then keep oneDNN's
packed GEMM.

``pack`` copies a ``[N, K]`` fp32 weight into 16-column panels once; ``linear`` then computes
``x @ weight.T``, each output one fused multiply-add chain over k in order, so a row's result
does not depend on the other rows of the pass (only the summation order differs from MKL's).
A weight whose every value is a bf16 number (a bf16 checkpoint served in fp32, like the
embedded model and the released ones) is packed as bf16: the same results from half the bytes.

A model served in bf16 packs its weights as pair panels (``pack_pairs``, CPUs with AVX512-BF16)
for ``linear_pairs``: bf16 rows times bf16 weights, two multiply-adds per fp32 lane and
instruction (VDPBF16PS), fp32 sums rounded to bf16 once; again each row on its own.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import cpu_build

SOURCE = Path(__file__).with_name("cpu_sgemm.c")
PANEL = 16  # output columns per panel; the kernel walks two panels at a time
# Above this many rows MKL's GEMM catches up (1.0x at 128 rows, 0.8x at 256: the embedded model's
# projections on an AVX-512 Xeon, one and two threads).
MAX_ROWS = 64
# The bf16 pair kernel keeps level with oneDNN's packed bf16 GEMM up to 128 rows (1.3-1.7x it at
# 1-8 rows, 1.0x at 64-128, 0.97x at 256: the embedded model's projections, a 2-vCPU AMD EPYC).
PAIR_MAX_ROWS = 128
# False: fp32 weights are packed for oneDNN instead (tests, benchmarks); packed ones still run here
enabled = True
# False: panels stay fp32 even where every weight is a bf16 value (benchmarks: interleaved A/B)
bf16_panels = True


@dataclass(frozen=True)
class PanelWeight:
    """A ``[n, k]`` fp32 weight as ``panels[p][k][c] = w[16 p + c][k]`` (flat, ``n * k``), in
    fp32 or, where that is exact, bf16."""

    panels: torch.Tensor
    n: int
    k: int

    @property
    def bf16(self) -> bool:
        return self.panels.dtype == torch.bfloat16


@dataclass(frozen=True)
class PairPanelWeight:
    """A ``[n, k]`` bf16 weight as ``panels[p][k // 2][c][k % 2] = w[16 p + c][k]`` (flat, ``n * k``)."""

    panels: torch.Tensor
    n: int
    k: int


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load(SOURCE, "NLD_CPU_SGEMM")
    return None if lib is None else _bind(lib)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL | None:
    """``lib`` with its functions typed; None where it was built without AVX-512F or AVX2+FMA."""
    lib.nld_sgemm_available.restype = ctypes.c_int
    lib.nld_sgemm_available.argtypes = []
    if not lib.nld_sgemm_available():
        return None
    lib.nld_gemm_bf16_available.restype = ctypes.c_int
    lib.nld_gemm_bf16_available.argtypes = []
    for fn in (lib.nld_sgemm_f32, lib.nld_sgemm_bf16w, lib.nld_gemm_bf16):
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the kernel is built with its vector code."""
    return _library() is not None


def pairs_available() -> bool:
    """Whether the bf16 pair kernel is built (a CPU with AVX512-BF16)."""
    lib = _library()
    return lib is not None and bool(lib.nld_gemm_bf16_available())


def packs(weight: torch.Tensor) -> bool:
    """Whether ``pack(weight)`` applies: a 2-D fp32 CPU weight with ``N % 32 == 0`` (whole
    panel pairs), and the kernel available (and ``enabled``)."""
    return (enabled and weight.dim() == 2 and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and weight.shape[0] % (2 * PANEL) == 0 and available())


def pack(weight: torch.Tensor) -> PanelWeight:
    """``weight`` ``[N, K]`` as panels of 16 columns, each stored k-major; in bf16 when every
    value is a bf16 number (and ``bf16_panels``)."""
    n, k = weight.shape
    assert n % (2 * PANEL) == 0, (n, k)
    panels = weight.detach().reshape(n // PANEL, PANEL, k).transpose(1, 2).contiguous().reshape(-1)
    if bf16_panels:
        narrow = panels.to(torch.bfloat16)
        if torch.equal(narrow.float(), panels):  # NaN never compares equal: such weights stay fp32
            panels = narrow
    return PanelWeight(panels, n, k)


def linear(x: torch.Tensor, weight: PanelWeight, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``x @ W.T`` for ``x`` ``[..., K]`` (fp32) and the packed ``W``; callers check
    ``available()`` (and that the weight was packed here). ``lib``: another build of the
    source (tests of its AVX2 path)."""
    lib = lib or _library()
    assert lib is not None and x.dtype == torch.float32 and x.shape[-1] == weight.k, (x.dtype, x.shape, weight.k)
    rows = x.reshape(-1, weight.k).contiguous()
    out = torch.empty(rows.shape[0], weight.n, dtype=torch.float32)
    kernel = lib.nld_sgemm_bf16w if weight.bf16 else lib.nld_sgemm_f32
    kernel(rows.data_ptr(), weight.panels.data_ptr(), out.data_ptr(), rows.shape[0], weight.n, weight.k,
           torch.get_num_threads())
    return out.view(*x.shape[:-1], weight.n)


def packs_pairs(weight: torch.Tensor) -> bool:
    """Whether ``pack_pairs(weight)`` applies: a 2-D bf16 CPU weight with ``N % 32 == 0`` and
    ``K`` even, and the pair kernel built (and ``enabled``)."""
    return (enabled and weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and weight.shape[0] % (2 * PANEL) == 0 and weight.shape[1] % 2 == 0 and pairs_available())


def pack_pairs(weight: torch.Tensor) -> PairPanelWeight:
    """``weight`` ``[N, K]`` bf16 as pair panels (see ``PairPanelWeight``)."""
    n, k = weight.shape
    assert n % (2 * PANEL) == 0 and k % 2 == 0 and weight.dtype == torch.bfloat16, (n, k, weight.dtype)
    panels = weight.detach().reshape(n // PANEL, PANEL, k // 2, 2).transpose(1, 2).contiguous().reshape(-1)
    return PairPanelWeight(panels, n, k)


def linear_pairs(x: torch.Tensor, weight: PairPanelWeight) -> torch.Tensor:
    """``x @ W.T`` in bf16 for ``x`` ``[..., K]`` (bf16) and the pair-packed ``W``; callers
    check ``pairs_available()``."""
    lib = _library()
    assert lib is not None and x.dtype == torch.bfloat16 and x.shape[-1] == weight.k, (x.dtype, x.shape, weight.k)
    rows = x.reshape(-1, weight.k).contiguous()
    out = torch.empty(rows.shape[0], weight.n, dtype=torch.bfloat16)
    lib.nld_gemm_bf16(rows.data_ptr(), weight.panels.data_ptr(), out.data_ptr(), rows.shape[0], weight.n, weight.k,
                      torch.get_num_threads())
    return out.view(*x.shape[:-1], weight.n)
