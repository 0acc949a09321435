"""Small configs of the real Nemotron-Labs Diffusion schema (training's tiny model; the tests'
random models are built from it in ``tests/fixtures/tiny_models.py``)."""

from __future__ import annotations

from typing import Any


def tiny_nld_config(
    vocab_size: int = 320,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    mask_token_id: int = 300,
    block_size: int = 8,
    eos_token_id: int = 2,
    max_position_embeddings: int = 262144,
) -> dict[str, Any]:
    """A config.json dict with the released rope settings (YaRN 16x over 16384, theta 1e6,
    llama_4_scaling_beta 0.1) and tiny shapes."""
    return {
        "architectures": ["NemotronLabsDiffusionModel"],
        "model_type": "nemotron_labs_diffusion",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate_size,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": max_position_embeddings,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 16.0,
            "original_max_position_embeddings": 16384,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
        "tie_word_embeddings": False,
        "mask_token_id": mask_token_id,
        "block_size": block_size,
        "bos_token_id": 1,
        "eos_token_id": eos_token_id,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
