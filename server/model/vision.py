"""The vision side of a vision-language checkpoint: a Pixtral vision tower and a Mistral-3
multimodal projector, plus the checkpoint naming of both.

``VisionEncoder`` maps preprocessed images (``[C, H, W]``, sides multiples of
``patch_size * spatial_merge_size``) to one text-hidden-sized feature per image token,
row-major over the merged grid (``H / 28`` rows of ``W / 28``). Those features replace the
embeddings of the image placeholder tokens in the decoder (``DecoderModel.forward``'s
``image_features``). Several images run through the tower as one packed sequence; attention
never crosses images (each image attends within itself, as transformers' block mask does).

Parameter names follow transformers' modules (``PixtralVisionModel``,
``Mistral3MultiModalProjector``), so checkpoint tensors map by prefix only.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from kernels.reference import rotate_half_reference
from server.model.config import ModelConfig, VisionConfig
from server.model.layers import RMSNorm

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
VISION_RMS_EPS = 1e-5  # Pixtral's norms hard-code it


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q = rotate_half_reference(self.q_proj(x).view(n, self.num_heads, self.head_dim), cos, sin)
        k = rotate_half_reference(self.k_proj(x).view(n, self.num_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(n, self.num_heads, self.head_dim)
        outs = []
        # one dense attention per image: no [N, N] mask over the packed sequence
        # (4D inputs: with 3D ones PyTorch's CPU SDPA falls back to the slow math kernel)
        for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
            o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None])
            outs.append(o[0].transpose(0, 1))
        return self.o_proj(torch.cat(outs).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, VISION_RMS_EPS)
        self.attention = VisionAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, VISION_RMS_EPS)
        self.feed_forward = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, lengths)
        return x + self.feed_forward(self.ffn_norm(x))


class _VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))


class PixtralVisionTower(nn.Module):
    """Patch convolution, RMSNorm, then transformer layers with 2D (row, column) rotary."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_conv = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.ln_pre = RMSNorm(cfg.hidden_size, VISION_RMS_EPS)
        self.transformer = _VisionTransformer(cfg)

    def rope_tables(self, grids: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[N, head_dim]`` (fp32) for the packed patches of images with patch grids
        ``grids``. Axial 2D rope: rows rotate with the even frequencies, columns with the odd."""
        d = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        rows, cols = [], []
        for h, w in grids:
            r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            rows.append(r.flatten())
            cols.append(c.flatten())
        r, c = torch.cat(rows).float(), torch.cat(cols).float()
        half = torch.cat([r[:, None] * inv_freq[0::2], c[:, None] * inv_freq[1::2]], dim=-1)
        emb = torch.cat([half, half], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Packed patch features ``[N, hidden]`` (row-major per image) and each image's patch grid."""
        dtype = self.patch_conv.weight.dtype
        embeds, grids = [], []
        for image in images:
            e = self.patch_conv(image.to(dtype)[None])[0]  # [hidden, h, w]
            grids.append((e.shape[1], e.shape[2]))
            embeds.append(e.flatten(1).T)
        x = self.ln_pre(torch.cat(embeds))
        cos, sin = self.rope_tables(grids, x.device)
        lengths = [h * w for h, w in grids]
        num_layers = self.cfg.feature_layer % (self.cfg.num_layers + 1)  # -1: all layers
        for layer in self.transformer.layers[:num_layers]:
            x = layer(x, cos, sin, lengths)
        return x, grids


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.merge = cfg.spatial_merge_size
        self.merging_layer = nn.Linear(cfg.hidden_size * self.merge**2, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Concatenate each ``merge x merge`` block of patches (channel-major, as ``unfold``
        orders them) and project; the output is row-major over the merged grid."""
        d, out = x.shape[-1], []
        for feats, (h, w) in zip(x.split([h * w for h, w in grids]), grids):
            grid = feats.view(h, w, d).permute(2, 0, 1)[None]
            out.append(F.unfold(grid, kernel_size=self.merge, stride=self.merge)[0].T)
        return self.merging_layer(torch.cat(out))


class MultiModalProjector(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.text_rms_norm_eps)
        self.patch_merger = PatchMerger(cfg)
        self.linear_1 = nn.Linear(cfg.hidden_size, cfg.text_hidden_size, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(cfg.text_hidden_size, cfg.text_hidden_size, bias=cfg.projector_bias)
        self.act = activation(cfg.projector_act)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.patch_merger(self.norm(x), grids))))


class VisionEncoder(nn.Module):
    """Images -> image-token features for the decoder."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = PixtralVisionTower(cfg)
        self.projector = MultiModalProjector(cfg)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """``images``: ``[C, H, W]`` each, H and W multiples of ``cfg.token_pixels``. Returns
        per image ``[(H / t) * (W / t), text_hidden]`` features, t = ``cfg.token_pixels``."""
        t = self.cfg.token_pixels
        for image in images:
            assert image.shape[-2] % t == 0 and image.shape[-1] % t == 0, f"image sides must be multiples of {t}"
        x, grids = self.tower(images)
        feats = self.projector(x, grids)
        m = self.cfg.spatial_merge_size
        return list(feats.split([(h // m) * (w // m) for h, w in grids]))


# --------------------------------------------------------------------------- checkpoint naming

# (checkpoint prefix, our prefix), first match wins. Covers the NLD VLM layout (everything under
# ``encoder.``, the decoder under ``encoder.language_model.`` or directly under ``encoder.``) and
# both of transformers' Mistral-3 layouts (``language_model.model.`` and ``model.language_model.``).
_VLM_PREFIXES = (
    ("encoder.vision_tower.", "vision.tower."),
    ("encoder.multi_modal_projector.", "vision.projector."),
    ("encoder.language_model.", ""),
    ("model.vision_tower.", "vision.tower."),
    ("model.multi_modal_projector.", "vision.projector."),
    ("model.language_model.", ""),
    ("vision_tower.", "vision.tower."),
    ("multi_modal_projector.", "vision.projector."),
    ("language_model.model.", ""),
    ("encoder.", ""),
)
_VLM_HEADS = ("diffusion_head.weight", "lm_head.weight", "language_model.lm_head.weight")


def vlm_checkpoint_name_to_param(name: str, config: ModelConfig) -> str | None:
    """Map a VLM checkpoint tensor name to our parameter name (None = ignore the tensor)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name in _VLM_HEADS:
        return None if config.tie_word_embeddings else "head.weight"
    for prefix, ours in _VLM_PREFIXES:
        if name.startswith(prefix):
            return ours + name[len(prefix) :]
    return name  # unexpected: reported by the caller


def vlm_param_to_checkpoint_name(param: str, config: ModelConfig) -> str:
    """Our parameter name in the NLD VLM layout (diffusion checkpoints) or transformers'
    Mistral-3 layout (``Mistral3ForConditionalGeneration``, as ``save_pretrained`` writes it)."""
    nld = config.is_diffusion
    if param == "head.weight":
        return "diffusion_head.weight" if nld else "language_model.lm_head.weight"
    if param.startswith("vision.tower."):
        return ("encoder." if nld else "") + "vision_tower." + param[len("vision.tower.") :]
    if param.startswith("vision.projector."):
        return ("encoder." if nld else "") + "multi_modal_projector." + param[len("vision.projector.") :]
    return ("encoder.language_model." if nld else "language_model.model.") + param
