"""Segment attention over the paged cache on the CPU, through ``kernels/cpu_paged_attention.c``
(see its header): no gathered copies of the cached keys and values, exact fp32 softmax.

``SegmentPlan`` holds a step's segments (built once per forward pass); ``attend`` runs one
layer. Built on first use by ``kernels.cpu_build``; without a C compiler, or with
``NLD_CPU_ATTENTION_KERNEL=0``, ``available()`` is False and the caller keeps SDPA.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kernels import cpu_build

SOURCE = Path(__file__).with_name("cpu_paged_attention.c")
_FUNCTIONS = {torch.bfloat16: "nld_paged_attention_bf16", torch.float32: "nld_paged_attention_f32"}
# switched off by benchmarks (interleaved A/B) and tests (SDPA as the reference)
enabled = True


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load(SOURCE, "NLD_CPU_ATTENTION_KERNEL")
    return None if lib is None else _bind(lib)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.argtypes = [p] * 6 + [i64] * 3 + [p] * 6 + [i64] * 6 + [ctypes.c_float, ctypes.c_int]
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the compiled kernel is loaded (building it on the first call)."""
    return _library() is not None


def function_name(dtype: torch.dtype) -> str:
    """The library's entry point for caches and activations of ``dtype`` (fp32 or bf16)."""
    return _FUNCTIONS[dtype]


def takes(dtype: torch.dtype, page_size: int) -> bool:
    """Whether caches and activations of ``dtype`` in pages of ``page_size`` tokens can attend
    here (the kernel walks pages by shift and mask: a power of two)."""
    return enabled and dtype in _FUNCTIONS and page_size > 0 and page_size & (page_size - 1) == 0 and available()


class SegmentPlan:
    """Segments ``s``: query rows ``q_start[s] .. q_start[s] + q_len[s]`` of the pass, after
    ``ctx[s]`` cached tokens in pages ``tables[s]``, causal or bidirectional among themselves,
    or with the quadratic mask of sub-blocks of ``sub_block[s]`` rows where that is > 0
    (``sub_block`` None: none)."""

    sub_block: torch.Tensor | None = None

    def __init__(self, q_start: list[int], q_len: list[int], ctx: list[int], causal: list[bool],
                 tables: list[list[int]], sub_block: list[int] | None = None) -> None:
        assert len(q_start) == len(q_len) == len(ctx) == len(causal) == len(tables) > 0
        width = max(1, max(len(t) for t in tables))
        self.num_segs = len(q_start)
        self.q_start = torch.tensor(q_start, dtype=torch.int64)
        self.q_len = torch.tensor(q_len, dtype=torch.int64)
        self.ctx = torch.tensor(ctx, dtype=torch.int64)
        self.causal = torch.tensor(causal, dtype=torch.uint8)
        self.tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
        self.rows = sum(q_len)
        if sub_block is not None and any(sub_block):
            self.sub_block = torch.tensor(sub_block, dtype=torch.int64)

    @classmethod
    def of_tensors(cls, q_start: torch.Tensor, q_len: torch.Tensor, ctx: torch.Tensor, causal: torch.Tensor,
                   tables: torch.Tensor, rows: int, sub_block: torch.Tensor | None = None) -> "SegmentPlan":
        """The plan from tensors already laid out as above (int64, ``causal`` uint8, ``tables``
        ``[S, width]``, all contiguous) and its row count: no list conversions."""
        assert q_start.dtype == q_len.dtype == ctx.dtype == tables.dtype == torch.int64 and causal.dtype == torch.uint8
        assert tables.dim() == 2 and q_start.shape == q_len.shape == ctx.shape == causal.shape == tables.shape[:1]
        plan = cls.__new__(cls)
        plan.num_segs, plan.q_start, plan.q_len, plan.ctx = q_start.shape[0], q_start, q_len, ctx
        plan.causal, plan.tables, plan.rows = causal, tables, rows
        if sub_block is not None:
            assert sub_block.dtype == torch.int64 and sub_block.shape == q_start.shape
            plan.sub_block = sub_block
        return plan


def _heads_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


def attend(plan: SegmentPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, out: torch.Tensor, scale: float, lib: ctypes.CDLL | None = None) -> None:
    """Write the attention output of the plan's query rows into ``out`` (``[T, Hq, D]``,
    contiguous; other rows untouched). ``q`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` (the
    pass's fresh keys: a segment's own keys are read from here), ``k_cache``/``v_cache`` one
    layer's ``[pages, page_size, Hkv, D]``, all of one dtype. ``lib``: another build (tests)."""
    lib = lib or _library()
    assert lib is not None
    assert q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype == out.dtype
    assert out.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    q, k, v = _heads_contiguous(q), _heads_contiguous(k), _heads_contiguous(v)
    hq, d = q.shape[1], q.shape[2]
    page_size, hkv = k_cache.shape[1], k_cache.shape[2]
    getattr(lib, function_name(q.dtype))(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        q.stride(0), k.stride(0), v.stride(0),
        plan.q_start.data_ptr(), plan.q_len.data_ptr(), plan.ctx.data_ptr(), plan.causal.data_ptr(),
        None if plan.sub_block is None else plan.sub_block.data_ptr(),
        plan.tables.data_ptr(), plan.tables.shape[1], plan.num_segs, hq, hkv, d, page_size,
        scale, torch.get_num_threads())
