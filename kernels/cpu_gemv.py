"""Few-row projections on the CPU through ``kernels/cpu_gemv.c`` (see its header for why).

Built on first use by ``kernels.cpu_build``. Without a C compiler, or with ``NLD_CPU_GEMV=0``,
``available()`` is False and callers keep their GEMM.

``linear`` computes fp32 dot products (bf16 inputs widened exactly) and rounds the output to the
weight's dtype; only the summation order differs from oneDNN/MKL.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kernels import cpu_build

SOURCE = Path(__file__).with_name("cpu_gemv.c")
# Above this many rows oneDNN's packed GEMM wins (all the projections of SmolLM2-135M, bf16, on
# an AVX-512/AMX Xeon: 1.5-1.7x faster here at 1-2 rows, 1.2x at 4, even at 8, 0.4x at 16).
MAX_ROWS = 4
# fp32 at one row: MKL's sgemv already streams at the memory bandwidth and calls cost less
# (0.7-0.9x here); at 2-4 rows MKL's GEMM is 1.5-2.4x slower than this kernel.
MIN_ROWS_FP32 = 2
_FUNCTIONS = {torch.bfloat16: "nld_linear_bf16", torch.float32: "nld_linear_f32"}
# switched off by benchmarks (interleaved A/B) and tests (the plain GEMM as the reference)
enabled = True


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load(SOURCE, "NLD_CPU_GEMV")
    return None if lib is None else _bind(lib)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the compiled kernel is loaded (building it on the first call)."""
    return _library() is not None


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight)`` runs here: CPU tensors of one dtype (bf16 or fp32), 1 to
    ``MAX_ROWS`` rows (fp32: at least ``MIN_ROWS_FP32``), a contiguous weight, no autograd (the
    kernel has no backward), and the kernel built."""
    return (takes(x.numel() // max(x.shape[-1], 1), weight.dtype) and x.dtype == weight.dtype
            and weight.device.type == "cpu" and x.device.type == "cpu" and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def takes(rows: int, dtype: torch.dtype) -> bool:
    """Whether passes of ``rows`` rows with weights of ``dtype`` run their projections here."""
    return (enabled and 1 <= rows <= MAX_ROWS and dtype in _FUNCTIONS
            and (rows >= MIN_ROWS_FP32 or dtype != torch.float32) and available())


def linear(x: torch.Tensor, weight: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` ``[..., K]`` and ``weight`` ``[N, K]``; callers check
    ``applies`` first. ``lib``: another build of the source (tests of its other code paths)."""
    lib = lib or _library()
    assert lib is not None
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    n, k = weight.shape
    assert rows.shape[1] == k, (tuple(x.shape), tuple(weight.shape))
    out = torch.empty(rows.shape[0], n, dtype=weight.dtype)
    getattr(lib, _FUNCTIONS[weight.dtype])(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], n, k,
                                          torch.get_num_threads())
    return out.view(*x.shape[:-1], n)
