"""A deterministic fake ``EngineClient`` for the HTTP-layer tests.

The answer to a prompt is one of a few sentences, picked by a stable hash of the prompt ids
and the seed, tokenized with the real (test) tokenizer. It ends with ``stop`` after the
sentence (EOS) or ``length`` at ``max_tokens``; with ``ignore_eos`` the sentence repeats.
Outputs are chunked per mode: ``ar`` one token per output, ``diffusion`` one block,
``self_spec`` variable runs. KV pages are counted per request and returned on finish, abort
or cancellation. Knobs (set from a test, reset by ``reset``) make it slow, raise, fail, or
report a full queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass
from typing import Any, AsyncIterator

from server.engine.client import QueueFullError
from server.engine.modes import resolve_decode, work_kind_names
from server.engine.outputs import RequestOutput, RequestStats, TokenLogprob
from server.engine.params import RequestParams, ResolveContext, ResolvedParams

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, diffusion models decode blocks.",
    "Blocks of tokens are refined in parallel.",
    "Self speculation drafts and verifies runs of tokens.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u65e5\u672c\u8a9e \u2713 done.",
]


def stable_hash(*parts: Any) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def byte_token_ids(tokenizer: Any, text: str) -> list[int]:
    """One token per UTF-8 byte of ``text`` (byte-level BPE base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_to_char = {b: chr(c) for b, c in zip(bs, cs)}
    ids = tokenizer.convert_tokens_to_ids([byte_to_char[b] for b in text.encode("utf-8")])
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    return ids


@dataclass
class _Request:
    request_id: str
    pages: int
    aborted: bool = False
    freed: bool = False


@dataclass
class FakeKnobs:
    step_delay: float = 0.0  # seconds between outputs
    first_delay: float = 0.0  # seconds before the first output
    queue_full: bool = False  # generate() raises QueueFullError
    generate_exc: BaseException | None = None  # generate() raises this
    lazy_errors: bool = False  # raise the two above at the first __anext__ instead
    fail_after: int | None = None  # raise RuntimeError after this many outputs
    error_after: int | None = None  # end with finish_reason "error" after this many outputs
    script: list[int] | None = None  # emit these tokens instead of a sentence
    chunk_override: int | None = None  # tokens per output, any mode
    ready: bool = True
    healthy: bool = True  # is_healthy(): False = the engine failed for good


class FakeEngine:
    """Implements ``server.engine.client.EngineClient`` without a model."""

    def __init__(
        self, tokenizer: Any, *, model_name: str = "fake-nld", max_model_len: int = 1024, block_size: int = 4,
        total_pages: int = 4096, page_size: int = 16, server_defaults: dict[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.page_size = page_size
        self._total_pages = total_pages
        self._free_pages = total_pages
        self.knobs = FakeKnobs()
        # parameters are resolved as the real engine does (defaults, mode fields, lengths)
        self.param_context = ResolveContext(
            block_size=block_size, max_model_len=max_model_len, max_pass_tokens=2048,
            mask_token_id=len(tokenizer) - 1, server_defaults=dict(server_defaults or {}),
        )
        self.running: dict[str, _Request] = {}
        self.submitted: list[tuple[str, list[int], RequestParams]] = []
        self.resolved: list[ResolvedParams] = []
        self.aborted: list[str] = []

    # ------------------------------------------------------------------ test helpers
    def reset(self) -> None:
        self.knobs = FakeKnobs()
        self.submitted.clear()
        self.resolved.clear()
        self.aborted.clear()

    def answer_ids(self, prompt_ids: list[int], params: RequestParams | ResolvedParams) -> tuple[list[int], str]:
        """The tokens this fake will emit for a prompt and their finish reason."""
        max_tokens = params.sampling.max_tokens
        if self.knobs.script is not None:
            ids = list(self.knobs.script)
        else:
            seed = params.sampling.seed if params.sampling.temperature > 0 else None
            sentence = SENTENCES[stable_hash(tuple(prompt_ids), seed) % len(SENTENCES)]
            ids = list(self.tokenizer.encode(" " + sentence, add_special_tokens=False))
        if params.sampling.ignore_eos:
            base = ids or [0]
            ids = (base * (max_tokens // len(base) + 1))[:max_tokens]
            return ids, "length"
        if len(ids) >= max_tokens:
            return ids[:max_tokens], "length"
        return ids, "stop"

    def chunk_sizes(self, params: ResolvedParams, total: int, prompt_ids: list[int]) -> list[int]:
        """How many tokens each output carries."""
        mode = params.decode.mode
        if self.knobs.chunk_override:
            size = self.knobs.chunk_override
            return [min(size, total - i) for i in range(0, total, size)]
        if mode == "ar":
            return [1] * total
        decode: Any = params.decode
        if mode == "diffusion":
            return [min(decode.block_length, total - i) for i in range(0, total, decode.block_length)]
        draft = decode.draft_length
        sizes, done = [], 0
        while done < total:
            run = 1 + stable_hash(tuple(prompt_ids), done) % (draft + 1)
            run = min(run, total - done)
            sizes.append(run)
            done += run
        return sizes

    # ------------------------------------------------------------------ EngineClient
    def is_ready(self) -> bool:
        return self.knobs.ready

    def is_healthy(self) -> bool:
        return self.knobs.healthy

    def kv_pages_free(self) -> int:
        return self._free_pages

    def kv_pages_total(self) -> int:
        return self._total_pages

    def _admission_error(self) -> BaseException | None:
        if self.knobs.generate_exc is not None:
            return self.knobs.generate_exc
        if self.knobs.queue_full:
            return QueueFullError("the waiting queue is full")
        return None

    def generate(self, prompt_token_ids: list[int], params: RequestParams, request_id: str) -> AsyncIterator[RequestOutput]:
        if not self.knobs.lazy_errors and (exc := self._admission_error()) is not None:
            raise exc
        if request_id in self.running:
            raise ValueError(f"duplicate request id {request_id}")
        if any(not 0 <= t < len(self.tokenizer) for t in prompt_token_ids):
            raise ValueError("prompt token id out of range")
        resolved = ResolvedParams(params.sampling, resolve_decode(params.decode, params.sampling, self.param_context))
        pages = math.ceil((len(prompt_token_ids) + params.sampling.max_tokens) / self.page_size)
        if pages > self._free_pages:
            raise QueueFullError("no KV pages left")
        self._free_pages -= pages
        req = _Request(request_id, pages)
        self.running[request_id] = req
        self.submitted.append((request_id, list(prompt_token_ids), params))
        self.resolved.append(resolved)
        return self._stream(req, list(prompt_token_ids), resolved)

    def _free(self, req: _Request) -> None:
        if not req.freed:
            req.freed = True
            self._free_pages += req.pages
            self.running.pop(req.request_id, None)

    async def abort(self, request_id: str, reason: str = "abort") -> None:
        if request_id not in self.aborted:
            self.aborted.append(request_id)  # recorded even if cancellation already ended it
        req = self.running.get(request_id)
        if req is not None:
            req.aborted = True

    async def _stream(self, req: _Request, prompt_ids: list[int], params: ResolvedParams) -> AsyncIterator[RequestOutput]:
        knobs = self.knobs
        mode = params.decode.mode
        stats = RequestStats(
            mode=mode, prompt_tokens=len(prompt_ids), model=self.model_name,
            forward_passes=dict.fromkeys(work_kind_names(), 0),
        )
        try:
            if knobs.lazy_errors and (exc := self._admission_error()) is not None:
                raise exc
            ids, reason = self.answer_ids(prompt_ids, params)
            sizes = self.chunk_sizes(params, len(ids), prompt_ids)
            stats.forward_passes["prefill"] += 1
            await asyncio.sleep(knobs.first_delay)
            pos = 0
            for n_out, size in enumerate(sizes or [0]):
                if n_out:
                    await asyncio.sleep(knobs.step_delay)
                if req.aborted:
                    break
                if knobs.fail_after is not None and n_out >= knobs.fail_after:
                    raise RuntimeError("fake engine exploded")
                if knobs.error_after is not None and n_out >= knobs.error_after:
                    yield RequestOutput(req.request_id, [], True, "error", error="fake engine failure")
                    return
                chunk = ids[pos : pos + size]
                pos += size
                self._count_passes(stats, params, size)
                stats.completion_tokens += len(chunk)
                finished = pos >= len(ids)
                yield RequestOutput(
                    req.request_id,
                    chunk,
                    finished=finished,
                    finish_reason=reason if finished else None,
                    new_logprobs=self._logprobs(chunk, params),
                    stats=stats if finished else None,
                )
                if finished:
                    return
            # aborted
            yield RequestOutput(req.request_id, [], True, "abort", stats=stats)
        finally:
            self._free(req)

    def _count_passes(self, stats: RequestStats, params: ResolvedParams, size: int) -> None:
        mode = params.decode.mode
        decode: Any = params.decode
        if mode == "ar":
            stats.forward_passes["decode"] += 1
        elif mode == "diffusion":
            stats.forward_passes["denoise"] += decode.refine_steps
            stats.forward_passes["commit"] += 1
            stats.denoise_steps_per_block.append(decode.refine_steps)
        else:
            stats.forward_passes["draft"] += 1
            stats.forward_passes["verify"] += 1
            stats.acceptance_lengths.append(size)

    def _logprobs(self, chunk: list[int], params: ResolvedParams) -> list[TokenLogprob] | None:
        k = params.sampling.logprobs
        if k is None:
            return None
        out = []
        for tid in chunk:
            top = [(tid, -0.25)] + [((tid + j) % len(self.tokenizer), -1.0 - j) for j in range(1, k)]
            out.append(TokenLogprob(tid, -0.25, top[:k]))
        return out
