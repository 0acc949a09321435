"""The fused model path's elementwise ops on the CPU, without argument checks.

``kernels.ops`` is the public, checked API: every call validates shapes, dtypes and devices
before dispatching, which on the CPU costs more than the arithmetic of a one-token decode
step (tens of microseconds per call, 90 calls per step on a 30-layer model). The model's
own fused path passes tensors it built itself, so on the CPU it calls these instead (see
``kernels.ops.fused_ops``). Same math as ``kernels.reference`` (fp32, results in the
inputs' dtype); the rotary is written with fewer aten calls.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kernels.reference import rms_norm_reference

rms_norm = rms_norm_reference


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
    signed = _signed_sin(sin)
    signed_q = signed if sin_q is sin else _signed_sin(sin_q)
    return _rotate(q, cos_q, signed_q), _rotate(k, cos, signed)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """As ``kernels.ops.silu_mul``: ``silu(g) * u`` over the halves of the last dimension."""
    n = gate_up.shape[-1] // 2
    out = F.silu(gate_up[..., :n].float()).mul_(gate_up[..., n:])
    return out if out.dtype == gate_up.dtype else out.to(gate_up.dtype)
