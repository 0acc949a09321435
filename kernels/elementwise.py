"""Triton kernels for the per-layer elementwise work of the decoder (the fused/CUDA path).

Each one replaces a chain of small PyTorch ops (one launch and one HBM round trip each) by
one launch, with the same math as the PyTorch modules in ``server/model/layers.py``:

* ``rms_norm``: optional residual add (``x + residual`` rounded to ``x``'s dtype, stored as the
  new residual), then ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)`` with the
  normalisation in fp32, the cast to ``x``'s dtype *before* the weight multiply, and the
  product rounded to ``promote_types(weight, x)`` (what ``RMSNorm.forward`` does).
* ``rotary_qk``: neox (rotate-half) rotary on ``q`` (with the query tables, which carry the
  Llama-4 query scale) and ``k`` (plain tables) in one launch; fp32 math, output in the input
  dtype. ``q``/``k`` may be strided views into a fused QKV output.
* ``silu_mul``: ``silu(g) * u`` over the two halves of the last dimension, fp32 math.

Every kernel computes in fp32 with explicit casts, so bf16 inputs never go through the
interpreter's (wrong) bf16 arithmetic. Launchers assume inputs validated by ``kernels.ops``
(2-D / 3-D views with a unit-stride last dimension); they never sync with the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm_triton", "rotary_qk_triton", "silu_mul_triton", "MAX_RMS_NORM_COLS"]

# One program holds a whole row in registers; wider rows fall back to the reference in ops.
MAX_RMS_NORM_COLS = 32768


@triton.jit
def _rms_norm_kernel(
    y_ptr, res_out_ptr, x_ptr, res_ptr, w_ptr, n_cols, eps,
    stride_y, stride_ro, stride_x, stride_r,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        # x + residual in x's dtype (fp32 add, one rounding: what PyTorch does)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    mean_sq = tl.sum(x32 * x32, 0) / n_cols
    normed = (x32 * tl.math.rsqrt(mean_sq + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(x_ptr, o_ptr, t, num_heads, stride_xt, stride_xh, stride_ot, stride_oh,
                  cos_ptr, sin_ptr, stride_ct, stride_st, offs, mask_d,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[:half] = x1*c1 - x2*s1, out[half:] = x2*c2 + x1*s2 for every head of token t, with
    (c1, c2) / (s1, s2) the halves of token t's cos / sin rows. Both halves of each table are
    loaded (no assumption that they are equal)."""
    c1 = tl.load(cos_ptr + t * stride_ct + offs, mask=mask_d, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + offs, mask=mask_d, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_st + offs, mask=mask_d, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_st + HALF + offs, mask=mask_d, other=0.0).to(tl.float32)
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < num_heads)[:, None] & mask_d[None, :]
        src = x_ptr + t * stride_xt + heads[:, None] * stride_xh + offs[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
        dst = o_ptr + t * stride_ot + heads[:, None] * stride_oh + offs[None, :]
        tl.store(dst, o1.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, o2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_qk_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_q_ptr, sin_q_ptr, cos_ptr, sin_ptr,
    num_q_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cqt, stride_sqt, stride_ct, stride_st,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    mask_d = offs < HALF
    _rotate_heads(q_ptr, qo_ptr, t, num_q_heads, stride_qt, stride_qh, stride_qot, stride_qoh,
                  cos_q_ptr, sin_q_ptr, stride_cqt, stride_sqt, offs, mask_d, HALF, BLOCK_H)
    _rotate_heads(k_ptr, ko_ptr, t, num_kv_heads, stride_kt, stride_kh, stride_kot, stride_koh,
                  cos_ptr, sin_ptr, stride_ct, stride_st, offs, mask_d, HALF, BLOCK_H)


@triton.jit
def _silu_mul_kernel(out_ptr, in_ptr, n_cols, stride_out, stride_in, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(in_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(in_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side (inputs validated and flattened by kernels.ops)
# --------------------------------------------------------------------------------------------

def _row_warps(block: int) -> int:
    return max(1, min(8, block // 512))


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``/``residual``: ``[N, H]`` (unit last stride); ``weight``: ``[H]`` contiguous."""
    rows, cols = x.shape
    y = torch.empty((rows, cols), dtype=torch.promote_types(weight.dtype, x.dtype),
                    device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) \
        if residual is not None else x
    if rows == 0:
        return y, res_out
    block = triton.next_power_of_2(cols)
    res_in = residual if residual is not None else x
    _rms_norm_kernel[(rows,)](
        y, res_out, x, res_in, weight, cols, float(eps),
        y.stride(0), res_out.stride(0), x.stride(0), res_in.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_row_warps(block))
    return y, res_out


def rotary_qk_triton(q: torch.Tensor, k: torch.Tensor, cos_q: torch.Tensor, sin_q: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[T, Hq, D]``, ``k`` ``[T, Hkv, D]`` (any row/head strides, unit last stride);
    tables ``[T, D]`` with a unit last stride. Returns new contiguous ``q``, ``k``."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    # ~2K elements per head block: all heads of an 8B-sized layer in a few iterations
    block_h = max(1, min(triton.next_power_of_2(max(num_q_heads, num_kv_heads)),
                         2048 // block_half))
    _rotary_qk_kernel[(num_tokens,)](
        q, k, q_out, k_out, cos_q, sin_q, cos, sin, num_q_heads, num_kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos_q.stride(0), sin_q.stride(0), cos.stride(0), sin.stride(0),
        HALF=half, BLOCK_HALF=block_half, BLOCK_H=block_h, num_warps=4)
    return q_out, k_out


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up``: ``[N, 2I]`` (unit last stride) -> ``[N, I]``."""
    rows, width = gate_up.shape
    n_cols = width // 2
    out = torch.empty((rows, n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0 or n_cols == 0:
        return out
    block = min(1024, triton.next_power_of_2(n_cols))  # >= 14 programs per row at 8B sizes
    _silu_mul_kernel[(rows, triton.cdiv(n_cols, block))](
        out, gate_up, n_cols, out.stride(0), gate_up.stride(0), BLOCK=block,
        num_warps=_row_warps(block))
    return out
