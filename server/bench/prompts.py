"""Prompt sets for the load generator: a small built-in set, or a file (jsonl / json / txt),
optionally with synthetic images attached (an image workload for vision-language models)."""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: chat messages (the completions endpoint joins their text)."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    max_tokens: int | None = None  # per-prompt override of --max-tokens
    images: tuple[str, ...] = ()  # image URLs (data:) sent before the last message's text

    @staticmethod
    def user(text: str, max_tokens: int | None = None) -> "Prompt":
        return Prompt(messages=(("user", text),), max_tokens=max_tokens)

    def chat_messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"role": r, "content": c} for r, c in self.messages]
        if self.images:
            parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in self.images]
            parts.append({"type": "text", "text": out[-1]["content"]})
            out[-1] = {"role": out[-1]["role"], "content": parts}
        return out

    def text(self) -> str:
        return "\n".join(c for _, c in self.messages)


BUILTIN_PROMPTS: tuple[str, ...] = (
    "Write a short poem about the sea at night.",
    "Explain in simple terms how a rainbow forms.",
    "List five fruits that are rich in vitamin C.",
    "What is the capital of France, and what is it famous for?",
    "Describe the water cycle in a few sentences.",
    "Give three tips for writing clear emails.",
    "Translate 'good morning, how are you?' into Spanish and German.",
    "Summarize the plot of Little Red Riding Hood.",
    "Write a Python function that returns the factorial of n.",
    "Why is the sky blue?",
    "Name the planets of the solar system in order from the sun.",
    "What are the main differences between a cat and a dog as pets?",
    "Write a haiku about autumn leaves.",
    "How do you make a cup of tea? Answer step by step.",
    "Explain what a prime number is and give four examples.",
    "Tell a very short story about a robot who learns to paint.",
    "What is photosynthesis?",
    "Give a recipe for a simple tomato salad.",
    "Describe a busy market in the morning.",
    "What does a compiler do?",
    "Count from one to twenty in words.",
    "Write a limerick about a forgetful wizard.",
    "What are three benefits of regular exercise?",
    "Explain the rules of tic-tac-toe.",
    "Describe the taste of chocolate to someone who has never had it.",
    "What is the difference between weather and climate?",
    "Write a polite message declining a meeting invitation.",
    "How many days are there in a leap year, and why?",
    "Explain recursion with an example.",
    "What would you pack for a weekend camping trip?",
    "Write two sentences about the moon.",
    "Compare trains and airplanes for a 500 km trip.",
)


def builtin_prompts() -> list[Prompt]:
    return [Prompt.user(t) for t in BUILTIN_PROMPTS]


def _from_obj(obj: Any, where: str) -> Prompt:
    if isinstance(obj, str):
        return Prompt.user(obj)
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a string or an object, got {type(obj).__name__}")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"{where}: max_tokens must be an integer >= 1")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: every message needs a string 'content'")
            out.append((str(m.get("role", "user")), m["content"]))
        return Prompt(messages=tuple(out), max_tokens=max_tokens)
    for key in ("prompt", "text", "question", "input"):
        if isinstance(obj.get(key), str):
            return Prompt.user(obj[key], max_tokens)
    raise ValueError(f"{where}: needs 'messages' or one of 'prompt', 'text', 'question', 'input'")


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read prompts from ``path``.

    - ``.jsonl``: one JSON value a line: a string, or an object with ``messages`` (chat
      list) or ``prompt``/``text``/``question``/``input``, and optionally ``max_tokens``.
    - ``.json``: a list of such values.
    - anything else (``.txt``): one prompt a non-empty line.
    """
    p = Path(path)
    raw = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    prompts: list[Prompt] = []
    if suffix == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{n}: invalid JSON: {e.msg}") from None
                prompts.append(_from_obj(obj, f"{p}:{n}"))
    elif suffix == ".json":
        data = json.loads(raw)
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of prompts")
        prompts = [_from_obj(o, f"{p}[{i}]") for i, o in enumerate(data)]
    else:
        prompts = [Prompt.user(line.strip()) for line in raw.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{p}: no prompts found")
    return prompts


def synthetic_image_url(seed: int, width: int, height: int) -> str:
    """A PNG of random blocks as a ``data:`` URL (deterministic in ``seed``)."""
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    step = max(8, min(width, height) // 8)
    for y in range(0, height, step):
        for x in range(0, width, step):
            image.paste((rng.randrange(256), rng.randrange(256), rng.randrange(256)), (x, y, x + step, y + step))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def attach_images(prompts: list[Prompt], per_prompt: int, width: int, height: int, same: bool, seed: int = 0) -> list[Prompt]:
    """``per_prompt`` synthetic images on every prompt: distinct images per prompt, or (``same``)
    one set shared by all prompts, which a prefix-caching server encodes once."""
    out = []
    for i, p in enumerate(prompts):
        base = seed * 1_000_003 + (0 if same else i * per_prompt)
        urls = tuple(synthetic_image_url(base + k, width, height) for k in range(per_prompt))
        out.append(Prompt(p.messages, p.max_tokens, urls))
    return out
