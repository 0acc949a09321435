"""Public kernel ops: input checks and dispatch between Triton and the PyTorch reference.

Attention (``paged_attention``, ``store_kv``) and the elementwise ops of the fused model path
(``rms_norm``, ``rotary_qk``, ``silu_mul``). Dispatch rule:

* CUDA tensors -> Triton kernels (``kernels.block_attention``, ``kernels.kv_store``,
  ``kernels.elementwise``).
* CPU tensors -> the PyTorch reference (``kernels.reference``), unless the environment variable
  ``NLD_FORCE_TRITON=1`` is set; then the Triton kernels run, which on the CPU needs Triton's
  interpreter (``TRITON_INTERPRET=1`` set before the kernel modules are imported).

The Triton modules are imported lazily, on first use, so importing this module never imports
Triton and the environment can still be set up afterwards.

Checks raise ``ValueError`` with a message naming the offending argument. They only read
shapes, dtypes, strides and devices, so they never sync with the GPU. See
``docs/design.md`` ("The attention contract") for the meaning of every argument.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import replace
from types import ModuleType

import torch

from kernels.attention_metadata import AttentionMetadata
from kernels.reference import (
    paged_attention_reference,
    rms_norm_reference,
    rotary_qk_reference,
    silu_mul_reference,
    store_kv_reference,
)

__all__ = [
    "AttentionMetadata", "paged_attention", "store_kv", "rms_norm", "rotary_qk", "silu_mul", "triton_available",
    "use_triton", "fused_ops", "linear",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SLOT_DTYPES = (torch.int32, torch.int64)
_MAX_RMS_NORM_COLS = 32768  # kernels.elementwise.MAX_RMS_NORM_COLS (not imported: no Triton here)


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when Triton is installed and has something to run on: a CUDA GPU, or the
    interpreter (``TRITON_INTERPRET=1``)."""
    if not _triton_importable():
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(device: torch.device) -> bool:
    """Whether tensors on ``device`` go through the Triton kernels (see module docstring)."""
    if device.type == "cuda":
        return True
    return os.environ.get("NLD_FORCE_TRITON", "0") == "1"


def fused_ops(device: torch.device) -> ModuleType:
    """The ops (``rms_norm``, ``rotary_qk``, ``silu_mul``, ``linear``) the model's fused path
    uses for tensors on ``device``: this module where the Triton kernels run, else
    ``kernels.cpu_ops`` (the same math without per-call argument checks)."""
    if use_triton(device):
        return sys.modules[__name__]
    from kernels import cpu_ops

    return cpu_ops


def _require_triton(device: torch.device) -> None:
    if not _triton_importable():
        raise RuntimeError("Triton is not installed but the Triton kernels were requested")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            "NLD_FORCE_TRITON=1 on CPU tensors needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 before kernels.block_attention / kernels.kv_store are imported")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check(t.dim() == rank, f"{name} must be {layout}, got shape {tuple(t.shape)}")


def _check_same_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        _check(t.device == device, f"{name} is on {t.device} but q/k is on {device}")


