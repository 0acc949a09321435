"""Building blocks of the decoder: RMSNorm, rotary tables, SwiGLU MLP, query scaling."""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F

from kernels import cpu_ops
from kernels import ops as kernel_ops
from kernels.reference import rms_norm_reference, rotate_half_reference
from server.model.config import RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps)[0]


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse_projections()
        # set by DecoderModel.prepack_cpu_weights(): reordered copies of the gate/up and down weights
        self.packed: tuple[cpu_ops.PackedWeight, cpu_ops.PackedWeight] | None = None

    def fuse_projections(self) -> None:
        """Replace gate/up by one fused projection (same math, one GEMM instead of two)."""
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight], dim=0)
        self.gate_up_proj = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        self.gate_up_proj.weight = nn.Parameter(w.detach(), requires_grad=False)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.forward_fused(x, kernel_ops)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_fused(self, x: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        """After ``fuse_projections``: one gate/up GEMM and ``ops.silu_mul`` (fp32 math)."""
        assert self.gate_up_proj is not None
        gate_up, down = self.packed or (None, None)
        h = ops.silu_mul(ops.linear(x, self.gate_up_proj.weight, gate_up))
        return ops.linear(h, self.down_proj.weight, down)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] for the configured rope type (default, linear, llama3, yarn)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    pos_freqs = rope.theta**exponents
    inv_freq = 1.0 / pos_freqs
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        orig = rope.original_max_position_embeddings or 8192
        low_wavelen = orig / rope.low_freq_factor
        high_wavelen = orig / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (orig / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if rope.rope_type == "yarn":
        orig = rope.original_max_position_embeddings
        assert orig is not None, "yarn needs original_max_position_embeddings"

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation_weight = 1 - ramp
        return inv_freq / rope.factor * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding evaluated at arbitrary absolute positions.

    Invariant: cos/sin are multiplied by ``rope.attention_factor`` (HF semantics)."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(rope, head_dim), persistent=False)
        self.attention_factor = rope.attention_factor

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., T, H, D]; cos/sin: [..., T, D] (fp32). Returns x's dtype."""
    return rotate_half_reference(x, cos, sin)


def llama4_query_scale(positions: torch.Tensor, beta: float, original_max: int) -> torch.Tensor:
    """Per-token query multiplier 1 + beta*ln(1 + floor(pos / original_max)); exactly 1 below original_max."""
    return 1 + beta * torch.log1p(torch.floor(positions.float() / original_max))
