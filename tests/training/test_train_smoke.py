"""Training pipeline: sbd attention mask, tokenizer round trip, data helpers, R reader, and a
short end-to-end training run on built-in text (no downloads)."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch

from server.model.config import ModelConfig
from server.model.model import DecoderModel, DenseAttention
from server.model.tiny import tiny_nld_config
from tests.fixtures.tiny_models import random_model
from training.corpus import Document, split_heldout
from training.data import BatchSampler, build_token_data, make_chat_samples
from training.objective import add_noise, causal_mask, joint_loss, sbd_block_diff_mask
from training.rdata import read_lazyload_db
from training.tokenizer import (ASSISTANT_ID, BOS_ID, EOS_ID, MASK_ID, PAD_ID, SPECIAL_TOKENS, SYSTEM_ID, USER_ID,
                                format_chat, save_hf_tokenizer, train_bpe)

# An original passage (written for these tests), long enough for a small BPE and a few
# hundred training tokens.
BUILTIN_TEXT = """The river ran slowly past the old mill, and the miller's daughter sat upon the bank.
She watched the water turn the wheel, and she counted the boats that went down to the town.

"Good morning," said the boatman, lifting his hat. "The wind is fair and the day is long."
"Good morning to you," said she. "Will you carry a letter to my brother in the town?"

The boatman took the letter and put it in his coat. Then he pushed his boat from the bank,
and the river carried him away between the green fields and the tall trees.

In the evening the miller came home from the market. He had sold his flour for a good price,
and he brought a ribbon for his daughter and a new pipe for himself.

"The boatman carried my letter," said the daughter. "My brother will read it tomorrow."
"Then he will come home on Sunday," said the miller, "and we shall all be merry together."

