"""Model configuration parsed from a Hugging Face ``config.json``.

Supported: the Nemotron-Labs Diffusion schema (tri-mode: AR, diffusion, self-speculation)
under its three architecture names, and plain Llama / Mistral causal LMs (AR only). Vision-
language checkpoints (the NLD VLM, tri-mode; transformers' Mistral-3, AR only) nest the
decoder's fields under ``text_config``; their vision tower and projector are described by
``VisionConfig``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NLD_ARCHITECTURES = ("NemotronLabsDiffusionModel", "MinistralDiffEncoderModel", "NemotronLabsDiffusionEncoderModel")
NLD_VLM_ARCHITECTURES = ("NemotronLabsDiffusionVLMModel",)
AR_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Ministral3ForCausalLM", "Mistral3ForConditionalGeneration")
SUPPORTED_ARCHITECTURES = NLD_ARCHITECTURES + NLD_VLM_ARCHITECTURES + AR_ARCHITECTURES


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings. ``attention_factor`` follows Hugging Face semantics:
    for YaRN with ``mscale`` and ``mscale_all_dim`` it is their get_mscale ratio (1.0 for the
    released NLD configs), not 0.1*ln(factor)+1."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True
    llama_4_scaling_beta: float | None = None  # query scale after RoPE: 1 + beta*ln(1 + floor(pos/orig))
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3


@dataclass(frozen=True)
class VisionConfig:
    """A Pixtral vision tower plus a Mistral-3 projector (RMSNorm, patch merge, linear, act,
    linear). ``image_token_id`` is the placeholder whose embeddings the image features replace;
    the row-break / end / start ids come from the config when it names them (else from the
    tokenizer, see ``server.model.image_processing.ImageTokens``)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    num_channels: int
    rope_theta: float
    hidden_act: str
    image_size: int  # longest side after resizing (px)
    spatial_merge_size: int
    feature_layer: int
    projector_act: str
    projector_bias: bool
    text_hidden_size: int
    text_rms_norm_eps: float
    image_token_id: int | None
    image_break_token_id: int | None = None
    image_end_token_id: int | None = None
    image_start_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def token_pixels(self) -> int:
        """Side in pixels of the square covered by one image token (patch x merge, 28 for Pixtral)."""
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], text: dict[str, Any]) -> "VisionConfig":
        vc = cfg["vision_config"]
        rope = vc.get("rope_parameters") or {}
        feature_layer = cfg.get("vision_feature_layer", -1)
        if not isinstance(feature_layer, int):
            raise ValueError(f"vision_feature_layer must be one integer, got {feature_layer!r}")
        image_token = cfg.get("image_token_id", cfg.get("image_token_index"))
        return cls(
            hidden_size=int(vc["hidden_size"]),
            intermediate_size=int(vc["intermediate_size"]),
            num_layers=int(vc["num_hidden_layers"]),
            num_heads=int(vc["num_attention_heads"]),
            patch_size=int(vc.get("patch_size", 14)),
            num_channels=int(vc.get("num_channels", 3)),
            rope_theta=float(rope.get("rope_theta", vc.get("rope_theta", 10000.0))),
            hidden_act=str(vc.get("hidden_act", "gelu")),
            image_size=int(vc.get("image_size", 1540)),
            spatial_merge_size=int(cfg.get("spatial_merge_size", 2)),
            feature_layer=feature_layer,
            projector_act=str(cfg.get("projector_hidden_act", "gelu")),
            projector_bias=bool(cfg.get("multimodal_projector_bias", False)),
            text_hidden_size=int(text["hidden_size"]),
            text_rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            image_token_id=int(image_token) if image_token is not None else None,
            image_break_token_id=_optional_int(cfg, "image_break_token_id"),
            image_end_token_id=_optional_int(cfg, "image_end_token_id"),
            image_start_token_id=_optional_int(cfg, "image_start_token_id"),
        )


def _optional_int(cfg: dict[str, Any], key: str) -> int | None:
    value = cfg.get(key)
    return int(value) if value is not None else None


def _text_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """A VLM config's decoder fields: ``text_config`` overlaid with the top-level keys that
    govern the whole model (the head tie, special tokens, the diffusion block and mask)."""
    if "text_config" not in cfg:
        return cfg
    merged = dict(cfg["text_config"])
    for key in ("tie_word_embeddings", "mask_token_id", "block_size", "bos_token_id", "eos_token_id",
                "pad_token_id", "torch_dtype", "dtype"):
        if cfg.get(key) is not None:
            merged[key] = cfg[key]
    return merged


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    mask_token_id: int | None = None
    block_size: int = 32
    torch_dtype: str = "float32"
    vision: VisionConfig | None = None  # set for vision-language checkpoints
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_diffusion(self) -> bool:
        """True when the checkpoint supports diffusion and self-speculation modes."""
        return self.architecture in NLD_ARCHITECTURES + NLD_VLM_ARCHITECTURES

    @property
    def weight_prefix(self) -> str:
        return "encoder." if self.is_diffusion else "model."

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architectures {archs!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        top = cfg
        cfg = _text_fields(top)
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        mask_id = cfg.get("mask_token_id")
        if arch in NLD_ARCHITECTURES + NLD_VLM_ARCHITECTURES and mask_id is None:
            mask_id = 100  # every reference engine falls back to 100
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope=_parse_rope(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=cfg.get("pad_token_id"),
            mask_token_id=mask_id,
            block_size=int(cfg.get("block_size", 32)),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            vision=VisionConfig.from_dict(top, cfg) if "vision_config" in top else None,
            raw=dict(top),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"no config.json in {model_dir}")
        return cls.from_dict(json.loads(path.read_text()))


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _parse_rope(cfg: dict[str, Any]) -> RopeConfig:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "yarn", "llama3", "linear"):
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    factor = float(params.get("factor") or 1.0)
    orig = params.get("original_max_position_embeddings")
    attention_factor = params.get("attention_factor")
    if rope_type == "yarn" and attention_factor is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_get_mscale(factor, mscale) / _yarn_get_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_get_mscale(factor)
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=factor,
        original_max_position_embeddings=int(orig) if orig is not None else None,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=float(attention_factor) if attention_factor is not None else 1.0,
        truncate=bool(params.get("truncate", True)),
        llama_4_scaling_beta=params.get("llama_4_scaling_beta"),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
    )
