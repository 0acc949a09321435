"""A self-contained vision-language checkpoint folder for the live-server tests: the random
tiny Mistral-3 VLM of ``tests/fixtures/vlm.py`` in the NLD VLM layout (tri-mode), with the
integration tests' BPE tokenizer plus the Pixtral image tokens (``[IMG]``, ``[IMG_BREAK]``,
``[IMG_END]``). config.json names only the image token id; the row-break and end ids are
resolved from the tokenizer. Special-token head rows are zeroed (see checkpoint.py), so
greedy completions run to max_tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.fixtures.vlm import write_mistral3_checkpoint, write_nld_vlm_checkpoint
from tests.integration.checkpoint import SPECIAL_TOKENS, build_tokenizer

IMAGE_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
LONGEST_EDGE = 112  # px: images are resized to at most 4 x 4 tokens


def write_vlm_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    out = Path(out_dir)
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + IMAGE_TOKENS}
    m3_dir, _ = write_mistral3_checkpoint(
        out.parent / (out.name + "-m3"), seed=seed, longest_edge=LONGEST_EDGE, vocab_size=len(tok), image_token_id=ids["[IMG]"]
    )
    write_nld_vlm_checkpoint(
        m3_dir, out, mask_token_id=ids["<mask>"], eos_token_id=ids["</s>"], bos_token_id=ids["<s>"],
        pad_token_id=ids["<pad>"], image_break_token_id=None, image_end_token_id=None,
    )
    tensors = load_file(str(out / "model.safetensors"))
    head = tensors["diffusion_head.weight"]
    with torch.no_grad():
        for token_id in ids.values():
            head[token_id].zero_()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(str(out))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": ids["</s>"]}) + "\n")
    return out
