"""A whole fp32 or bf16 decoder pass on the CPU in one C call (``kernels/cpu_decoder.c``; its header
gives the math): the layer loop of the fused path without the Python between its kernels.

``DecoderPass`` binds a model's packed weights (``kernels.cpu_sgemm`` panels: fp32 or bf16
panels for an fp32 model, pair panels for a bf16 one), norms and paged caches once; calling it
runs every layer over a pass's rows and segments (a ``kernels.cpu_paged_attention.SegmentPlan``)
and returns the final hidden states. The kernels it calls are the fused path's own
(``kernels.cpu_sgemm``, ``kernels.cpu_elementwise``, ``kernels.cpu_paged_attention``), reached
through function pointers, so it is available only where all of them are built;
``NLD_CPU_DECODER=0`` switches it off.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import cpu_build, cpu_elementwise, cpu_paged_attention, cpu_sgemm
from kernels.cpu_paged_attention import SegmentPlan
from kernels.cpu_sgemm import PairPanelWeight, PanelWeight

SOURCE = Path(__file__).with_name("cpu_decoder.c")
# False: not available, so no model binds it (the eager fused path runs)
enabled = True

_P = ctypes.c_void_p


class _Decoder(ctypes.Structure):
    _fields_ = [
        ("sgemm", _P), ("sgemm_bf16w", _P), ("gemm_bf16", _P), ("act_bf16", ctypes.c_int64),
        ("add_rms_norm", _P), ("rotary_qk", _P), ("silu_mul", _P), ("attention", _P),
        ("layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("hq", ctypes.c_int64), ("hkv", ctypes.c_int64),
        ("d", ctypes.c_int64), ("inter", ctypes.c_int64), ("page_size", ctypes.c_int64),
        ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        ("norm1", _P), ("norm2", _P), ("qkv", _P), ("o", _P), ("gate_up", _P), ("down", _P), ("bf16", _P),
        ("final_norm", _P), ("k_cache", _P), ("v_cache", _P),
    ]


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load(SOURCE, "NLD_CPU_DECODER")
    if lib is None:
        return None
    lib.nld_decoder_scratch.argtypes = [_P, ctypes.c_int64]
    lib.nld_decoder_scratch.restype = ctypes.c_int64
    lib.nld_decoder_pass.argtypes = ([_P, _P, ctypes.c_int64] + [_P] * 6 + [ctypes.c_int64] + [_P] * 6
                                     + [ctypes.c_int64] * 2 + [_P] * 2 + [ctypes.c_int])
    lib.nld_decoder_pass.restype = None
    return lib


def available() -> bool:
    """Whether this library and the kernels it calls are built (building them on first use)."""
    return (enabled and _library() is not None and cpu_sgemm.available() and cpu_elementwise.available()
            and cpu_paged_attention.available())


def _address(fn: ctypes._CFuncPtr) -> int:  # type: ignore[name-defined]
    return ctypes.cast(fn, _P).value or 0


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights: norms ``[hidden]``, projections as panels (an fp32 model:
    fp32 or bf16 panels; a bf16 model: pair panels)."""

    input_norm: torch.Tensor
    qkv: PanelWeight | PairPanelWeight
    o: PanelWeight | PairPanelWeight
    post_norm: torch.Tensor
    gate_up: PanelWeight | PairPanelWeight
    down: PanelWeight | PairPanelWeight


