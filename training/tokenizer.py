"""A byte-level BPE tokenizer for the default model, saved in Hugging Face format.

Fixed special-token ids (the model config refers to them):

====  ==================  =========================================
id    token               role
====  ==================  =========================================
0     ``<pad>``           padding
1     ``<s>``             BOS
2     ``</s>``            EOS (ends every assistant turn)
3     ``<mask>``          diffusion mask token (``mask_token_id``)
4     ``<|system|>``      chat: system turn marker
5     ``<|user|>``        chat: user turn marker
6     ``<|assistant|>``   chat: assistant turn marker
====  ==================  =========================================

The chat template is deliberately simple (the corpus is not chat data)::

    <s><|system|>SYSTEM\\n<|user|>USER\\n<|assistant|>ANSWER</s>...<|assistant|>

``format_chat`` is the same formatting in Python; training uses it to build synthetic chat
samples (the user gives the opening of a passage, the assistant continues it).

Usage: ``python -m training.tokenizer --corpus DIR --out DIR [--vocab-size 4096]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS, MASK = "<pad>", "<s>", "</s>", "<mask>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, MASK, SYSTEM, USER, ASSISTANT]
PAD_ID, BOS_ID, EOS_ID, MASK_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID = range(len(SPECIAL_TOKENS))
DEFAULT_VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 4096

CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content | trim }}"
    "{%- else -%}{%- for part in content -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}" + SYSTEM + "{{ text(message['content']) }}{{ '\\n' }}"
    "{%- elif message['role'] == 'user' -%}" + USER + "{{ text(message['content']) }}{{ '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT + "{{ text(message['content']) }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


def format_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat template in Python (string contents only); equal to ``apply_chat_template``."""
    out = [BOS]
    for m in messages:
        content = m["content"].strip()
        if m["role"] == "system":
            out.append(f"{SYSTEM}{content}\n")
        elif m["role"] == "user":
            out.append(f"{USER}{content}\n")
        elif m["role"] == "assistant":
            out.append(f"{ASSISTANT}{content}{EOS}")
    if add_generation_prompt:
        out.append(ASSISTANT)
    return "".join(out)


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with the special tokens at ids 0..6."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    return tok


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and
    special_tokens_map.json, loadable with ``transformers.AutoTokenizer.from_pretrained``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": s, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}
        for i, s in enumerate(SPECIAL_TOKENS)
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "mask_token": MASK,
        "unk_token": None,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT],
        "added_tokens_decoder": added,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "mask_token": MASK,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main(argv: list[str] | None = None) -> None:
    from training.corpus import build_corpus, read_jsonl

    ap = argparse.ArgumentParser(description="Train the default model's byte-level BPE tokenizer.")
    ap.add_argument("--corpus", default=None, help="corpus folder (default: build/reuse the cached corpus)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = ap.parse_args(argv)
    corpus = Path(args.corpus) if args.corpus else build_corpus()
    tok = train_bpe((d.text for d in read_jsonl(corpus / "train.jsonl")), args.vocab_size)
    save_hf_tokenizer(tok, args.out)
    print(json.dumps({"out": args.out, "vocab_size": tok.get_vocab_size()}))


if __name__ == "__main__":
    main()
