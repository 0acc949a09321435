"""Greedy AR through our scheduler equals transformers' own ``generate``, token for token:
(a) a random-init checkpoint of the Nemotron-Labs Diffusion schema (transformers'
Ministral3 backbone with the diffusion head as its LM head), (b) SmolLM2-135M-Instruct.
Eight prompts of different lengths are decoded concurrently, with prefix caching on and off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from server.model.loader import load_model
from server.model.tiny import tiny_nld_config
from tests.fixtures.tiny_models import write_random_checkpoint

NEW_TOKENS = 12


def hf_greedy(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(y[0, len(ids) :].tolist())
    return outs


def ours_greedy(model_dir: Path, prompts: list[list[int]], prefix_caching: bool, page_size: int) -> list[list[int]]:
    engine = LLMEngine(
        load_model(model_dir),
        EngineConfig(
            model=str(model_dir),
            kv_cache_tokens=8192,
            max_model_len=1024,
            page_size=page_size,
            enable_prefix_caching=prefix_caching,
            max_num_batched_tokens=64,  # forces chunked prefill of the longer prompts
        ),
    )
    params = RequestParams(SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True), DecodeParams(mode="ar"))
    outs = [o["token_ids"] for o in engine.generate(prompts, params)]
    engine.check_integrity()
    assert engine.kv.num_free_pages == engine.kv.num_pages
    return outs


def prompts_for(vocab: int, shared: int = 40) -> list[list[int]]:
    """Eight prompts of different lengths; several share a long prefix (prefix-cache hits)."""
    g = torch.Generator().manual_seed(0)
    common = torch.randint(3, vocab - 20, (shared,), generator=g).tolist()
    out = []
    for i, n in enumerate([1, 3, 9, 17, 33, 50, 70, 100]):
        tail = torch.randint(3, vocab - 20, (n,), generator=g).tolist()
        out.append(common + tail if i % 2 else tail)
    return out


@pytest.fixture(scope="module")
def nld_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("nld"), tiny_nld_config(vocab_size=320), seed=7)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_nld_checkpoint_matches_transformers_generate(nld_checkpoint: Path, prefix_caching: bool) -> None:
    from tests.fixtures.hf_reference import ministral3_config
    from transformers import Ministral3ForCausalLM
    from safetensors.torch import load_file
    import json

    cfg = json.loads((nld_checkpoint / "config.json").read_text())
    hf = Ministral3ForCausalLM(ministral3_config(cfg)).eval()
    weights = load_file(str(nld_checkpoint / "model.safetensors"))
    state = {("lm_head.weight" if k == "diffusion_head.weight" else "model." + k[len("encoder.") :]): v for k, v in weights.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    prompts = prompts_for(cfg["vocab_size"])
    assert ours_greedy(nld_checkpoint, prompts, prefix_caching, page_size=16) == hf_greedy(hf, prompts, NEW_TOKENS)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_smollm2_matches_transformers_generate(smollm2_path: Path, prefix_caching: bool, one_thread: None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    system = "You are a helpful assistant who answers briefly and precisely. "
    texts = ["Hi", "What is 2+2?", "Name a color, please.", "Write a haiku about autumn leaves falling.",
             "Explain photosynthesis to a child in two sentences.", "List three animals that live in the sea.",
             "Why is the sky blue? Give the physical reason.", "Tell me a very short story about a robot."]
    prompts = [tok.encode(system + t if i % 2 else t) for i, t in enumerate(texts)]
    assert len({len(p) for p in prompts}) >= 6
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    assert ours_greedy(smollm2_path, prompts, prefix_caching, page_size=16) == hf_greedy(hf, prompts, NEW_TOKENS)
