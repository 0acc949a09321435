"""The fused model path's ops on the CPU, without argument checks.

``kernels.ops`` is the public, checked API: every call validates shapes, dtypes and devices
before dispatching, which on the CPU costs more than the arithmetic of a one-token decode
step (tens of microseconds per call, 90 calls per step on a 30-layer model). The model's
own fused path passes tensors it built itself, so on the CPU it calls these instead (see
``kernels.ops.fused_ops``). Same math as ``kernels.reference`` (fp32, results in the
inputs' dtype): one C call per op (``kernels.cpu_elementwise``) where it is built, else
PyTorch (the rotary written with fewer aten calls).

GEMMs (each packing replaces the oneDNN copy below): fp32 weights are repacked once into
``kernels.cpu_sgemm``'s 16-column panels (``prepack_linear_weight``), which run passes of 1 to
``cpu_sgemm.MAX_ROWS`` rows (at the bandwidth at one row like MKL's sgemv, 1.2-2x oneDNN's
packed GEMM at 2-64 rows on an AVX-512 Xeon; each row's result independent of the others);
bf16 weights, on a CPU with AVX512-BF16 and no AMX, into its pair panels
(``cpu_sgemm.pack_pairs``: passes of 1 to ``cpu_sgemm.PAIR_MAX_ROWS`` rows, 1.3-1.7x oneDNN's
packed GEMM at 1-8 rows, level above; rows again independent). Other dtypes: a pass of at most
four rows (a decode step at batch 1-4, a small block) goes through ``kernels.cpu_gemv``, which
streams the weights at close to the memory bandwidth. Larger passes of at most
``PACKED_MAX_ROWS`` rows use a copy of the weight reordered once: on a CPU with AMX-BF16, the
tiles of ``kernels.cpu_amx`` (1.5-1.7x oneDNN's packed GEMM at 5-32 rows); else oneDNN's
blocked layout for bf16/fp16 (and fp32 where the panels cannot run), which skips the plain
GEMM's per-call reorder (1.1-1.7x faster per projection at 1-256 rows on an AVX-512 Xeon,
bit-identical results; slower at 512 rows, so larger passes take the plain GEMM).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kernels import cpu_amx, cpu_elementwise, cpu_gemv, cpu_sgemm
from kernels.reference import rms_norm_reference, silu_mul_reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``kernels.reference.rms_norm_reference``."""
    operands = (x, weight) if residual is None else (x, weight, residual)
    if cpu_elementwise.applies(*operands):
        return cpu_elementwise.add_rms_norm(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """As ``kernels.reference.silu_mul_reference``."""
    if cpu_elementwise.applies(gate_up):
        return cpu_elementwise.silu_mul(gate_up)
    return silu_mul_reference(gate_up)


# a weight reordered once for ``linear``: AMX tiles, fp32 or bf16 pair panels, or oneDNN's blocked tensor
PackedWeight = torch.Tensor | cpu_amx.AmxWeight | cpu_sgemm.PanelWeight | cpu_sgemm.PairPanelWeight


def prepack_linear_weight(weight: torch.Tensor) -> PackedWeight | None:
    """A copy of a ``[N, K]`` weight reordered for ``linear``: ``kernels.cpu_amx``'s tiles (bf16)
    or ``kernels.cpu_sgemm``'s panels (fp32) where those kernels run, else oneDNN's blocked
    layout; None where packing cannot run (no oneDNN, a CPU without bf16/fp16 support)."""
    if cpu_amx.packs(weight):
        return cpu_amx.pack(weight)
    if cpu_sgemm.packs_pairs(weight):
        return cpu_sgemm.pack_pairs(weight)
    if cpu_sgemm.packs(weight):
        return cpu_sgemm.pack(weight)
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    supported = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
                 torch.float32: lambda: True}.get(weight.dtype)
    if supported is None or not supported():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)  # layout tuned for 16 rows; any count works


# above this many rows the plain GEMM won again (0.6-1.0x at 512 rows, same machine)
PACKED_MAX_ROWS = 256


def linear(x: torch.Tensor, weight: torch.Tensor, packed: PackedWeight | None = None) -> torch.Tensor:
    """``x @ weight.T`` (no bias): fp32 panels (``packed``) for at most ``cpu_sgemm.MAX_ROWS``
    rows, bf16 pair panels for at most ``cpu_sgemm.PAIR_MAX_ROWS``; else at most
    ``cpu_gemv.MAX_ROWS`` rows through ``kernels.cpu_gemv`` (eager only: a compiled graph keeps
    its packed GEMMs); else through the ``packed`` copy of ``weight`` when
    given, for at most ``PACKED_MAX_ROWS`` rows."""
    rows = x.numel() // max(x.shape[-1], 1)
    if isinstance(packed, (cpu_sgemm.PanelWeight, cpu_sgemm.PairPanelWeight)):
        # the kernels have no backward and cannot be traced
        pairs = isinstance(packed, cpu_sgemm.PairPanelWeight)
        if (rows <= (cpu_sgemm.PAIR_MAX_ROWS if pairs else cpu_sgemm.MAX_ROWS) and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and x.requires_grad)):
            return cpu_sgemm.linear_pairs(x, packed) if pairs else cpu_sgemm.linear(x, packed)
        return F.linear(x, weight)
    if not torch.compiler.is_compiling() and cpu_gemv.applies(x, weight):
        return cpu_gemv.linear(x, weight)
    if packed is None or rows > PACKED_MAX_ROWS or (rows == 1 and weight.dtype == torch.float32):
        return F.linear(x, weight)
    if isinstance(packed, cpu_amx.AmxWeight):
        return cpu_amx.linear(x, packed)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, None, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``[-sin[:D/2], sin[D/2:]]``: rotate-half's sign folded into the table."""
    signed = sin.clone()
    signed[..., : sin.shape[-1] // 2].neg_()
    return signed


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # rotate_half(x) * sin == roll(x, D/2) * [-sin1, sin2]: the same products, one fewer copy
    x32 = x.float()
    out = torch.addcmul(x32 * cos.unsqueeze(-2), x32.roll(x.shape[-1] // 2, -1), signed_sin.unsqueeze(-2))
    return out if out.dtype == x.dtype else out.to(x.dtype)


def rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos_q: torch.Tensor, sin_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``kernels.ops.rotary_qk``: neox rotary of ``q`` with the query tables and ``k`` with
    the plain ones; ``q``/``k`` may be strided views; outputs are new contiguous tensors."""
    if cpu_elementwise.applies(q, k) and cos.dtype == sin.dtype == cos_q.dtype == sin_q.dtype == torch.float32:
        return cpu_elementwise.rotary_qk(q, k, cos_q, sin_q, cos, sin)
    signed = _signed_sin(sin)
    signed_q = signed if sin_q is sin else _signed_sin(sin_q)
    return _rotate(q, cos_q, signed_q), _rotate(k, cos, signed)
