"""Token streams for training: plain text and synthetic chat samples.

* plain stream: every corpus record as ``<s> text </s>``, concatenated; training windows
  start at random offsets.
* chat stream: synthetic chat samples ``<s><|user|>OPENING\\n<|assistant|>CONTINUATION</s>``
  (sometimes with a system turn), where OPENING is the first line(s)/sentence(s) of a passage
  and CONTINUATION is the text that follows it, cut at a line or sentence end. Windows start
  at sample starts, so the model learns to answer after ``<|assistant|>`` and to stop with EOS.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from training.corpus import Document, split_paragraphs
from training.tokenizer import BOS_ID, EOS_ID, format_chat

SYSTEM_PROMPTS = (
    "You continue passages of classic English literature.",
    "You are a helpful assistant.",
    "Continue the text in the same style.",
)
USER_PREFIXES = ("", "", "", "", "Continue: ", "Continue the passage:\n", "Go on:\n")
_BOUNDARY = re.compile(r"(?<=[.!?;:])[\"')\]]*(?=\s)|\n")


def encode_documents(tok: Tokenizer, docs: Sequence[Document]) -> np.ndarray:
    """``<s> text </s>`` for every record, concatenated (uint16; vocab must be < 65536)."""
    encodings = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
    parts = []
    for enc in encodings:
        parts.extend([[BOS_ID], enc.ids, [EOS_ID]])
    return np.fromiter((i for p in parts for i in p), dtype=np.uint16)


def _cut(text: str, target_chars: int) -> str:
    """A prefix of ``text`` of about ``target_chars`` ending at a line or sentence end."""
    if len(text) <= target_chars:
        return text
    best = None
    for m in _BOUNDARY.finditer(text):
        end = m.end()
        if end >= target_chars * 0.5:
            best = end
            if end >= target_chars:
                break
    if best is None or best > target_chars * 2:
        cut = text.rfind(" ", 0, target_chars)
        best = cut if cut > 0 else target_chars
    return text[:best]


def make_chat_samples(docs: Sequence[Document], num_samples: int, seed: int = 0) -> list[str]:
    """Synthetic chat transcripts built from passages of the corpus (see module docstring)."""
    rng = random.Random(seed)
    paragraph_lists, weights = [], []
    for d in docs:
        paras = split_paragraphs(d.text)
        if len(paras) < 2:  # fall back to lines for unparagraphed text
            paras = [line for line in d.text.splitlines() if line.strip()]
        if len(paras) >= 2:
            paragraph_lists.append(paras)
            weights.append(len(d.text))
    if not paragraph_lists:
        raise ValueError("no document has two or more paragraphs (or lines) to build chat samples from")
    samples: list[str] = []
    attempts = 0
    while len(samples) < num_samples:
        attempts += 1
        if attempts > 100 * num_samples + 1000:
            raise ValueError(f"could only build {len(samples)} of {num_samples} chat samples from this text")
        paras = rng.choices(paragraph_lists, weights=weights)[0]
        i = rng.randrange(len(paras) - 1)
        window = "\n\n".join(paras[i : i + 12])
        head = _cut(window, rng.choice((40, 80, 120, 200, 300)))
        opening, rest = head.strip(), window[len(head) :].lstrip()
        if len(opening) < 8 or len(rest) < 40:
            continue
        answer = _cut(rest, int(rng.uniform(80, 900))).strip()
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": rng.choice(USER_PREFIXES) + opening})
        messages.append({"role": "assistant", "content": answer})
        if rng.random() < 0.1:  # an occasional second turn
            j = rng.randrange(len(paras))
            follow_head = _cut(paras[j], rng.choice((40, 100)))
            follow = follow_head.strip()
            nxt = "\n\n".join(paras[j : j + 6])[len(follow_head) :].lstrip()
            if len(follow) >= 8 and len(nxt) >= 40:
                messages.append({"role": "user", "content": follow})
                messages.append({"role": "assistant", "content": _cut(nxt, int(rng.uniform(80, 500))).strip()})
        samples.append(format_chat(messages))
    return samples


def encode_chat(tok: Tokenizer, samples: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated chat token stream and the start offset of every sample."""
    encodings = tok.encode_batch(list(samples), add_special_tokens=False)
    starts, total = [], 0
    for enc in encodings:
        starts.append(total)
        total += len(enc.ids)
    stream = np.fromiter((i for enc in encodings for i in enc.ids), dtype=np.uint16, count=total)
    return stream, np.asarray(starts, dtype=np.int64)


@dataclass
class TokenData:
    train: np.ndarray
    chat: np.ndarray
    chat_starts: np.ndarray
    heldout: np.ndarray

    def save(self, path: str | Path) -> None:
        np.savez(path, train=self.train, chat=self.chat, chat_starts=self.chat_starts, heldout=self.heldout)

    @classmethod
    def load(cls, path: str | Path) -> "TokenData":
        z = np.load(path)
        return cls(z["train"], z["chat"], z["chat_starts"], z["heldout"])


def build_token_data(tok: Tokenizer, train_docs: Sequence[Document], heldout_docs: Sequence[Document],
                     chat_fraction: float = 0.2, seed: int = 0) -> TokenData:
    train = encode_documents(tok, train_docs)
    heldout = encode_documents(tok, heldout_docs)
    # size the chat stream to about chat_fraction of all training tokens
    probe = make_chat_samples(train_docs, 200, seed=seed + 1)
    per_sample = max(1.0, float(np.mean([len(e.ids) for e in tok.encode_batch(probe, add_special_tokens=False)])))
    want_tokens = chat_fraction / max(1e-6, 1 - chat_fraction) * len(train)
    num = max(8, int(want_tokens / per_sample))
    chat, starts = encode_chat(tok, make_chat_samples(train_docs, num, seed=seed))
    return TokenData(train, chat, starts, heldout)


class BatchSampler:
    """Random training windows of ``seq_len`` tokens; a ``chat_prob`` share of the rows come
    from the chat stream (starting at a sample start), the rest from the plain stream."""

    def __init__(self, data: TokenData, seq_len: int, chat_prob: float = 0.2, seed: int = 0) -> None:
        if len(data.train) <= seq_len:
            raise ValueError(f"training stream has {len(data.train)} tokens, need more than seq_len={seq_len}")
        self.data, self.seq_len, self.chat_prob = data, seq_len, chat_prob
        self.rng = np.random.default_rng(seed)
        self.chat_starts = data.chat_starts[data.chat_starts + seq_len <= len(data.chat)]
        if len(self.chat_starts) == 0:
            self.chat_prob = 0.0

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def sample(self, batch_size: int) -> torch.Tensor:
        rows = []
        for _ in range(batch_size):
            if self.rng.random() < self.chat_prob:
                s = int(self.chat_starts[self.rng.integers(len(self.chat_starts))])
                rows.append(self.data.chat[s : s + self.seq_len])
            else:
                s = int(self.rng.integers(len(self.data.train) - self.seq_len))
                rows.append(self.data.train[s : s + self.seq_len])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows covering the start of ``stream`` (deterministic), at most
    ``max_windows``; spread evenly over the stream when it holds more."""
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"held-out stream has {len(stream)} tokens, fewer than seq_len={seq_len}")
    idx = np.linspace(0, n - 1, num=min(n, max_windows)).round().astype(np.int64)
    rows = [stream[i * seq_len : (i + 1) * seq_len] for i in idx]
    return torch.from_numpy(np.stack(rows).astype(np.int64))