On Sunday the brother came home along the river road. He walked quickly, for he was glad,
and he sang a song about the mill, the wheel, the water and the boats that go down to the town.
"""


def _docs() -> list[Document]:
    paras = [p for p in BUILTIN_TEXT.split("\n\n") if p.strip()]
    return [Document("builtin", f"part {i}", "\n\n".join(paras[i : i + 3])) for i in range(0, len(paras), 3)]


# ----------------------------------------------------------------------------- sbd mask


def test_sbd_block_diff_mask_pairs() -> None:
    """L = 4, block 2; rows/cols 0-3 noisy (blocks 0,0,1,1), 4-7 clean. Every pair explicit."""
    expected = torch.tensor(
        [
            # noisy 0..3    clean 0..3
            [1, 1, 0, 0, 0, 0, 0, 0],  # noisy 0 (block 0): own block only
            [1, 1, 0, 0, 0, 0, 0, 0],  # noisy 1 (block 0)
            [0, 0, 1, 1, 1, 1, 0, 0],  # noisy 2 (block 1): own block + clean of block 0
            [0, 0, 1, 1, 1, 1, 0, 0],  # noisy 3 (block 1)
            [0, 0, 0, 0, 1, 0, 0, 0],  # clean 0: causal
            [0, 0, 0, 0, 1, 1, 0, 0],  # clean 1
            [0, 0, 0, 0, 1, 1, 1, 0],  # clean 2
            [0, 0, 0, 0, 1, 1, 1, 1],  # clean 3
        ],
        dtype=torch.bool,
    )
    assert torch.equal(sbd_block_diff_mask(4, 2), expected)


@pytest.mark.parametrize("seq_len,block", [(8, 4), (12, 4), (16, 8), (32, 32), (32, 1)])
def test_sbd_block_diff_mask_rule(seq_len: int, block: int) -> None:
    mask = sbd_block_diff_mask(seq_len, block)
    assert mask.shape == (2 * seq_len, 2 * seq_len)
    for i in range(2 * seq_len):
        for j in range(2 * seq_len):
            qi_noisy, kj_noisy = i < seq_len, j < seq_len
            pi, pj = i % seq_len, j % seq_len
            if qi_noisy and kj_noisy:
                want = pi // block == pj // block
            elif qi_noisy:
                want = pj // block < pi // block
            elif kj_noisy:
                want = False
            else:
                want = pj <= pi
            assert bool(mask[i, j]) == want, (i, j)


def test_model_respects_sbd_mask() -> None:
    """Clean-stream states equal a plain causal forward; a noisy block depends on clean tokens
    of earlier blocks only, and on its own block."""
    torch.manual_seed(0)
    cfg = tiny_nld_config(vocab_size=64, mask_token_id=3, block_size=4)
    model = random_model(cfg, seed=1)
    seq_len, block = 12, 4
    x0 = torch.randint(4, 64, (2, seq_len))
    noised = add_noise(x0, block, 3, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq_len)
    positions = torch.cat([pos, pos]).expand(2, -1)

    def run(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        return model(torch.cat([noisy, clean], 1), positions, DenseAttention(sbd_block_diff_mask(seq_len, block)))

    with torch.no_grad():
        h = run(x0, noised.noisy)
        causal = model(x0, pos.expand(2, -1), DenseAttention(causal_mask(seq_len)))
        torch.testing.assert_close(h[:, seq_len:], causal, rtol=1e-5, atol=1e-5)
        x_changed = x0.clone()
        x_changed[:, 5] = (x_changed[:, 5] + 1) % 60 + 4  # a clean token of block 1
        h2 = run(x_changed, noised.noisy)
        torch.testing.assert_close(h2[:, :8], h[:, :8])  # noisy blocks 0 and 1 unaffected
        assert not torch.allclose(h2[:, 8:12], h[:, 8:12])  # noisy block 2 sees it
        noisy_changed = noised.noisy.clone()
        noisy_changed[:, 1] = 3 if int(noisy_changed[0, 1]) != 3 else 5
        h3 = run(x0, noisy_changed)
        torch.testing.assert_close(h3[:, 4:], h[:, 4:])  # nothing outside noisy block 0 sees it
        assert not torch.allclose(h3[:, :4], h[:, :4])


def test_noise_and_loss_terms() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(4, 64, (4, 32))
    noised = add_noise(x0, 8, MASK_ID, eps=0.05, generator=gen)
    assert torch.equal(noised.noisy[noised.masked], torch.full_like(noised.noisy[noised.masked], MASK_ID))
    assert torch.equal(noised.noisy[~noised.masked], x0[~noised.masked])
    p = noised.p_mask.view(4, 4, 8)
    assert torch.all(p == p[..., :1]) and torch.all((p >= 0.05) & (p <= 1))  # one ratio per block
    model = random_model(tiny_nld_config(vocab_size=64, mask_token_id=MASK_ID), seed=0)
    out = joint_loss(model, x0, 8, MASK_ID, noised=noised)
    assert out.num_masked == int(noised.masked.sum())
    torch.testing.assert_close(out.loss, out.ar_loss + 0.3 * out.diffusion_loss)


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = train_bpe([BUILTIN_TEXT] * 3, vocab_size=320)
    return save_hf_tokenizer(tok, tmp_path_factory.mktemp("tok"))


def test_tokenizer_special_ids_and_round_trip(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (PAD_ID, BOS_ID, EOS_ID, MASK_ID)
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert len(tok) == 320
    for text in (BUILTIN_TEXT, "Zebra quartz, café — naïve façade!\n\n\tTabs  and   spaces 123", "日本語 🙂"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.encode("<|user|>hi", add_special_tokens=False)[0] == USER_ID


def test_chat_template_matches_format_chat(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The river ran slowly past the old mill,"},
        {"role": "assistant", "content": "and the miller's daughter sat upon the bank."},
        {"role": "user", "content": "Go on."},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == format_chat(messages, add_generation_prompt=True)
    assert text == ("<s><|system|>Be brief.\n<|user|>The river ran slowly past the old mill,\n"
                    "<|assistant|>and the miller's daughter sat upon the bank.</s><|user|>Go on.\n<|assistant|>")
    ids = tok.apply_chat_template(messages[1:2], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == BOS_ID and ids[1] == USER_ID and ids[-1] == ASSISTANT_ID
    parts = [{"role": "user", "content": [{"type": "text", "text": "Go on."}]}]
    assert tok.apply_chat_template(parts, tokenize=False) == "<s><|user|>Go on.\n"
    assert SYSTEM_ID == 4


# ----------------------------------------------------------------------------- data


def test_chat_samples_and_batches(tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer

    docs = _docs()
    samples = make_chat_samples(docs, 20, seed=0)
    assert len(samples) == 20
    for s in samples:
        assert s.startswith("<s><|user|>") or s.startswith("<s><|system|>")
        assert "\n<|assistant|>" in s and s.endswith("</s>")
    assert make_chat_samples(docs, 5, seed=3) == make_chat_samples(docs, 5, seed=3)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    data = build_token_data(tok, docs, docs[:1], chat_fraction=0.3, seed=0)
    assert data.train[0] == BOS_ID and data.train[-1] == EOS_ID
    assert all(data.chat[s] == BOS_ID for s in data.chat_starts)
    sampler = BatchSampler(data, seq_len=16, chat_prob=0.5, seed=0)
    state = sampler.state()
    batch = sampler.sample(8)
    assert batch.shape == (8, 16) and batch.dtype == torch.int64
    sampler.set_state(state)
    assert torch.equal(sampler.sample(8), batch)


def test_heldout_split_is_deterministic_and_disjoint() -> None:
    text = "\n\n".join(f"Paragraph {i}. " + "word " * 60 for i in range(400))
    docs = [Document("s", "doc", text)]
    train, heldout = split_heldout(docs, 0.1)
    train2, heldout2 = split_heldout(docs, 0.1)
    assert [d.text for d in heldout] == [d.text for d in heldout2] and heldout
    held_paras = {p for d in heldout for p in d.text.split("\n\n")}
    train_paras = {p for d in train for p in d.text.split("\n\n")}
    assert not held_paras & train_paras
    assert len(held_paras) + len(train_paras) == 400


# ----------------------------------------------------------------------------- R reader


def _xdr_strsxp(values: list[str | None]) -> bytes:
    out = struct.pack(">ii", 16, len(values))
    for v in values:
        if v is None:
            out += struct.pack(">ii", 9, -1)
        else:
            raw = v.encode()
            out += struct.pack(">ii", 9 | (1 << 15), len(raw)) + raw  # CHARSXP with UTF-8 flag
    return out


def _serialized(item: bytes) -> bytes:
    return b"X\n" + struct.pack(">iii", 3, 0x040200, 0x030500) + struct.pack(">i", 5) + b"UTF-8" + item


def test_r_lazyload_reader(tmp_path: Path) -> None:
    lines = ["EMMA", "", "By Jane Austen", None, "caf\u00e9"]
    blob_payload = _serialized(_xdr_strsxp(lines))
    blob = struct.pack(">I", len(blob_payload)) + zlib.compress(blob_payload)
    (tmp_path / "Rdata.rdb").write_bytes(blob)

    def intvec(vals: list[int]) -> bytes:
        return struct.pack(">ii", 13, len(vals)) + struct.pack(f">{len(vals)}i", *vals)

    def names_attr(names: list[str]) -> bytes:
        # pairlist (with tag) of one attribute "names", then NILVALUE
        sym = struct.pack(">i", 1) + struct.pack(">ii", 9, 5) + b"names"
        return struct.pack(">i", 2 | (1 << 10)) + sym + _xdr_strsxp(names) + struct.pack(">i", 254)

    variables = struct.pack(">ii", 19 | (1 << 9), 1) + intvec([0, len(blob)]) + names_attr(["emma"])
    index = struct.pack(">ii", 19 | (1 << 9), 1) + variables
    # the second "names" attribute reuses the symbol through a reference (REFSXP, index 1)
    index += struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 255 | (1 << 8)) + _xdr_strsxp(["variables"])
    index += struct.pack(">i", 254)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialized(index)))
    db = read_lazyload_db(tmp_path / "Rdata")
    assert list(db) == ["emma"]
    assert db["emma"].value == lines


# ----------------------------------------------------------------------------- training


def _write_corpus(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    docs = _docs()
    with open(path / "train.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"source": d.source, "title": d.title, "text": d.text}) + "\n")
    with open(path / "heldout.jsonl", "w") as f:
        f.write(json.dumps({"source": "builtin", "title": "heldout", "text": BUILTIN_TEXT}) + "\n")
    return path


def _args(out: Path, corpus: Path, *extra: str):  # type: ignore[no-untyped-def]
    from training.train import parse_args

    return parse_args([
        "--out", str(out), "--corpus", str(corpus), "--preset", "tiny", "--vocab-size", "320",
        "--seq-len", "32", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "5",
        "--log-every", "5", "--eval-every", "20", "--eval-windows", "8", "--block-sizes", "4", "8", "16", "32",
        "--ckpt-minutes", "100", *extra,
    ])


def test_training_smoke_loss_falls_and_checkpoint_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from server.model.loader import load_model, load_tokenizer
    from training.train import train

    torch.manual_seed(0)
    corpus = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    summary = train(_args(out, corpus, "--max-steps", "60"))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert train_rows[-1]["step"] == 60 and evals and evals[-1].get("final")
    first, last = train_rows[0], train_rows[-1]
    assert last["ar_loss"] < first["ar_loss"] - 1.0
    assert last["masked_ce"] < first["masked_ce"] - 0.5
    assert evals[-1]["ar_ce"] < evals[0]["ar_ce"] or len(evals) == 1
    assert summary["final_eval"]["ar_ppl"] < 320 / 2
    assert (out / "loss.png").stat().st_size > 0

    final = out / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["architectures"] == ["NemotronLabsDiffusionModel"]
    assert (cfg["mask_token_id"], cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (MASK_ID, BOS_ID, EOS_ID, PAD_ID)
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["block_size"] == 32
    gen = json.loads((final / "generation_config.json").read_text())
    assert gen["eos_token_id"] == EOS_ID and gen["max_new_tokens"] > 0
    model = load_model(final, progress=False)
    from safetensors import safe_open

    with safe_open(str(final / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert "diffusion_head.weight" in set(f.keys())
    tok = load_tokenizer(final)
    ids = tok.apply_chat_template([{"role": "user", "content": "The river"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model.compute_logits(model(x, torch.arange(len(ids))[None], DenseAttention(causal_mask(len(ids)))))
    assert torch.isfinite(logits).all() and logits.shape == (1, len(ids), cfg["vocab_size"])
    # the shipped bf16 weights evaluate close to the trained fp32 weights
    assert abs(summary["final_eval_bf16_weights"]["ar_ce"] - summary["final_eval"]["ar_ce"]) < 0.1

    from training.evaluate import main as evaluate_main

    capsys.readouterr()
    evaluate_main([str(final), "--data", str(out / "data.npz"), "--seq-len", "32", "--windows", "4",
                   "--block-sizes", "4", "32"])
    report = json.loads(capsys.readouterr().out)
    assert report["ar_ce"] == pytest.approx(summary["final_eval_bf16_weights"]["ar_ce"], abs=0.5)
    assert set(report["diffusion_by_block"]) == {"4", "32"}


def test_training_resume_continues(tmp_path: Path) -> None:
    from training.train import train

    corpus = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    train(_args(out, corpus, "--max-steps", "10"))
    ckpt = torch.load(out / "ckpt" / "last.pt", weights_only=False)
    assert ckpt["step"] == 10 and ckpt["optimizer"]["state"]
    summary = train(_args(out, corpus, "--max-steps", "15", "--resume"))
    assert summary["steps"] == 15
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [5, 10, 15]


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    """Stopping and resuming (model, optimizer, data and noise RNG states) reproduces the
    uninterrupted run exactly."""
    from training.train import train

    corpus = _write_corpus(tmp_path / "corpus")
    straight = train(_args(tmp_path / "a", corpus, "--max-steps", "12", "--no-full-final-eval"))
    stopped = train(_args(tmp_path / "b", corpus, "--max-steps", "12", "--stop-at-step", "6", "--no-full-final-eval"))
    assert stopped["stopped"] and not (tmp_path / "b" / "final").exists()
    resumed = train(_args(tmp_path / "b", corpus, "--max-steps", "12", "--resume", "--no-full-final-eval"))
    assert resumed["final_eval"]["ar_ce"] == pytest.approx(straight["final_eval"]["ar_ce"], rel=1e-6)


def test_decoder_model_shapes_for_presets() -> None:
    from training.train import PRESETS, model_config

    for name in PRESETS:
        cfg = model_config(name, 4096)
        config = ModelConfig.from_dict(cfg)
        assert config.is_diffusion and config.mask_token_id == MASK_ID and config.head_dim * config.num_heads >= 64
        with torch.device("meta"):
            n = sum(p.numel() for p in DecoderModel(config).parameters())
        assert 2 * n <= 25 * 1000 * 1000  # bf16 size budget of the shipped model
