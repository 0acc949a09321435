"""The fused model path's elementwise ops on the CPU in one C call each
(``kernels/cpu_elementwise.c``; its header gives the math): residual add + RMSNorm, q/k
rotary, silu * up. Same results as ``kernels.reference`` up to the order of the RMS sum and
exp's last ulp.

Built on first use by ``kernels.cpu_build``. Without a C compiler, or with
``NLD_CPU_ELEMENTWISE=0``, ``available()`` is False and ``kernels.cpu_ops`` keeps the PyTorch
forms.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kernels import cpu_build

SOURCE = Path(__file__).with_name("cpu_elementwise.c")
MAX_DIM = 16384  # the C source's row buffers
_DTYPES = {torch.bfloat16: 1, torch.float32: 0}
# switched off by benchmarks (interleaved A/B) and tests (the PyTorch forms as the reference)
enabled = True


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load(SOURCE, "NLD_CPU_ELEMENTWISE")
    return None if lib is None else _bind(lib)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.nld_add_rms_norm.argtypes = [p] * 5 + [i64, i64, ctypes.c_float, i32, i32]
    lib.nld_rotary_qk.argtypes = [p, i64, p, i64] + [p] * 6 + [i64] * 4 + [i32, i32]
    lib.nld_silu_mul.argtypes = [p, p, i64, i64, i32, i32]
    for fn in (lib.nld_add_rms_norm, lib.nld_rotary_qk, lib.nld_silu_mul):
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the compiled kernels are loaded (building them on the first call)."""
    return _library() is not None


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the ops run here on these operands: CPU tensors of one dtype (bf16 or fp32),
    rows of at most ``MAX_DIM``, no autograd (no backward here), not while ``torch.compile``
    traces (inductor fuses the PyTorch forms itself), and the kernels built."""
    first = tensors[0]
    return (enabled and first.dtype in _DTYPES and first.shape[-1] <= MAX_DIM
            and all(t.dtype == first.dtype and t.device.type == "cpu" for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.compiler.is_compiling() and available())


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``kernels.reference.rms_norm_reference``: ``(y, x + residual)``, or ``(y, x)``.
    ``lib`` (here and below): another build of the source (tests of its other code paths)."""
    lib = lib or _library()
    assert lib is not None
    d = x.shape[-1]
    x = x.contiguous()
    res = None if residual is None else residual.contiguous()
    y = torch.empty_like(x)
    total = x if res is None else torch.empty_like(x)
    lib.nld_add_rms_norm(x.data_ptr(), None if res is None else res.data_ptr(), weight.contiguous().data_ptr(),
                         y.data_ptr(), total.data_ptr(), x.numel() // d, d, eps, _DTYPES[x.dtype],
                         torch.get_num_threads())
    return y, total


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[..., H, D]`` as ``[rows, H, D]`` with contiguous heads (a view when it can be)."""
    rows = t.reshape(-1, t.shape[-2], t.shape[-1])
    return rows if rows.stride(2) == 1 and rows.stride(1) == t.shape[-1] else rows.contiguous()


def _table(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).to(torch.float32).contiguous()


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos_q: torch.Tensor, sin_q: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``kernels.cpu_ops.rotary_qk``: neox rotary of ``q`` ``[..., Hq, D]`` with the query
    tables and ``k`` ``[..., Hkv, D]`` with the plain ones (tables ``[..., D]``); ``q``/``k``
    may be strided views; outputs are new contiguous tensors."""
    lib = lib or _library()
    assert lib is not None
    qr, kr = _token_rows(q), _token_rows(k)
    assert qr.shape[0] == kr.shape[0] and qr.shape[2] == kr.shape[2], (tuple(q.shape), tuple(k.shape))
    tables = [_table(t) for t in (cos_q, sin_q, cos, sin)]
    assert all(t.shape == (qr.shape[0], qr.shape[2]) for t in tables), (tuple(cos.shape), tuple(q.shape))
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype)
    lib.nld_rotary_qk(qr.data_ptr(), qr.stride(0), kr.data_ptr(), kr.stride(0), q_out.data_ptr(), k_out.data_ptr(),
                      *(t.data_ptr() for t in tables), qr.shape[0], qr.shape[1], kr.shape[1], qr.shape[2],
                      _DTYPES[q.dtype], torch.get_num_threads())
    return q_out, k_out


def silu_mul(gate_up: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """As ``kernels.reference.silu_mul_reference``: ``silu(g) * u`` over the halves of the
    last dimension."""
    lib = lib or _library()
    assert lib is not None
    gate_up = gate_up.contiguous()
    n = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype)
    if out.numel() == 0:
        return out
    lib.nld_silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * n), n, _DTYPES[gate_up.dtype],
                     torch.get_num_threads())
    return out
