"""The shipped default model (server/default_model/): schema, size, tokenizer, sanity of its text model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from server.model.model import DenseAttention
from training.objective import causal_mask
from training.tokenizer import ASSISTANT_ID, BOS_ID, EOS_ID, MASK_ID, PAD_ID, USER_ID

MODEL_DIR = Path(__file__).resolve().parents[2] / "server" / "default_model"
pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").is_file(), reason="no shipped default model")


def test_default_model_files_and_config() -> None:
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json"} <= names
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 25 * 1000 * 1000
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["NemotronLabsDiffusionModel"]
    assert (cfg["mask_token_id"], cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (MASK_ID, BOS_ID, EOS_ID, PAD_ID)
    assert cfg["rope_parameters"]["rope_type"] == "yarn"
    gen = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["bos_token_id"], gen["pad_token_id"]) == (EOS_ID, BOS_ID, PAD_ID)
    # decoding defaults chosen by benchmarks/decoding_sweep.py; config block_size is the diffusion block
    decoding = gen["nld_decoding"]
    assert cfg["block_size"] == decoding["diffusion"]["block_length"] in cfg["training_block_sizes"]
    assert 0.0 < decoding["diffusion"]["threshold"] <= 1.0
    assert decoding["self_spec"]["block_length"] == decoding["self_spec"]["draft_length"] + 1


def test_default_model_loads_and_predicts_english() -> None:
    from safetensors import safe_open

    from server.model.loader import load_model, load_tokenizer

    with safe_open(str(MODEL_DIR / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model = load_model(MODEL_DIR, progress=False)
    tok = load_tokenizer(MODEL_DIR)
    assert len(tok) == model.config.vocab_size
    ids = tok.apply_chat_template([{"role": "user", "content": "Good morning"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    assert ids[:2] == [BOS_ID, USER_ID] and ids[-1] == ASSISTANT_ID
    text = ("It was a fine morning in the country, and the young ladies walked out together to see "
            "their aunt, who lived in a small house near the church.")
    x = torch.tensor([[BOS_ID] + tok.encode(text, add_special_tokens=False)])
    n = x.shape[1]
    with torch.no_grad():
        logits = model.compute_logits(model(x, torch.arange(n)[None], DenseAttention(causal_mask(n))))
    ce = F.cross_entropy(logits[0, :-1], x[0, 1:]).item()
    assert ce < 4.5  # uniform over 4096 tokens would be 8.3 nats
