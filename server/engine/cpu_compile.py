"""The decoder compiled for the CPU: the CPU's counterpart of the CUDA graphs (opt-in).

``torch.compile`` (inductor, weights frozen and prepacked for oneDNN) turns a pass's Python
layer loop and its ~20 small ops per layer (RMSNorm, rotary, SiLU, residual adds and the
dtype conversions between them) into a few fused C++ loops around the GEMMs. Attention
stays eager: ``CpuPagedAttention`` plans each ragged batch from host lists, which a graph
cannot see, so the graph reaches it through the custom op ``nld::cpu_paged_attention``,
which calls the attention context of the pass being run (``_ACTIVE``).

Invariants:

* two graphs, whatever the batch's modes (masks and cache writes live inside the attention
  op, so decode, prefill, denoise, draft and verify passes reuse them): one token, whose
  projections are the opaque ``nld::cpu_few_row_linear`` (``kernels.cpu_gemv``, which
  streams the weights about twice as fast as oneDNN's packed GEMM at one bf16 row), and
  every larger count in one dynamic graph with oneDNN's packed GEMMs;
* only passes without draft-adapter rows or image features run compiled (the rest run the
  eager model, which has the same weights), and not those of 2-4 rows that
  ``kernels.cpu_gemv`` takes: those run eagerly through it (see ``runs``);
* the op declares no mutated inputs although it writes layer ``i``'s cache slice: nothing
  else in the graph reads or writes the caches, and layer ``i + 1``'s call depends on layer
  ``i``'s output, so the compiler can neither drop nor reorder the calls.

Measured on a 2-vCPU Xeon (AVX-512, AMX), SmolLM2-135M: a pass 1.0-1.3x faster than eager,
served tokens/s 1.0-1.3x in fp32; in bf16, since the eager path's AMX projections
(``kernels.cpu_amx``) beat the graph's oneDNN GEMMs, 0.8-1.1x at C=16. Compiling costs 20 s
(embedded model) to 2 minutes (135M) at start-up, every time (docs/benchmarks.md). Those
ratios are against the eager path before the one-call C path (``server.engine.cpu_decoder_pass``,
which a compiled decoder replaces): that path is faster in fp32 for passes of up to 128 rows
(the embedded model's one-row pass: 0.8-1.4 ms against 5.7 ms compiled, on an AMD EPYC).
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Callable

import torch
from torch._inductor import config as inductor_config
from torch.nn import functional as F

from kernels import cpu_gemv, cpu_ops
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


@torch.library.custom_op("nld::cpu_few_row_linear", mutates_args=())
def cpu_few_row_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` through ``kernels.cpu_gemv`` where it applies, else the plain GEMM."""
    if cpu_gemv.applies(x, weight):
        return cpu_gemv.linear(x, weight)
    return F.linear(x, weight)


@cpu_few_row_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _few_row_ops() -> ModuleType:
    """``kernels.cpu_ops`` with the projections as the opaque ``nld::cpu_few_row_linear``:
    the ops the one-token graph is traced with (the fused elementwise loops stay compiled)."""
    ops = ModuleType("nld_few_row_ops")
    ops.rms_norm, ops.rotary_qk, ops.silu_mul = cpu_ops.rms_norm, cpu_ops.rotary_qk, cpu_ops.silu_mul
    ops.linear = lambda x, weight, packed=None: torch.ops.nld.cpu_few_row_linear(x, weight)
    return ops


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
        few_row_ops = _few_row_ops()
        self._one_token: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.compile(
            lambda ids, positions: forward(ids, positions, op_ctx, ops=few_row_ops), dynamic=True)

    def runs(self, num_tokens: int) -> bool:
        """Whether a pass of ``num_tokens`` rows should run compiled: one token always (its
        graph calls the few-row kernel); 2-4 not where that kernel takes them: they run
        eagerly through it (1.27-1.36x the packed GEMM per eager pass; graphs of 2-4 rows that
        call the kernel would add a third compile)."""
        return num_tokens == 1 or not cpu_gemv.takes(num_tokens, self.model.embed_tokens.weight.dtype)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: CpuPagedAttention) -> torch.Tensor:
        """Final hidden states ``[T, hidden]``; ``ctx`` stores and attends for every layer."""
        _ACTIVE[0] = ctx
        try:
            # freezing (weights as constants, packed for oneDNN) is read when a graph compiles;
            # torch.compile's options= does not reach it, so it is patched around every call
            with inductor_config.patch(freezing=True):
                graph = self._one_token if input_ids.numel() == 1 else self._compiled
                return graph(input_ids, positions)
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
