"""Checkpoint loading: shards, strict name/shape checking, architecture aliases, the
draft-only LoRA adapter in ``linear_spec_lora/``, and tied-embedding Llama checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.model.config import NLD_ARCHITECTURES
from server.model.loader import LORA_DIR, load_model
from server.model.model import DecoderModel, DenseAttention
from server.model.tiny import tiny_nld_config
from tests.fixtures.tiny_models import write_random_checkpoint
from tests.fixtures.hf_reference import causal_mask, prefix_bidirectional_mask

T = 12


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("base"), tiny_nld_config(), seed=2)


@pytest.fixture(scope="module")
def base_model(base_dir) -> DecoderModel:
    return load_model(base_dir, progress=False)


@pytest.fixture
def ckpt(base_dir, tmp_path) -> Path:
    """A writable copy of the base checkpoint."""
    out = tmp_path / "ckpt"
    shutil.copytree(base_dir, out)
    return out


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 300, (T,), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(T) + 20000


def _logits(model: DecoderModel, allowed: torch.Tensor | None = None, lora_rows=None, seed: int = 0) -> torch.Tensor:
    ids, pos = _inputs(seed)
    with torch.no_grad():
        hidden = model(ids, pos, DenseAttention(causal_mask(T) if allowed is None else allowed), lora_rows=lora_rows)
        return model.compute_logits(hidden)


def _edit_tensors(d: Path, fn) -> None:
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------- layout and names


def test_sharded_checkpoint_loads(ckpt, base_model):
    tensors = load_file(str(ckpt / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(ckpt / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    (ckpt / "model.safetensors").unlink()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    model = load_model(ckpt, progress=False)
    for (name, p), (_, q) in zip(model.state_dict().items(), base_model.state_dict().items()):
        assert torch.equal(p, q), name
    assert torch.equal(_logits(model), _logits(base_model))


def test_missing_tensor_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("encoder.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: encoder\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(ckpt, progress=False)


def test_missing_head_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("diffusion_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: diffusion_head\.weight"):
        load_model(ckpt, progress=False)


def test_unexpected_tensor_is_named(ckpt):
    def add(t):
        t["encoder.layers.0.self_attn.q_norm.weight"] = torch.ones(16)

    _edit_tensors(ckpt, add)
    with pytest.raises(ValueError, match=r"unexpected tensors: encoder\.layers\.0\.self_attn\.q_norm\.weight"):
        load_model(ckpt, progress=False)


def test_llama_names_in_nld_checkpoint_are_rejected(ckpt):
    """An NLD config over Llama-named weights (model.* / lm_head) must not load silently."""

    def rename(t):
        for k in list(t):
            t[k.replace("encoder.", "model.").replace("diffusion_head", "lm_head")] = t.pop(k)

    _edit_tensors(ckpt, rename)
    with pytest.raises(ValueError, match=r"missing tensors: .*diffusion_head\.weight"):
        load_model(ckpt, progress=False)


def test_wrong_shape_is_named(ckpt):
    def reshape(t):
        t["encoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)

    _edit_tensors(ckpt, reshape)
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.self_attn\.k_proj\.weight has shape \(48, 64\), expected \(32, 64\)"):
        load_model(ckpt, progress=False)


def test_unsupported_architecture(ckpt):
    _edit_config(ckpt, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="unsupported architectures.*GPT2LMHeadModel"):
        load_model(ckpt, progress=False)


def test_missing_config_raises(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path, progress=False)


def test_no_weights_raises(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_model(ckpt, progress=False)


@pytest.mark.parametrize("arch", NLD_ARCHITECTURES)
def test_nld_architecture_aliases_load(ckpt, base_model, arch):
    _edit_config(ckpt, architectures=[arch])
    model = load_model(ckpt, progress=False)
    assert model.config.architecture == arch and model.config.is_diffusion
    assert model.config.mask_token_id == 300
    assert torch.equal(_logits(model), _logits(base_model))


def test_nld_default_mask_token_is_100(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["mask_token_id"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert load_model(ckpt, progress=False).config.mask_token_id == 100


def test_load_bfloat16(base_dir, base_model):
    model = load_model(base_dir, dtype="bfloat16", progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    logits = _logits(model)
    assert logits.dtype == torch.float32
    assert (logits.argmax(-1) == _logits(base_model).argmax(-1)).float().mean() >= 0.75


# ---------------------------------------------------------------------------- tied Llama heads


def _tiny_llama(tmp_path: Path, tied: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path))
    return tmp_path


def test_tied_llama_checkpoint_with_redundant_lm_head_loads(tmp_path):
    """Some tied checkpoints still store ``lm_head.weight`` (a copy of the embeddings);
    transformers loads them, so must we (the copy is ignored, the head stays tied)."""
    d = _tiny_llama(tmp_path, tied=True)

    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()

    _edit_tensors(d, add)
    model = load_model(d, progress=False)
    assert model.head.weight is model.embed_tokens.weight


def test_untied_llama_without_lm_head_is_rejected(tmp_path):
    d = _tiny_llama(tmp_path, tied=False)
    _edit_tensors(d, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: lm_head\.weight"):
        load_model(d, progress=False)


# ---------------------------------------------------------------------------- draft LoRA


RANK, ALPHA = 4, 8.0


def _write_lora(d: Path, num_layers: int = 2, *, use_rslora: bool = False, suffix: str = "", seed: int = 11, **cfg_over) -> dict:
    """A PEFT adapter on o_proj (as shipped in the instruct repos' ``linear_spec_lora/``).
    Returns {layer: (A [r, in], B [out, r])}."""
    gen = torch.Generator().manual_seed(seed)
    lora_dir = d / LORA_DIR
    lora_dir.mkdir()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": ["o_proj"],
        "bias": "none",
        "use_rslora": use_rslora,
        "inference_mode": True,
        "base_model_name_or_path": "tiny",
    }
    config.update(cfg_over)
    (lora_dir / "adapter_config.json").write_text(json.dumps(config))
    weights, tensors = {}, {}
    for i in range(num_layers):
        a = torch.randn(RANK, 64, generator=gen) * 0.5
        b = torch.randn(64, RANK, generator=gen) * 0.5
        weights[i] = (a, b)
        prefix = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        tensors[f"{prefix}.lora_A{suffix}.weight"] = a
        tensors[f"{prefix}.lora_B{suffix}.weight"] = b
    save_file(tensors, str(lora_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return weights


def _merged(base_dir: Path, tmp_path: Path, weights: dict, scale: float) -> DecoderModel:
    """The hand-computed reference: o_proj.weight + scale * B @ A folded into a plain checkpoint."""
    out = tmp_path / "merged"
    shutil.copytree(base_dir, out)

    def fold(t):
        for i, (a, b) in weights.items():
            name = f"encoder.layers.{i}.self_attn.o_proj.weight"
            t[name] = t[name] + scale * (b @ a)

    _edit_tensors(out, fold)
    return load_model(out, progress=False)


@pytest.mark.parametrize("variant", ["plain", "default_suffix", "rslora"])
def test_draft_lora_adds_exactly_the_low_rank_delta(ckpt, base_dir, base_model, tmp_path, variant):
    weights = _write_lora(ckpt, use_rslora=variant == "rslora", suffix=".default" if variant == "default_suffix" else "")
    scale = ALPHA / RANK**0.5 if variant == "rslora" else ALPHA / RANK
    model = load_model(ckpt, progress=False)
    assert model.has_draft_lora
    for layer in model.layers:
        assert layer.self_attn.draft_lora.scale == pytest.approx(scale)
    base = _logits(base_model)
    # off: bit-identical to the base model
    assert torch.equal(_logits(model), base)
    assert torch.equal(_logits(model, lora_rows=torch.zeros(T, dtype=torch.bool)), base)
    # on for every row: equals the model with scale * B @ A folded into each o_proj
    on = torch.ones(T, dtype=torch.bool)
    merged = _merged(base_dir, tmp_path, weights, scale)
    got = _logits(model, lora_rows=on)
    assert (got - _logits(merged)).abs().max().item() <= 1e-4
    assert (got - base).abs().max().item() > 1e-2  # the adapter really does something
    # same under the bidirectional draft pattern
    allowed = prefix_bidirectional_mask(4, T - 4)
    assert (_logits(model, allowed, on) - _logits(merged, allowed)).abs().max().item() <= 1e-4


def test_draft_lora_delta_in_one_layer(ckpt):
    """Layer 0's attention output changes by exactly scale * B(A(attn)) on the selected rows
    only (``attn`` = the o_proj input, which the adapter can't influence in layer 0)."""
    weights = _write_lora(ckpt, num_layers=1)
    model = load_model(ckpt, progress=False)
    assert model.layers[1].self_attn.draft_lora is None  # no weights for layer 1: left alone
    captured: list[dict] = []
    attn_mod = model.layers[0].self_attn
    h1 = attn_mod.o_proj.register_forward_hook(lambda m, inp, out: captured.append({"x": inp[0].detach()}))
    h2 = attn_mod.register_forward_hook(lambda m, inp, out: captured[-1].update(out=out.detach()))
    rows = torch.zeros(T, dtype=torch.bool)
    rows[-5:] = True
    try:
        _logits(model, lora_rows=None)
        _logits(model, lora_rows=rows)
    finally:
        h1.remove()
        h2.remove()
    plain, with_lora = captured
    torch.testing.assert_close(with_lora["x"], plain["x"], rtol=0, atol=0)
    a, b = weights[0]
    delta = (ALPHA / RANK) * plain["x"] @ a.T @ b.T
    torch.testing.assert_close(with_lora["out"], plain["out"] + delta * rows[:, None], rtol=0, atol=1e-5)
    assert torch.equal(with_lora["out"][~rows], plain["out"][~rows])
    assert delta[rows].abs().max() > 1e-2


def test_draft_lora_only_touches_selected_rows_and_later_ones(ckpt, base_model):
    _write_lora(ckpt)
    model = load_model(ckpt, progress=False)
    rows = torch.zeros(T, dtype=torch.bool)
    rows[8:] = True
    got, base = _logits(model, lora_rows=rows), _logits(base_model)
    assert torch.equal(got[:8], base[:8])  # causal: rows before the draft rows can't see it
    assert (got[8:] - base[8:]).abs().max() > 1e-2


def test_draft_lora_must_target_o_proj_only(ckpt):
    _write_lora(ckpt, target_modules=["q_proj", "o_proj"])
    with pytest.raises(ValueError, match="o_proj only"):
        load_model(ckpt, progress=False)


def test_draft_lora_with_bf16_model(ckpt, base_model):
    _write_lora(ckpt)
    model = load_model(ckpt, dtype=torch.bfloat16, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    _logits(model, lora_rows=torch.ones(T, dtype=torch.bool))  # runs without dtype errors
