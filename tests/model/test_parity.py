"""Numerical parity of our decoder with transformers' own modules (fp32).

* NLD: our ``DecoderModel`` vs transformers ``Ministral3Model`` + a linear ``diffusion_head``
  on a random tiny checkpoint with the released rope block (YaRN 16x over 16384, theta 1e6,
  mscale = mscale_all_dim = 1, Llama-4 query scaling beta 0.1), below and above 16384.
* RoPE: attention factor and inverse frequencies vs ``ROPE_INIT_FUNCTIONS``.
* Llama: our ``DecoderModel`` vs ``LlamaForCausalLM`` on tiny random checkpoints written by
  ``save_pretrained`` (tied / untied, default / llama3 rope) and on SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from server.model.config import ModelConfig
from server.model.layers import RotaryEmbedding, llama4_query_scale, rope_inverse_frequencies
from server.model.loader import load_model, load_tokenizer
from server.model.model import DecoderModel, DenseAttention
from server.model.tiny import tiny_nld_config
from tests.fixtures.tiny_models import write_random_checkpoint
from tests.fixtures.hf_reference import (
    HFNLDReference,
    additive_mask,
    block_diagonal,
    causal_mask,
    ministral3_config,
    prefix_bidirectional_mask,
)

ATOL_TINY = 1e-4
ORIG = 16384


def _ours(model: DecoderModel, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, lora_rows=None) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(ids, positions, DenseAttention(allowed), lora_rows=lora_rows))


def _no_mscale_config() -> dict:
    """A non-release YaRN config: no mscale/mscale_all_dim, so HF's attention factor is
    0.1*ln(16)+1 ~= 1.277 (exercises the cos/sin multiplier)."""
    cfg = tiny_nld_config()
    rp = dict(cfg["rope_parameters"])
    del rp["mscale"], rp["mscale_all_dim"]
    cfg["rope_parameters"] = rp
    return cfg


NLD_CONFIGS = {"released": tiny_nld_config, "no_mscale": _no_mscale_config}


@pytest.fixture(scope="module", params=sorted(NLD_CONFIGS))
def nld_pair(request, tmp_path_factory):
    cfg = NLD_CONFIGS[request.param]()
    d = write_random_checkpoint(tmp_path_factory.mktemp(f"nld_{request.param}"), cfg, seed=1)
    return request.param, load_model(d, progress=False), HFNLDReference(d)


# ---------------------------------------------------------------------------- NLD vs Ministral3


@pytest.mark.parametrize("start", [0, 1000, ORIG - 10, 20000, 3 * ORIG + 5, 200_000])
def test_nld_causal_logits_match_ministral3(nld_pair, start):
    name, ours, ref = nld_pair
    t = 24
    gen = torch.Generator().manual_seed(start)
    ids = torch.randint(0, ours.config.vocab_size, (t,), generator=gen)
    pos = torch.arange(t) + start
    scale = llama4_query_scale(pos, 0.1, ORIG)
    if start >= ORIG:
        # the Llama-4 query scale is really active here, so a missing/wrong scale would fail
        assert (scale > 1.05).all(), scale
    elif start + t <= ORIG:
        assert (scale == 1).all()
    else:  # the segment crosses 16384: scale jumps from 1 to 1+0.1*ln 2 inside it
        assert scale[0] == 1 and scale[-1] == pytest.approx(1 + 0.1 * math.log(2))
    got, want = _ours(ours, ids, pos, causal_mask(t)), ref.logits(ids, pos, causal_mask(t))
    assert want.abs().max() > 1.0  # peaked logits, not a degenerate model
    assert (got - want).abs().max().item() <= ATOL_TINY, (name, start)


@pytest.mark.parametrize("start", [5, 20000])
def test_nld_bidirectional_block_matches_ministral3(nld_pair, start):
    """Diffusion/draft pattern: causal prefix, last block fully visible to itself."""
    _, ours, ref = nld_pair
    prefix, block = 13, 8
    t = prefix + block
    ids = torch.randint(0, ours.config.vocab_size, (t,), generator=torch.Generator().manual_seed(7))
    ids[prefix + 2 :] = ours.config.mask_token_id
    pos = torch.arange(t) + start
    allowed = prefix_bidirectional_mask(prefix, block)
    got, want = _ours(ours, ids, pos, allowed), ref.logits(ids, pos, allowed)
    assert (got - want).abs().max().item() <= ATOL_TINY
    # and the mask matters: causal logits differ inside the block
    causal = ref.logits(ids, pos, causal_mask(t))
    assert (causal[prefix:] - want[prefix:]).abs().max() > 1e-2


def test_nld_packed_ragged_batch_matches_separate_runs(nld_pair):
    """The engine's flat layout: two sequences at unrelated absolute positions packed into one
    token list with a block-diagonal mask give the same logits as separate HF runs."""
    _, ours, ref = nld_pair
    gen = torch.Generator().manual_seed(3)
    a_ids, b_ids = torch.randint(0, 300, (11,), generator=gen), torch.randint(0, 300, (9,), generator=gen)
    a_pos, b_pos = torch.arange(11) + 7, torch.arange(9) + 20000
    b_mask = prefix_bidirectional_mask(1, 8)
    got = _ours(
        ours,
        torch.cat([a_ids, b_ids]),
        torch.cat([a_pos, b_pos]),
        block_diagonal(causal_mask(11), b_mask),
    )
    want = torch.cat([ref.logits(a_ids, a_pos, causal_mask(11)), ref.logits(b_ids, b_pos, b_mask)])
    assert (got - want).abs().max().item() <= ATOL_TINY


def test_nld_batched_shape_matches_flat(nld_pair):
    _, ours, _ = nld_pair
    t = 10
    ids = torch.randint(0, 300, (2, t), generator=torch.Generator().manual_seed(4))
    pos = torch.stack([torch.arange(t), torch.arange(t) + 20000])
    batched = _ours(ours, ids, pos, causal_mask(t).expand(2, t, t))
    for i in range(2):
        flat = _ours(ours, ids[i], pos[i], causal_mask(t))
        assert (batched[i] - flat).abs().max().item() <= 1e-5


def test_query_scale_is_exercised(nld_pair, tmp_path):
    """The same weights loaded WITHOUT llama_4_scaling_beta agree with HF below 16384 and
    disagree above, so the parity test above would catch a missing or wrong query scale."""
    name, _, ref = nld_pair
    cfg = NLD_CONFIGS[name]()
    d = write_random_checkpoint(tmp_path / "ckpt", cfg, seed=1)
    cfg["rope_parameters"] = {k: v for k, v in cfg["rope_parameters"].items() if k != "llama_4_scaling_beta"}
    (d / "config.json").write_text(json.dumps(cfg))
    unscaled = load_model(d, progress=False)
    ids = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(5))
    low, high = torch.arange(16), torch.arange(16) + 20000
    assert (_ours(unscaled, ids, low, causal_mask(16)) - ref.logits(ids, low, causal_mask(16))).abs().max() <= ATOL_TINY
    assert (_ours(unscaled, ids, high, causal_mask(16)) - ref.logits(ids, high, causal_mask(16))).abs().max() > 1e-3


def test_fused_projections_match(nld_pair):
    """fuse_projections() (q/k/v and gate/up in one GEMM each) keeps the logits."""
    _, ours, ref = nld_pair
    fused = copy.deepcopy(ours)
    fused.fuse_projections()
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(6))
    for start in (0, 20000):
        pos = torch.arange(20) + start
        got = _ours(fused, ids, pos, causal_mask(20))
        assert (got - ref.logits(ids, pos, causal_mask(20))).abs().max().item() <= ATOL_TINY


# ---------------------------------------------------------------------------- RoPE tables vs HF


def _yarn_params(**over) -> dict:
    rp = dict(tiny_nld_config()["rope_parameters"])
    rp.update(over)
    return {k: v for k, v in rp.items() if v is not None}


def _hf_rope(cfg: dict):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = ministral3_config(cfg)
    rope_type = config.rope_parameters["rope_type"]
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")


def _cfg_with_rope(rope_parameters: dict, head_dim: int = 16) -> dict:
    cfg = tiny_nld_config(head_dim=head_dim, hidden_size=4 * head_dim)
    cfg["rope_parameters"] = rope_parameters
    return cfg


def test_yarn_without_mscale_uses_log_factor():
    cfg = _cfg_with_rope(_yarn_params(mscale=None, mscale_all_dim=None))
    factor = ModelConfig.from_dict(cfg).rope.attention_factor
    assert factor == pytest.approx(0.1 * math.log(16) + 1)
    assert factor == pytest.approx(_hf_rope(cfg)[1])


def test_yarn_with_mscale_and_all_dim_is_one():
    cfg = _cfg_with_rope(_yarn_params())
    assert ModelConfig.from_dict(cfg).rope.attention_factor == 1.0
    assert _hf_rope(cfg)[1] == 1.0


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"mscale": None, "mscale_all_dim": None},
        {"mscale": 1.0, "mscale_all_dim": None},  # only one of them: HF falls back to get_mscale(factor)
        {"mscale": 0.707, "mscale_all_dim": 1.0},  # DeepSeek-style ratio
        {"attention_factor": 0.9},
        {"factor": 4.0, "original_max_position_embeddings": 4096, "rope_theta": 10000.0},
        {"beta_fast": 16.0, "beta_slow": 2.0},
        {"truncate": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "released",
)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_yarn_tables_match_hf(over, head_dim):
    cfg = _cfg_with_rope(_yarn_params(**over), head_dim)
    rope = ModelConfig.from_dict(cfg).rope
    hf_inv, hf_factor = _hf_rope(cfg)
    assert rope.attention_factor == pytest.approx(hf_factor, rel=1e-12)
    ours = rope_inverse_frequencies(rope, head_dim)
    assert ours.shape == hf_inv.shape
    torch.testing.assert_close(ours, hf_inv.float(), rtol=0, atol=0)


@pytest.mark.parametrize("no_mscale", [False, True])
def test_rotary_cos_sin_match_hf(no_mscale):
    from transformers.models.ministral3.modeling_ministral3 import Ministral3RotaryEmbedding

    cfg = _no_mscale_config() if no_mscale else tiny_nld_config()
    config = ModelConfig.from_dict(cfg)
    ours = RotaryEmbedding(config.rope, config.head_dim)
    hf = Ministral3RotaryEmbedding(ministral3_config(cfg))
    pos = torch.tensor([0, 1, 2, 100, 16383, 16384, 20000, 65536, 200_000, 262_143])
    cos, sin = ours.cos_sin(pos)
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), pos[None])
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=1e-6)
    assert cos.abs().max().item() == pytest.approx(config.rope.attention_factor, rel=1e-6)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
    ids=lambda r: r["rope_type"],
)
def test_other_rope_types_match_hf(rope_parameters):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head_dim = 64
    hf_config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=dict(rope_parameters))
    cfg = _cfg_with_rope(dict(rope_parameters), head_dim)
    rope = ModelConfig.from_dict(cfg).rope
    if rope_parameters["rope_type"] == "default":
        hf_inv, hf_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)
    else:
        hf_inv, hf_factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](hf_config, "cpu")
    torch.testing.assert_close(rope_inverse_frequencies(rope, head_dim), hf_inv.float(), rtol=1e-6, atol=0)
    assert rope.attention_factor == pytest.approx(hf_factor)


# ---------------------------------------------------------------------------- Llama vs LlamaForCausalLM


def _write_tiny_llama(out: Path, *, tied: bool, rope_parameters: dict | None = None, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger than HF's 0.02 init: peaked logits make mistakes visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / p.shape[-1] ** 0.5)
    model.save_pretrained(str(out))
    return out


LLAMA_VARIANTS = {
    "untied": dict(tied=False),
    "tied": dict(tied=True),
    "llama3_rope": dict(
        tied=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ),
}


def _hf_causal_logits(hf_model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = hf_model(
            input_ids=ids[None],
            position_ids=pos[None],
            attention_mask=additive_mask(causal_mask(len(ids))),
            use_cache=False,
        )
    return out.logits[0].float()


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_llama_matches_transformers(variant, tmp_path):
    from transformers import LlamaForCausalLM

    d = _write_tiny_llama(tmp_path, **LLAMA_VARIANTS[variant])
    ours = load_model(d, progress=False)
    assert ours.config.architecture == "LlamaForCausalLM"
    tied = LLAMA_VARIANTS[variant]["tied"]
    assert ours.config.tie_word_embeddings is tied
    assert (ours.head.weight is ours.embed_tokens.weight) is tied
    hf = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
    for start, t in [(0, 30), (1500, 17)]:
        ids = torch.randint(0, 256, (t,), generator=torch.Generator().manual_seed(start))
        pos = torch.arange(t) + start
        want = _hf_causal_logits(hf, ids, pos)
        assert want.abs().max() > 1.0
        got = _ours(ours, ids, pos, causal_mask(t))
        assert (got - want).abs().max().item() <= ATOL_TINY, (variant, start)


def test_smollm2_matches_transformers(smollm2_path, one_thread):
    from transformers import LlamaForCausalLM

    ours = load_model(smollm2_path, progress=False)
    tok = load_tokenizer(smollm2_path)
    assert ours.config.tie_word_embeddings and ours.head.weight is ours.embed_tokens.weight
    hf = LlamaForCausalLM.from_pretrained(str(smollm2_path), dtype=torch.float32, attn_implementation="eager").eval()
    prompts = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write a haiku about rain."}],
        [{"role": "user", "content": "List three prime numbers."}],
    ]
    seqs = []
    for messages in prompts:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
        assert text.endswith("<|im_start|>assistant\n") and tok.decode(ids) == text
        assert ids[0].item() == tok.convert_tokens_to_ids("<|im_start|>")
        seqs.append(ids)
    worst = 0.0
    for ids in seqs:
        pos = torch.arange(len(ids))
        want = _hf_causal_logits(hf, ids, pos)
        got = _ours(ours, ids, pos, causal_mask(len(ids)))
        worst = max(worst, (got - want).abs().max().item())
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert worst <= 1e-3, worst
    # the three prompts packed into one flat token list (the engine's layout) agree as well
    flat = torch.cat(seqs)
    flat_pos = torch.cat([torch.arange(len(s)) for s in seqs])
    packed = _ours(ours, flat, flat_pos, block_diagonal(*[causal_mask(len(s)) for s in seqs]))
    want = torch.cat([_hf_causal_logits(hf, s, torch.arange(len(s))) for s in seqs])
    assert (packed - want).abs().max().item() <= 1e-3
