"""bf16 projections of several rows on the CPU's AMX tiles (``kernels/cpu_amx.c``; its header
says why and gives the packed layout).

Built on first use by ``kernels.cpu_build``. ``available()`` is False without a C compiler, on
a CPU without AMX-BF16, where the OS refuses the tile registers, or with ``NLD_CPU_AMX=0``;
callers then keep oneDNN's packed GEMM.

``pack`` copies a ``[N, K]`` bf16 weight into the kernel's tiles once (same bytes, reordered);
``linear`` then computes ``x @ weight.T`` with fp32 sums of exact products, rounded once to
bf16. Only the summation order differs from oneDNN (and denormals are flushed to zero).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import cpu_build

SOURCE = Path(__file__).with_name("cpu_amx.c")
# False: weights are packed for oneDNN instead (tests, benchmarks); packed ones still run here
enabled = True


@dataclass(frozen=True)
class AmxWeight:
    """A ``[n, k]`` bf16 weight in the kernel's tile order (``tiles``: flat, ``n * k``)."""

    tiles: torch.Tensor
    n: int
    k: int


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load(SOURCE, "NLD_CPU_AMX")
    if lib is None:
        return None
    lib.nld_amx_init.restype = ctypes.c_int
    lib.nld_amx_init.argtypes = []
    if not lib.nld_amx_init():  # no AMX in this build or CPU, or the OS said no
        return None
    lib.nld_amx_linear_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.nld_amx_linear_bf16.restype = None
    return lib


def available() -> bool:
    """Whether the kernel is built and this process may use the AMX tiles."""
    return _library() is not None


def packs(weight: torch.Tensor) -> bool:
    """Whether ``pack(weight)`` applies: a 2-D bf16 CPU weight with ``N % 16 == 0`` and
    ``K % 32 == 0`` (whole tiles), and the kernel available (and ``enabled``)."""
    return (enabled and weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and weight.shape[0] % 16 == 0 and weight.shape[1] % 32 == 0 and available())


def pack(weight: torch.Tensor) -> AmxWeight:
    """``weight`` ``[N, K]`` in tile order: column groups of up to 64, then blocks of 32 k,
    then the group's 16-column blocks, then 16 pairs of k by 16 columns by 2."""
    n, k = weight.shape
    assert n % 16 == 0 and k % 32 == 0, (n, k)
    blocks = weight.detach().reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4)  # [nb, kb, pair, col, 2]
    groups = [blocks[g:g + 4].transpose(0, 1).reshape(-1) for g in range(0, n // 16, 4)]
    return AmxWeight(torch.cat(groups).contiguous(), n, k)


def linear(x: torch.Tensor, weight: AmxWeight) -> torch.Tensor:
    """``x @ W.T`` for ``x`` ``[..., K]`` (bf16) and the packed ``W``; callers check
    ``available()`` (and that the weight was packed here)."""
    lib = _library()
    assert lib is not None and x.dtype == torch.bfloat16 and x.shape[-1] == weight.k, (x.dtype, x.shape, weight.k)
    rows = x.reshape(-1, weight.k).contiguous()
    out = torch.empty(rows.shape[0], weight.n, dtype=torch.bfloat16)
    if rows.shape[0]:
        lib.nld_amx_linear_bf16(rows.data_ptr(), weight.tiles.data_ptr(), out.data_ptr(), rows.shape[0], weight.n,
                                weight.k, torch.get_num_threads())
    return out.view(*x.shape[:-1], weight.n)
