"""Few-row projections on the CPU through ``kernels/cpu_gemv.c`` (see its header for why).

The C source is compiled on first use with the machine's C compiler (``$CC``, else ``cc``;
``-O3 -march=native -fopenmp``) into ``~/.cache/nld-server/kernels`` (``$NLD_KERNEL_CACHE``
overrides), keyed by a hash of the source, the flags and this CPU's feature flags, and loaded
with ctypes (which releases the GIL for the call). Without a compiler, or with
``NLD_CPU_GEMV=0``, ``available()`` is False and callers keep their GEMM.

``linear`` computes fp32 dot products (bf16 inputs widened exactly) and rounds the output to the
weight's dtype; only the summation order differs from oneDNN/MKL.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_gemv.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
# Above this many rows oneDNN's packed GEMM wins (all the projections of SmolLM2-135M, bf16, on
# an AVX-512/AMX Xeon: 1.5-1.7x faster here at 1-2 rows, 1.2x at 4, even at 8, 0.4x at 16).
MAX_ROWS = 4
# fp32 at one row: MKL's sgemv already streams at the memory bandwidth and calls cost less
# (0.7-0.9x here); at 2-4 rows MKL's GEMM is 1.5-2.4x slower than this kernel.
MIN_ROWS_FP32 = 2
_FUNCTIONS = {torch.bfloat16: "nld_linear_bf16", torch.float32: "nld_linear_f32"}
# switched off by benchmarks (interleaved A/B) and tests (the plain GEMM as the reference)
enabled = True


def _cache_dir() -> Path:
    return Path(os.environ.get("NLD_KERNEL_CACHE", Path.home() / ".cache" / "nld-server" / "kernels"))


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str, flags: list[str] = FLAGS) -> Path:
    """The shared library built from ``SOURCE`` with ``flags``, from the cache when present."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *flags, _cpu_flags()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_gemv-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], check=True, capture_output=True, timeout=120)
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    return target


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("NLD_CPU_GEMV", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: few-row CPU projections use the plain GEMM")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        log.warning("building kernels/cpu_gemv.c failed (%s); few-row CPU projections use the plain GEMM. %s",
                    exc, stderr.decode(errors="replace")[-500:])
        return None
    return _bind(lib)


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
