"""The decoder: a Ministral-3 / Llama-style dense transformer with one output head.

For Nemotron-Labs Diffusion checkpoints the head is the untied ``diffusion_head``; it gives
causal next-token logits under causal attention and unshifted masked-token logits under
bidirectional attention. The attention pattern is entirely the ``AttentionContext``'s
business, so the same module serves the paged engine, training and the dense test reference.

Shapes: tokens may be flat ``[T]`` (the engine's ragged batch) or batched ``[B, T]``
(training); ``positions`` has the same shape as ``input_ids``.

Vision-language checkpoints also carry ``vision`` (``server.model.vision.VisionEncoder``);
its features replace the embeddings of image placeholder rows (``ImageFeatures``).
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple, Protocol

import torch
from torch import nn

from kernels import cpu_ops
from kernels import ops as kernel_ops
from server.model.config import ModelConfig
from server.model.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary, llama4_query_scale
from server.model.vision import VisionEncoder


class RopeTables(NamedTuple):
    """Rotary tables for one forward: query tables include the Llama-4 query scale."""

    cos_q: torch.Tensor
    sin_q: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


class ImageFeatures(NamedTuple):
    """Embedding overrides: flat row ``rows[i]`` of the token embeddings becomes ``features[i]``."""

    rows: torch.Tensor  # [N] int64, indices into the flattened token list
    features: torch.Tensor  # [N, hidden]


class AttentionContext(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [..., T, Hq, D] (RoPE and query scaling applied), k/v: [..., T, Hkv, D].
        Returns [..., T, Hq, D]. May also store k/v in a cache."""


class DenseAttention:
    """Dense attention with an explicit boolean mask ``allowed[..., Tq, Tk]`` (True = may attend)
    over the same token list (no cache). Used by training and by test references."""

    def __init__(self, allowed: torch.Tensor) -> None:
        self.allowed = allowed

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[-2] // k.shape[-2]
        qh = q.transpose(-3, -2)  # [..., H, T, D]
        kh = k.repeat_interleave(groups, dim=-2).transpose(-3, -2)
        vh = v.repeat_interleave(groups, dim=-2).transpose(-3, -2)
        mask = self.allowed.unsqueeze(-3)  # broadcast over heads
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        return out.transpose(-3, -2)


