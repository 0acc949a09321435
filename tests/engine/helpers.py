"""Shared helpers of the engine tests: tiny models, engines, request specs and a step driver."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.config import DEFAULT_MODEL_DIR, EngineConfig
from server.engine.engine import LLMEngine
from server.engine.outputs import RequestStats
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from server.model.model import DecoderModel
from server.model.tiny import tiny_nld_config
from tests.fixtures.tiny_models import random_model
from tests.engine.reference import Result, run_reference

MASK_ID = 300
VOCAB = 320
REPO = Path(__file__).resolve().parents[2]


def embedded_fp32_engine() -> LLMEngine:
    """The embedded default model in fp32 (the dense reference's precision)."""
    return LLMEngine.from_pretrained(EngineConfig(model=str(DEFAULT_MODEL_DIR), max_model_len=512, kv_cache_tokens=8192,
                                                  dtype="float32"))


def heldout_plain_prompts(engine: LLMEngine, first: int, stop: int) -> list[list[int]]:
    """Plain prompts ``first:stop`` of benchmarks/heldout_prompts.json (held-out text)."""
    spec = json.loads((REPO / "benchmarks" / "heldout_prompts.json").read_text())
    return [engine.tokenizer.encode(t, add_special_tokens=False) for t in spec["plain"][first:stop]]


@functools.lru_cache(maxsize=None)
def model_for(seed: int, eos: int = 2, vocab_size: int = VOCAB, mask_id: int = MASK_ID, std: float = 0.5) -> DecoderModel:
    """A tiny random fp32 NLD model. The weights depend only on ``seed`` and the shapes, so
    changing ``eos`` keeps the same network."""
    cfg = tiny_nld_config(vocab_size=vocab_size, mask_token_id=mask_id, eos_token_id=eos)
    return random_model(cfg, seed=seed, std=std)


def make_engine(model: DecoderModel, **overrides: Any) -> LLMEngine:
    kw: dict[str, Any] = dict(model="tiny", device="cpu", kv_cache_tokens=4096, max_model_len=256, page_size=8)
    kw.update(overrides)
    return LLMEngine(model, EngineConfig(**kw))


# A request spec is a plain dict: mode, max_tokens, stop_token_ids, ignore_eos and the mode's knobs
# (block_length, refine_steps, policy, threshold, seed_first_position, lookahead / draft_length).
def to_params(spec: dict, temperature: float = 0.0, seed: int | None = None, **sampling: Any) -> RequestParams:
    mode = spec["mode"]
    decode: dict[str, Any] = {"mode": mode}
    if mode == "diffusion":
        for k in ("block_length", "refine_steps", "policy", "threshold", "seed_first_position", "lookahead", "confidence",
                  "guess_seed"):
            if k in spec:
                decode[k] = spec[k]
    elif mode == "self_spec":
        if "draft_length" in spec:
            decode["draft_length"] = spec["draft_length"]
        if "block_length" in spec:
            decode["block_length"] = spec["block_length"]
        if "variant" in spec:
            decode["variant"] = spec["variant"]
    return RequestParams(
        SamplingParams(
            max_tokens=spec["max_tokens"],
            temperature=temperature,
            seed=seed,
            stop_token_ids=tuple(spec.get("stop_token_ids", ())),
            ignore_eos=spec.get("ignore_eos", False),
            **sampling,
        ),
        DecodeParams(**decode),
    )


def reference_for(model: DecoderModel, prompt: list[int], spec: dict, max_model_len: int) -> Result:
    """The naive decoder's greedy result for ``spec`` (stop set = stop ids + the model's EOS)."""
    stops = set(spec.get("stop_token_ids", ()))
    if not spec.get("ignore_eos", False):
        stops |= set(model.config.eos_token_ids)
    kw: dict[str, Any] = {"mode": spec["mode"], "max_tokens": spec["max_tokens"], "stop_ids": frozenset(stops)}
    if spec["mode"] == "diffusion":
        b = spec.get("block_length", model.config.block_size)
        kw.update(
            block_length=b,
            refine_steps=spec.get("refine_steps", b),
            policy=spec.get("policy", "threshold"),
            threshold=spec.get("threshold", 0.9),
            seed_first_position=spec.get("seed_first_position", True),
            lookahead=spec.get("lookahead", False),
            confidence=spec.get("confidence", "probability"),
            guess_seed=spec.get("guess_seed", False),
        )
    elif spec["mode"] == "self_spec":
        b = spec.get("block_length", model.config.block_size)
        kw["draft_length"] = spec.get("draft_length", max(1, b - 1))
        if "variant" in spec:
            kw["variant"] = spec["variant"]
    return run_reference(model, prompt, kw, max_model_len=max_model_len, mask_id=model.config.mask_token_id)


@dataclass
class Finished:
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats | None
    outputs: int = 0  # how many RequestOutputs the request produced


@dataclass
class Driver:
    """Runs an engine step by step: requests join at given steps, may be aborted at given steps;
    the KV pool's integrity is checked after every step. ``abort_hook`` sees the request just
    before it is aborted (to record what it was doing)."""

    engine: LLMEngine
    tokens: dict[str, list[int]] = field(default_factory=dict)
    done: dict[str, Finished] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    steps: int = 0

    def add(self, rid: str, prompt: list[int], params: RequestParams) -> None:
        self.engine.add_request(rid, prompt, params)
        self.tokens[rid] = []
        self.counts[rid] = 0

    def _take(self, outs) -> None:  # type: ignore[no-untyped-def]
        for out in outs:
            assert out.request_id not in self.done, f"output after the finished one for {out.request_id}"
            assert self.engine.model_config.mask_token_id not in out.new_token_ids
            self.tokens[out.request_id].extend(out.new_token_ids)
            self.counts[out.request_id] += 1
            if out.finished:
                self.done[out.request_id] = Finished(
                    self.tokens[out.request_id], out.finish_reason, out.stats, self.counts[out.request_id]
                )

    def abort(self, rid: str) -> None:
        out = self.engine.abort(rid)
        if out is not None:
            self._take([out])
            assert self.done[rid].finish_reason == "abort"

    def step(self) -> None:
        self._take(self.engine.step())
        self.steps += 1
        self.engine.check_integrity()

    def run(self, max_steps: int = 100_000) -> None:
        while self.engine.has_work:
            self.step()
            assert self.steps < max_steps, "the engine made no progress"
        assert set(self.done) == set(self.tokens), "a request never finished"


def run_all(engine: LLMEngine, requests: list[tuple[str, list[int], RequestParams]], waves: int = 1) -> dict[str, Finished]:
    """Add the requests in ``waves`` groups (a new group once the previous one has run a few
    steps, so later ones can hit the prefix cache) and run everything to completion."""
    d = Driver(engine)
    per = -(-len(requests) // waves)
    for w in range(waves):
        for rid, prompt, params in requests[w * per : (w + 1) * per]:
            d.add(rid, prompt, params)
        for _ in range(3 if w < waves - 1 else 0):
            if engine.has_work:
                d.step()
    d.run()
    return d.done
