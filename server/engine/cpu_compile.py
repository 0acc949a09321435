"""The decoder compiled for the CPU: the CPU's counterpart of the CUDA graphs (opt-in).

``torch.compile`` (inductor, weights frozen and prepacked for oneDNN) turns a pass's Python
layer loop and its ~20 small ops per layer (RMSNorm, rotary, SiLU, residual adds and the
dtype conversions between them) into a few fused C++ loops around the GEMMs. Attention
stays eager: ``CpuPagedAttention`` plans each ragged batch from host lists, which a graph
cannot see, so the graph reaches it through the custom op ``nld::cpu_paged_attention``,
which calls the attention context of the pass being run (``_ACTIVE``).

Invariants:

* one graph per token-count class (dynamo specialises a count of 1; every larger count
  shares the dynamic graph), whatever the batch's modes: masks and cache writes live inside
  the attention op, so decode, prefill, denoise, draft and verify passes reuse the graphs;
* only passes without draft-adapter rows or image features run compiled (the rest run the
  eager model, which has the same weights), and only those too wide for ``kernels.cpu_gemv``:
  a pass of 1-4 rows runs eagerly through that kernel, which streams the weights about twice
  as fast as oneDNN's GEMM at one row (see ``runs``);
* the op declares no mutated inputs although it writes layer ``i``'s cache slice: nothing
  else in the graph reads or writes the caches, and layer ``i + 1``'s call depends on layer
  ``i``'s output, so the compiler can neither drop nor reorder the calls.

Measured on a 2-vCPU Xeon (AVX-512, AMX), SmolLM2-135M: a pass 1.0-1.3x faster than eager,
served tokens/s 1.0-1.2x; compiling costs 20 s (embedded model) to 2 minutes (135M) at
start-up, every time (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch._inductor import config as inductor_config

from kernels import cpu_gemv
from server.engine.cpu_attention import CpuPagedAttention
from server.model.model import DecoderModel

# the attention context of the compiled pass now running (set just before the call)
_ACTIVE: list[CpuPagedAttention | None] = [None]


@torch.library.custom_op("nld::cpu_paged_attention", mutates_args=())
def cpu_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """``CpuPagedAttention.attend`` of the active pass, as one opaque op (output contiguous)."""
    ctx = _ACTIVE[0]
    assert ctx is not None, "called outside CompiledDecoder.__call__"
    return ctx.attend(layer, q, k, v).contiguous()


@cpu_paged_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(q)


class _OpAttention:
    """The attention context the graph is traced with: every layer calls the custom op."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.nld.cpu_paged_attention(q, k, v, layer)


class CompiledDecoder:
    """``model(input_ids, positions, ctx)`` through ``torch.compile`` for flat (ragged)
    batches on the CPU. The model must be fused and its layers must not hold prepacked oneDNN
    weights (inductor packs its own; packed tensors cannot be traced; the head, outside the
    graph, may)."""

    def __init__(self, model: DecoderModel) -> None:
        assert model.fused_kernels and all(layer.self_attn.packed is None and layer.mlp.packed is None
                                           for layer in model.layers), "fuse_projections() without packed layers"
        self.model = model
        op_ctx = _OpAttention()
        forward = model.forward
        self._compiled: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.compile(
            lambda ids, positions: forward(ids, positions, op_ctx), dynamic=True)

    def runs(self, num_tokens: int) -> bool:
        """Whether a pass of ``num_tokens`` rows should run compiled: not where the eager
        path's few-row kernel takes it (1.3-1.6x faster than this graph at one bf16 row on
        SmolLM2-135M, where the GEMMs are the whole cost)."""
        return not cpu_gemv.takes(num_tokens, self.model.embed_tokens.weight.dtype)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: CpuPagedAttention) -> torch.Tensor:
        """Final hidden states ``[T, hidden]``; ``ctx`` stores and attends for every layer."""
        _ACTIVE[0] = ctx
        try:
            # freezing (weights as constants, packed for oneDNN) is read when a graph compiles;
            # torch.compile's options= does not reach it, so it is patched around every call
            with inductor_config.patch(freezing=True):
                return self._compiled(input_ids, positions)
        finally:
            _ACTIVE[0] = None

    @torch.inference_mode()
    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> float:
        """Compile both graphs now (one token, several tokens) on passes that read and write
        no cache; returns the seconds it took."""
        start = time.perf_counter()
        cfg = self.model.config
        for n in (1, 2):
            ctx = CpuPagedAttention(k_cache, v_cache, [-1] * n, [0], [0, n], [True], [[]], cfg.num_heads, scale)
            self(torch.zeros(n, dtype=torch.int64), torch.arange(n), ctx)
        return time.perf_counter() - start