class LoraDelta(nn.Module):
    """A low-rank update ``scale * B(A(x))`` added to a projection's output on selected rows."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scale


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.draft_lora: LoraDelta | None = None  # applied only on draft rows (self-speculation)
        self.qkv_proj: nn.Linear | None = None  # set by fuse_projections() (inference on GPU)
        # set by DecoderModel.prepack_cpu_weights(): reordered copies of the qkv and o weights
        self.packed: tuple[cpu_ops.PackedWeight, cpu_ops.PackedWeight] | None = None

    def fuse_projections(self) -> None:
        """Replace q/k/v by one fused projection (same math, one GEMM instead of three)."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], dim=0)
        self.qkv_proj = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        self.qkv_proj.weight = nn.Parameter(w.detach(), requires_grad=False)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, rope: "RopeTables", ctx: AttentionContext, lora_rows: torch.Tensor | None) -> torch.Tensor:
        if self.qkv_proj is not None:
            return self.forward_fused(x, rope, ctx, lora_rows, kernel_ops)
        lead = x.shape[:-1]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(*lead, hq, d)
        k = self.k_proj(x).view(*lead, hkv, d)
        v = self.v_proj(x).view(*lead, hkv, d)
        q, k = apply_rotary(q, rope.cos_q, rope.sin_q), apply_rotary(k, rope.cos, rope.sin)
        return self._output(ctx.attend(self.layer, q, k, v), lora_rows)

    def forward_fused(self, x: torch.Tensor, rope: "RopeTables", ctx: AttentionContext, lora_rows: torch.Tensor | None,
                      ops: ModuleType) -> torch.Tensor:
        """After ``fuse_projections``: one QKV GEMM, q and k rotated by ``ops.rotary_qk`` (one
        kernel on the GPU), read from strided views of the GEMM's output."""
        assert self.qkv_proj is not None
        lead = x.shape[:-1]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        packed = self.packed or (None, None)
        qkv = ops.linear(x, self.qkv_proj.weight, packed[0])
        q = qkv[..., : hq * d].view(*lead, hq, d)
        k = qkv[..., hq * d : (hq + hkv) * d].view(*lead, hkv, d)
        v = qkv[..., (hq + hkv) * d :].view(*lead, hkv, d)
        q, k = ops.rotary_qk(q, k, rope.cos_q, rope.sin_q, rope.cos, rope.sin)
        return self._output(ctx.attend(self.layer, q, k, v), lora_rows, ops, packed[1])

    def _output(self, attn: torch.Tensor, lora_rows: torch.Tensor | None, ops: ModuleType | None = None,
                packed_o: cpu_ops.PackedWeight | None = None) -> torch.Tensor:
        """o_proj (through ``ops.linear`` on the fused path) and the draft adapter on its rows."""
        attn = attn.reshape(*attn.shape[:-2], self.num_heads * self.head_dim)
        out = self.o_proj(attn) if ops is None else ops.linear(attn, self.o_proj.weight, packed_o)
        if self.draft_lora is not None and lora_rows is not None:
            out = out + self.draft_lora(attn) * lora_rows[..., None].to(out.dtype)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, rope, ctx, lora_rows):  # type: ignore[no-untyped-def]
        x = x + self.self_attn(self.input_layernorm(x), rope, ctx, lora_rows)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, x, residual, rope, ctx, lora_rows, ops):  # type: ignore[no-untyped-def]
        """The fused-kernel form of ``forward``: the hidden state is carried as ``x + residual``
        (``residual`` None: just ``x``) and each residual add is fused into the next RMSNorm;
        ``ops`` is ``kernels.ops.fused_ops(device)``. Returns ``(x, residual)`` of the layer
        output. Same math: the adds are the same fp additions (``a + b == b + a``), only the
        RMS reduction order may differ."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        h, residual = ops.rms_norm(x, norm1.weight, norm1.eps, residual)
        a = self.self_attn.forward_fused(h, rope, ctx, lora_rows, ops)
        h, residual = ops.rms_norm(a, norm2.weight, norm2.eps, residual)
        return self.mlp.forward_fused(h, ops), residual


class DecoderModel(nn.Module):
    """Embeddings, decoder layers, final norm and the output head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)
        self.vision = VisionEncoder(config.vision) if config.vision is not None else None
        # set by fuse_projections(): residual adds fused into the RMSNorm kernels
        self.fused_kernels = False
        self.packed_head: cpu_ops.PackedWeight | None = None  # set by prepack_cpu_weights()

    @property
    def has_draft_lora(self) -> bool:
        return any(layer.self_attn.draft_lora is not None for layer in self.layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: AttentionContext,
        lora_rows: torch.Tensor | None = None,
        image_features: ImageFeatures | None = None,
        ops: ModuleType | None = None,
    ) -> torch.Tensor:
        """Final hidden states (after the last norm), shape ``[..., T, hidden]``.
        ``lora_rows`` (bool, shaped like input_ids) selects rows that use the draft adapter;
        ``image_features`` replaces the embeddings of image placeholder rows; ``ops``
        overrides ``kernels.ops.fused_ops`` on the fused path (a compiled graph's own ops)."""
        rope = self.rope_tables(positions)
        x = self.embed_tokens(input_ids)
        if image_features is not None:
            flat = x.reshape(-1, x.shape[-1]).index_copy(0, image_features.rows, image_features.features.to(x.dtype))
            x = flat.view(x.shape)
        if self.fused_kernels:
            ops = ops or kernel_ops.fused_ops(x.device)
            residual = None
            for layer in self.layers:
                x, residual = layer.forward_fused(x, residual, rope, ctx, lora_rows, ops)
            return ops.rms_norm(x, self.norm.weight, self.norm.eps, residual)[0]
        for layer in self.layers:
            x = layer(x, rope, ctx, lora_rows)
        return self.norm(x)

    def rope_tables(self, positions: torch.Tensor) -> "RopeTables":
        """cos/sin at ``positions`` once per forward; the Llama-4 query scale (applied after
        RoPE, queries only) is folded into the query tables: rot(q)*s == q*(cos*s) + r(q)*(sin*s)."""
        cos, sin = self.rotary.cos_sin(positions.reshape(-1))
        cos = cos.view(*positions.shape, -1)
        sin = sin.view(*positions.shape, -1)
        beta = self.config.rope.llama_4_scaling_beta
        if not beta:
            return RopeTables(cos, sin, cos, sin)
        period = self.config.rope.original_max_position_embeddings or self.config.max_position_embeddings
        scale = llama4_query_scale(positions, float(beta), period)[..., None]
        return RopeTables(cos * scale, sin * scale, cos, sin)

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up weights for inference (one GEMM each) and switch to the
        fused elementwise kernels (``kernels.ops``: residual-add + RMSNorm, q/k rotary,
        silu * up). Irreversible; inference only (the kernels have no backward)."""
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        self.fused_kernels = True

    def prepack_cpu_weights(self, layers: bool = True) -> None:
        """After ``fuse_projections``, on the CPU: keep reordered copies (AMX tiles or oneDNN's
        blocked layout) of the projection (``layers=False``: none; a compiled decoder packs its
        own) and head weights where ``kernels.cpu_ops`` says they pay (bf16/fp16); the dense
        weights stay (training, the embedding a tied head shares). The same products, summed
        in another order."""
        assert self.fused_kernels, "fuse_projections() first"
        pack = cpu_ops.prepack_linear_weight
        for layer in self.layers if layers else ():
            attn, mlp = layer.self_attn, layer.mlp
            assert attn.qkv_proj is not None and mlp.gate_up_proj is not None
            qkv, o = pack(attn.qkv_proj.weight), pack(attn.o_proj.weight)
            attn.packed = (qkv, o) if qkv is not None and o is not None else None
            gu, down = pack(mlp.gate_up_proj.weight), pack(mlp.down_proj.weight)
            mlp.packed = (gu, down) if gu is not None and down is not None else None
        self.packed_head = pack(self.head.weight)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in fp32 for the given hidden rows."""
        if self.fused_kernels and hidden.device.type == "cpu":
            return cpu_ops.linear(hidden, self.head.weight, self.packed_head).float()
        return self.head(hidden).float()