class DecoderPass:
    """A model's weights and caches bound for ``nld_decoder_pass`` (callers check
    ``available()`` first, and ``pairs_available()`` for a bf16 model). Caches:
    ``[layers, pages, page_size, hkv, d]``, contiguous, in the activations' dtype (fp32 or bf16)."""

    def __init__(self, layers: list[LayerWeights], final_norm: torch.Tensor, eps: float, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, num_heads: int, scale: float) -> None:
        assert available()
        dtype = k_cache.dtype
        assert dtype == v_cache.dtype and dtype in (torch.float32, torch.bfloat16)
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
        kind = PairPanelWeight if dtype == torch.bfloat16 else PanelWeight
        assert all(isinstance(p, kind) for w in layers for p in (w.qkv, w.o, w.gate_up, w.down))
        _, _, page_size, hkv, d = k_cache.shape
        hidden, inter = final_norm.shape[0], layers[0].down.k
        for w in layers:
            assert (w.qkv.n, w.qkv.k) == ((num_heads + 2 * hkv) * d, hidden) and (w.o.n, w.o.k) == (hidden, num_heads * d)
            assert (w.gate_up.n, w.gate_up.k, w.down.n) == (2 * inter, hidden, hidden)
        self.hidden, self.dtype = hidden, dtype
        # every tensor the C side points at, kept alive here; norms in the activations' dtype
        self._norms = [w.input_norm.to(dtype).contiguous() for w in layers] + [
            w.post_norm.to(dtype).contiguous() for w in layers] + [final_norm.to(dtype).contiguous()]
        self._caches = (k_cache, v_cache)
        self._weights = layers
        self._arrays = [self._pointers(t) for t in (
            self._norms[: len(layers)], self._norms[len(layers): 2 * len(layers)],
            [w.qkv.panels for w in layers], [w.o.panels for w in layers], [w.gate_up.panels for w in layers],
            [w.down.panels for w in layers], list(k_cache), list(v_cache))]
        # per layer: whether its qkv, o, gate_up and down panels hold bf16 (pair panels all do)
        self._bf16 = (ctypes.c_uint8 * (4 * len(layers)))(
            *(int(isinstance(p, PairPanelWeight) or p.bf16) for w in layers for p in (w.qkv, w.o, w.gate_up, w.down)))
        lib = _library()
        sgemm, elementwise, attention = cpu_sgemm._library(), cpu_elementwise._library(), cpu_paged_attention._library()
        assert lib is not None and sgemm is not None and elementwise is not None and attention is not None
        self._lib = lib
        self._model = _Decoder(
            _address(sgemm.nld_sgemm_f32), _address(sgemm.nld_sgemm_bf16w), _address(sgemm.nld_gemm_bf16),
            int(dtype == torch.bfloat16), _address(elementwise.nld_add_rms_norm),
            _address(elementwise.nld_rotary_qk), _address(elementwise.nld_silu_mul),
            _address(getattr(attention, cpu_paged_attention.function_name(dtype))),
            len(layers), hidden, num_heads, hkv, d, inter, page_size, eps, scale,
            *(ctypes.addressof(a) for a in self._arrays[:6]), ctypes.addressof(self._bf16), self._norms[-1].data_ptr(),
            *(ctypes.addressof(a) for a in self._arrays[6:]))
        self._scratch_per_row = lib.nld_decoder_scratch(ctypes.byref(self._model), 1)  # linear in T

    @staticmethod
    def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
        assert all(t.is_contiguous() for t in tensors)
        return (_P * len(tensors))(*(t.data_ptr() for t in tensors))

    def __call__(self, x: torch.Tensor, cos_q: torch.Tensor, sin_q: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, write_rows: torch.Tensor, write_slots: torch.Tensor,
                 segments: SegmentPlan) -> torch.Tensor:
        """The final hidden states ``[T, hidden]`` of rows ``x`` (``[T, hidden]`` embeddings in
        the activations' dtype, contiguous, overwritten); rope tables ``[T, d]`` fp32 contiguous
        (the query ones with the query scale folded in); rows ``write_rows`` store their K/V at cache rows
        ``write_slots`` (int64) in every layer; ``segments`` cover every row once."""
        t = x.shape[0]
        assert x.dtype == self.dtype and x.is_contiguous() and x.shape[1] == self.hidden
        assert segments.rows == t and write_rows.shape == write_slots.shape
        model = ctypes.byref(self._model)
        scratch = torch.empty(t * self._scratch_per_row, dtype=self.dtype)
        out = torch.empty_like(x)
        self._lib.nld_decoder_pass(
            model, x.data_ptr(), t, cos_q.data_ptr(), sin_q.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            write_rows.data_ptr(), write_slots.data_ptr(), write_rows.shape[0],
            segments.q_start.data_ptr(), segments.q_len.data_ptr(), segments.ctx.data_ptr(),
            segments.causal.data_ptr(), None if segments.sub_block is None else segments.sub_block.data_ptr(),
            segments.tables.data_ptr(), segments.tables.shape[1], segments.num_segs,
            scratch.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out
