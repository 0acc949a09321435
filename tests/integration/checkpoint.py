"""A self-contained checkpoint folder for the integration tests: a random tiny NLD model and a
byte-level BPE tokenizer (trained here, in well under a second) with a chat template.

Nothing is downloaded and no trained model is needed. The folder is an ordinary Hugging
Face folder, so the real server loads it with ``python -m server --model DIR``.

The head rows of the special tokens (``<pad>``, ``<s>``, ``</s>``, ``<mask>``) are zeroed:
their logit is then 0 while the best of the other ~400 random logits is well above it, so
greedy decoding never ends early and never emits an invisible token. Every temperature-0
completion is therefore non-empty and runs to ``max_tokens`` (finish_reason ``length``),
which makes the assertions exact; ``stop`` is exercised with stop strings.

Run as a script to write a folder by hand: ``python -m tests.integration.checkpoint DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<mask>"]  # ids 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A diffusion language model denoises a block of masked tokens in parallel.",
    "Self speculation drafts several tokens and verifies them with one causal pass.",
    "Autoregressive decoding emits one token per forward pass.",
    "Hello there, how are you today? I am fine, thank you.",
    "Tell me a story about a small robot who learned to paint.",
    "What is the capital of France? Paris is the capital of France.",
    "Write a haiku about the sea and the moon and the stars.",
    "system user assistant: Be brief. Say something nice about blocks.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000, and punctuation: ; : ! ? ( ) [ ] { }",
]
PROMPTS = [
    "Tell me a story about",
    "The quick brown fox",
    "What is the capital of",
    "Write a haiku about the sea",
    "Hello there, how are",
    "A diffusion language model",
    "Numbers: 1 2 3",
    "Say something nice about blocks.",
]


def build_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE (``tokenizers``) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", mask_token="<mask>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write config.json + model.safetensors + tokenizer files into ``out_dir``."""
    import torch

    from server.model.loader import save_checkpoint
    from server.model.tiny import tiny_nld_config
    from tests.fixtures.tiny_models import random_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = tiny_nld_config(
        vocab_size=len(tok), mask_token_id=ids["<mask>"], eos_token_id=ids["</s>"], block_size=8,
    )
    cfg["bos_token_id"] = ids["<s>"]
    cfg["pad_token_id"] = ids["<pad>"]
    model = random_model(cfg, seed=seed)
    with torch.no_grad():
        for token_id in ids.values():
            model.head.weight[token_id].zero_()
    save_checkpoint(model, out, cfg)
    tok.save_pretrained(str(out))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]}) + "\n"
    )
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m tests.integration.checkpoint OUT_DIR", file=sys.stderr)
        sys.exit(2)
    print(write_checkpoint(sys.argv[1]))
