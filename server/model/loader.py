"""Load a model (and its tokenizer) from a local Hugging Face folder, and save one.

Checkpoint naming: Nemotron-Labs Diffusion keeps the backbone under ``encoder.`` and the
untied output head as ``diffusion_head``; Llama/Mistral use ``model.`` and ``lm_head`` (or tied
embeddings). An optional PEFT adapter in ``linear_spec_lora/`` (LoRA on ``o_proj``) is loaded
as the draft-only adapter.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from server.model.config import ModelConfig
from server.model.model import DecoderModel, LoraDelta
from server.model.vision import vlm_checkpoint_name_to_param, vlm_param_to_checkpoint_name

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LORA_DIR = "linear_spec_lora"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir}")
    return files


def checkpoint_name_to_param(name: str, config: ModelConfig) -> str | None:
    """Map a checkpoint tensor name to our parameter name (None = ignore the tensor)."""
    if config.vision is not None:
        return vlm_checkpoint_name_to_param(name, config)
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if config.tie_word_embeddings and name in ("lm_head.weight", "diffusion_head.weight"):
        return None  # tied: some checkpoints still store a copy of the embeddings; transformers ignores it
    if config.is_diffusion:
        if name == "diffusion_head.weight":
            return "head.weight"
        if name.startswith("encoder."):
            return name[len("encoder.") :]
        return name  # unexpected: reported by the caller
    if name == "lm_head.weight":
        return "head.weight"
    if name.startswith("model."):
        return name[len("model.") :]
    return name


def param_to_checkpoint_name(param: str, config: ModelConfig) -> str:
    if config.vision is not None:
        return vlm_param_to_checkpoint_name(param, config)
    if param == "head.weight":
        return "diffusion_head.weight" if config.is_diffusion else "lm_head.weight"
    return config.weight_prefix + param


def load_model(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
) -> DecoderModel:
    """Build the model from ``config.json`` and fill it from the safetensors files.

    Raises ValueError naming missing or unexpected tensors, or tensors of the wrong shape."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_pretrained(model_dir)
    torch_dtype = parse_dtype(dtype) if dtype is not None else torch.float32
    with torch.device("meta"):
        model = DecoderModel(config)
    params = dict(model.named_parameters())
    expected = {k for k in params if not (k == "head.weight" and config.tie_word_embeddings)}
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    files = _checkpoint_files(model_dir)
    total_bytes = sum(path.stat().st_size for path in files)
    with tqdm(total=total_bytes, desc="loading weights", unit="B", unit_scale=True, disable=not progress) as bar:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    target = checkpoint_name_to_param(name, config)
                    if target is None:
                        continue
                    if target not in params:
                        unexpected.append(name)
                        continue
                    tensor = f.get_tensor(name)
                    loaded[target] = tensor
                    bar.update(tensor.numel() * tensor.element_size())
    missing = sorted(expected - loaded.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append("missing tensors: " + ", ".join(param_to_checkpoint_name(m, config) for m in missing[:20]))
        if unexpected:
            parts.append("unexpected tensors: " + ", ".join(sorted(unexpected)[:20]))
        raise ValueError(f"checkpoint in {model_dir} does not fit {config.architecture}: " + "; ".join(parts))
    for name, tensor in loaded.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(
                f"tensor {param_to_checkpoint_name(name, config)} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(params[name].shape)}"
            )
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in loaded:
                p.copy_(loaded[name].to(dtype=torch.float32))
        if config.tie_word_embeddings:
            model.head.weight = model.embed_tokens.weight
    model.rotary = type(model.rotary)(config.rope, config.head_dim).to(device)
    if (model_dir / LORA_DIR).is_dir():
        load_draft_lora(model, model_dir / LORA_DIR)
    return model.to(dtype=torch_dtype).eval()


def load_draft_lora(model: DecoderModel, adapter_dir: Path) -> None:
    """Attach a PEFT LoRA adapter on ``o_proj`` as the draft-only adapter of each layer."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    targets = cfg.get("target_modules") or ["o_proj"]
    if isinstance(targets, str):
        targets = [targets]
    if set(targets) - {"o_proj"}:
        raise ValueError(f"draft LoRA must target o_proj only, found target_modules={targets!r}")
    rank = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", rank))
    scale = alpha / rank**0.5 if cfg.get("use_rslora") else alpha / rank
    weights: dict[tuple[int, str], torch.Tensor] = {}
    pattern = re.compile(r"layers\.(\d+)\.self_attn\.o_proj\.(lora_[AB])(?:\.default)?\.weight$")
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for name in f.keys():
            m = pattern.search(name)
            if m is None:
                raise ValueError(f"unexpected tensor {name} in draft LoRA adapter")
            weights[(int(m.group(1)), m.group(2))] = f.get_tensor(name)
    device = model.embed_tokens.weight.device
    for i, layer in enumerate(model.layers):
        a, b = weights.get((i, "lora_A")), weights.get((i, "lora_B"))
        if a is None or b is None:
            continue
        attn = layer.self_attn
        delta = LoraDelta(attn.o_proj.in_features, attn.o_proj.out_features, rank, scale).to(device)
        with torch.no_grad():
            delta.lora_A.weight.copy_(a)
            delta.lora_B.weight.copy_(b)
        attn.draft_lora = delta
    logger.info("draft LoRA loaded from %s (rank %d, scale %.3g)", adapter_dir, rank, scale)


def save_checkpoint(model: DecoderModel, out_dir: str | Path, config_dict: dict[str, Any], dtype: torch.dtype | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` in the checkpoint's own naming scheme."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_dict(config_dict)
    tensors = {}
    for name, p in model.named_parameters():
        if name == "head.weight" and config.tie_word_embeddings:
            continue
        if ".draft_lora." in name:
            continue
        t = p.detach().cpu().contiguous()
        tensors[param_to_checkpoint_name(name, config)] = t.to(dtype) if dtype is not None else t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")


def load_tokenizer(model_dir: str | Path) -> Any:
    """The folder's tokenizer (with its chat template) through transformers."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