def _check_fresh_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor) -> None:
    """Shared checks of the fresh K/V rows and the paged caches."""
    _check_rank("k", k, 3, "[T, Hkv, D]")
    _check_rank("v", v, 3, "[T, Hkv, D]")
    _check_rank("k_cache", k_cache, 4, "[num_pages, page_size, Hkv, D]")
    _check_rank("v_cache", v_cache, 4, "[num_pages, page_size, Hkv, D]")
    _check(k.shape == v.shape, f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    _check(k_cache.shape == v_cache.shape,
           f"k_cache and v_cache shapes differ: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    _check(k_cache.shape[2:] == k.shape[1:],
           f"cache [.., Hkv, D] = {tuple(k_cache.shape[2:])} does not match k's "
           f"[T, Hkv, D] = {tuple(k.shape)}")
    _check(k_cache.shape[1] > 0, "page_size (k_cache.shape[1]) must be positive")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check(t.dtype in _FLOAT_DTYPES, f"{name} must be float16/bfloat16/float32, got {t.dtype}")
    _check(k.dtype == v.dtype == k_cache.dtype == v_cache.dtype,
           f"k, v, k_cache, v_cache must share one dtype, got {k.dtype}, {v.dtype}, "
           f"{k_cache.dtype}, {v_cache.dtype}")
    for name, t in (("k", k), ("v", v)):
        _check(t.stride(-1) == 1, f"{name} must be contiguous in its last (head_dim) dimension")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(t.is_contiguous(), f"{name} must be contiguous")


def _check_int_vector(name: str, t: torch.Tensor, length: int, dtypes: tuple, what: str) -> None:
    _check_rank(name, t, 1, what)
    _check(t.dtype in dtypes, f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    _check(t.shape[0] == length, f"{name} must have {length} entries ({what}), got {t.shape[0]}")
    _check(t.is_contiguous(), f"{name} must be contiguous")


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    meta: AttentionMetadata, scale: float,
) -> torch.Tensor:
    """Attention of each segment over its cached prefix and its own fresh K/V; ``[T, Hq, D]``.

    ``meta.max_query_len`` (host int, the largest segment length) sizes the Triton grid. If
    None it is computed from ``query_start_loc``, which costs a device->host sync on the GPU.
    ``meta.mask_block`` (int32 [S], optional): a segment with ``mask_block[s] = W > 0`` uses the
    quadratic mask with sub-blocks of ``W`` rows (docs/design.md) instead of ``causal[s]``.
    """
    block_tables, context_lens, query_start_loc, causal = (
        meta.block_tables, meta.context_lens, meta.query_start_loc, meta.causal)
    max_query_len = meta.max_query_len
    _check_rank("q", q, 3, "[T, Hq, D]")
    _check_fresh_and_cache(k, v, k_cache, v_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    _check(q.dtype == k.dtype, f"q dtype {q.dtype} differs from k/v/cache dtype {k.dtype}")
    _check(k.shape[0] == num_tokens, f"k/v have {k.shape[0]} rows but q has {num_tokens}")
    _check(k.shape[2] == head_dim, f"head_dim differs: q has {head_dim}, k has {k.shape[2]}")
    _check(head_dim > 0, "head_dim must be positive")
    num_kv_heads = k.shape[1]
    _check(num_kv_heads > 0 and num_q_heads % num_kv_heads == 0,
           f"Hq={num_q_heads} must be a multiple of Hkv={num_kv_heads}")
    _check(q.stride(-1) == 1, "q must be contiguous in its last (head_dim) dimension")

    _check_rank("context_lens", context_lens, 1, "[S]")
    num_seqs = context_lens.shape[0]
    _check_int_vector("context_lens", context_lens, num_seqs, (torch.int32,), "[S]")
    _check_int_vector("query_start_loc", query_start_loc, num_seqs + 1, (torch.int32,),
                      "[S + 1]")
    _check_rank("causal", causal, 1, "[S]")
    _check(causal.dtype == torch.bool, f"causal must be torch.bool, got {causal.dtype}")
    _check(causal.shape[0] == num_seqs,
           f"causal must have {num_seqs} entries ([S]), got {causal.shape[0]}")
    if meta.mask_block is not None:
        _check_int_vector("mask_block", meta.mask_block, num_seqs, (torch.int32,), "[S]")
        _check_same_device(q.device, mask_block=meta.mask_block)
    _check_rank("block_tables", block_tables, 2, "[S, max_pages]")
    _check(block_tables.dtype == torch.int32,
           f"block_tables must be torch.int32, got {block_tables.dtype}")
    _check(block_tables.shape[0] == num_seqs,
           f"block_tables has {block_tables.shape[0]} rows, expected S={num_seqs}")
    _check(block_tables.stride(-1) == 1, "block_tables must be contiguous in its last dimension")
    _check_same_device(q.device, k=k, v=v, k_cache=k_cache, v_cache=v_cache,
                       block_tables=block_tables, context_lens=context_lens,
                       query_start_loc=query_start_loc, causal=causal)
    _check(isinstance(scale, (float, int)) and scale > 0,
           f"scale must be a positive float, got {scale!r}")
    if max_query_len is not None:
        _check(isinstance(max_query_len, int) and max_query_len >= 0,
               f"max_query_len must be a non-negative int, got {max_query_len!r}")

    if not use_triton(q.device):
        if num_seqs > 0:
            _check(int(query_start_loc[-1]) == num_tokens,
                   f"query_start_loc[-1]={int(query_start_loc[-1])} must equal T={num_tokens}")
        return paged_attention_reference(q, k, v, k_cache, v_cache, meta, float(scale))

    _require_triton(q.device)
    from kernels.block_attention import block_attention

    if max_query_len is None:
        lens = query_start_loc[1:] - query_start_loc[:-1]
        meta = replace(meta, max_query_len=int(lens.max()) if num_seqs > 0 else 0)
    return block_attention(q, k, v, k_cache, v_cache, meta, float(scale))


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write row ``t`` of ``k``/``v`` to cache slot ``slot_mapping[t]`` in place (-1: skip)."""
    _check_fresh_and_cache(k, v, k_cache, v_cache)
    _check_int_vector("slot_mapping", slot_mapping, k.shape[0], _SLOT_DTYPES, "[T]")
    _check_same_device(k.device, v=v, k_cache=k_cache, v_cache=v_cache,
                       slot_mapping=slot_mapping)
    if not use_triton(k.device):
        store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
        return
    _require_triton(k.device)
    from kernels.kv_store import kv_store

    kv_store(k, v, k_cache, v_cache, slot_mapping)


# ------------------------------------------------------------------------ elementwise ops
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, new_residual)``. With ``residual``, first ``x = x + residual`` (returned as
    ``new_residual``, in ``x``'s dtype); without, ``new_residual`` is ``x``. Then
    ``y = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)`` (``RMSNorm.forward``)."""
    _check(isinstance(x, torch.Tensor) and x.dim() >= 1, "x must be a tensor [..., hidden]")
    hidden = x.shape[-1]
    _check(x.dtype in _FLOAT_DTYPES, f"x must be float16/bfloat16/float32, got {x.dtype}")
    _check(isinstance(weight, torch.Tensor) and weight.shape == (hidden,),
           f"weight must be [{hidden}], got {tuple(getattr(weight, 'shape', ()))}")
    _check(weight.dtype in _FLOAT_DTYPES, f"weight must be a float tensor, got {weight.dtype}")
    _check(isinstance(eps, (float, int)) and eps >= 0, f"eps must be >= 0, got {eps!r}")
    if residual is not None:
        _check(isinstance(residual, torch.Tensor) and residual.shape == x.shape,
               f"residual must have x's shape {tuple(x.shape)}, got "
               f"{tuple(getattr(residual, 'shape', ()))}")
        _check(residual.dtype == x.dtype,
               f"residual dtype {residual.dtype} differs from x dtype {x.dtype}")
        _check_same_device(x.device, weight=weight, residual=residual)
    else:
        _check_same_device(x.device, weight=weight)
    # rows wider than one program's register tile take the reference (still on the device)
    if not use_triton(x.device) or not 0 < hidden <= _MAX_RMS_NORM_COLS:
        return rms_norm_reference(x, weight, float(eps), residual)
    _require_triton(x.device)
    lead = x.shape[:-1]
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else None
    y, new_res = _elementwise().rms_norm_triton(x2, weight.contiguous(), float(eps), r2)
    return y.view(*lead, hidden), (new_res.view(*lead, hidden) if residual is not None else x)


def rotary_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_q: torch.Tensor,
    sin_q: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox (rotate-half) rotary, fp32 math, outputs in the inputs' dtype (``apply_rotary``):
    ``q`` ``[..., Hq, D]`` with ``cos_q``/``sin_q``, ``k`` ``[..., Hkv, D]`` with ``cos``/``sin``
    (tables ``[..., D]`` over the same leading dims). ``q``/``k`` may be strided views (e.g.
    into a fused QKV output); the outputs are new contiguous tensors."""
    _check(isinstance(q, torch.Tensor) and q.dim() >= 3, "q must be [..., T, Hq, D]")
    _check(isinstance(k, torch.Tensor) and k.dim() == q.dim(), "k must be [..., T, Hkv, D]")
    lead, head_dim = q.shape[:-2], q.shape[-1]
    _check(k.shape[:-2] == lead and k.shape[-1] == head_dim,
           f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (leading dims, head_dim)")
    _check(head_dim % 2 == 0, f"head_dim must be even for rotate-half rotary, got {head_dim}")
    for name, t in (("q", q), ("k", k)):
        _check(t.dtype in _FLOAT_DTYPES, f"{name} must be float16/bfloat16/float32, got {t.dtype}")
    for name, t in (("cos_q", cos_q), ("sin_q", sin_q), ("cos", cos), ("sin", sin)):
        _check(isinstance(t, torch.Tensor) and t.shape == (*lead, head_dim),
               f"{name} must be {(*lead, head_dim)}, got {tuple(getattr(t, 'shape', ()))}")
        _check(t.dtype in _FLOAT_DTYPES, f"{name} must be a float tensor, got {t.dtype}")
    _check_same_device(q.device, k=k, cos_q=cos_q, sin_q=sin_q, cos=cos, sin=sin)
    if not use_triton(q.device):
        return rotary_qk_reference(q, k, cos_q, sin_q, cos, sin)
    _require_triton(q.device)
    q3 = _rows(q, keep=2)
    k3 = _rows(k, keep=2)
    tables = [_rows(t) for t in (cos_q, sin_q, cos, sin)]
    q_out, k_out = _elementwise().rotary_qk_triton(q3, k3, *tables)
    return q_out.view(q.shape), k_out.view(k.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` where ``g, u`` are the two halves of the last dimension of ``gate_up``
    ``[..., 2I]``; fp32 math, output ``[..., I]`` in ``gate_up``'s dtype."""
    _check(isinstance(gate_up, torch.Tensor) and gate_up.dim() >= 1,
           "gate_up must be a tensor [..., 2 * intermediate]")
    _check(gate_up.shape[-1] % 2 == 0,
           f"gate_up's last dimension must be even, got {gate_up.shape[-1]}")
    _check(gate_up.dtype in _FLOAT_DTYPES,
           f"gate_up must be float16/bfloat16/float32, got {gate_up.dtype}")
    if not use_triton(gate_up.device):
        return silu_mul_reference(gate_up)
    _require_triton(gate_up.device)
    out = _elementwise().silu_mul_triton(_rows(gate_up))
    return out.view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T`` (no bias): the fused path's GEMM. ``packed`` (``kernels.cpu_ops``'s
    oneDNN layout of the same weight) is not used here: the dense weight gives the same
    result."""
    return torch.nn.functional.linear(x, weight)


def _elementwise():  # type: ignore[no-untyped-def]
    from kernels import elementwise

    return elementwise


def _rows(t: torch.Tensor, keep: int = 1) -> torch.Tensor:
    """``t`` with its leading dims flattened into one (``keep`` trailing dims kept), a view
    when the strides allow; the last dimension made unit-stride."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    flat = t.reshape(-1, *t.shape[t.dim() - keep:])
    if flat.stride(-1) != 1:  # size-1 trailing dims can carry any stride
        flat = flat.contiguous()
    return flat
