"""A request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Hashable

from server.engine.images import ImageSpan, cache_keys
from server.engine.kv_cache import PageTable
from server.engine.outputs import FinishReason, RequestStats, TokenLogprob
from server.engine.params import ResolvedParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class ModeState:
    """Base of a mode's per-request state (``Request.mode_state``); each mode subclasses it."""


@dataclass(eq=False)  # identity semantics: the scheduler finds requests in lists by identity
class Request:
    """Engine-side state. ``token_ids`` = prompt + emitted tokens; the first ``num_computed``
    of them have causal K/V in the cache (pages in ``table``)."""

    request_id: str
    prompt_ids: list[int]
    params: ResolvedParams
    seed: int
    stop_ids: frozenset[int]  # tokens that end the request (user stop ids, plus EOS unless ignore_eos)
    max_model_len: int
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    table: PageTable = field(default_factory=PageTable)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    mode_state: ModeState | None = None  # owned by the request's mode; None after a reset
    stats: RequestStats = field(default_factory=RequestStats)
    new_tokens: list[int] = field(default_factory=list)  # emitted since the last output
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    arrival_order: int = 0
    grammar: Any = None  # GrammarMatcher of a constrained request; follows the emitted tokens
    images: list[ImageSpan] = field(default_factory=list)  # images in the prompt (VLM)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)
        self.stats.prompt_tokens = len(self.prompt_ids)
        self.stats.mode = self.params.decode.mode
        if not self.stats.arrival_time:
            self.stats.arrival_time = time.time()

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def cache_keys(self) -> list[Hashable]:
        """``token_ids`` as the prefix cache hashes them (image pads keyed by the image content)."""
        return cache_keys(self.token_ids, self.images)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def remaining_tokens(self) -> int:
        """How many more tokens may be emitted (max_tokens and the context limit)."""
        by_max = self.params.sampling.max_tokens - len(self.output_ids)
        by_ctx = self.max_model_len - len(self.token_ids)
        return max(0, min(by_max, by_ctx))

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def emit(self, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        """Append tokens to the output, stopping at a stop token or at the length limit.
        A stop token ends the request and is not emitted."""
        for i, tok in enumerate(tokens):
            if self.remaining_tokens <= 0:
                self.finish("length")
                return
            if tok in self.stop_ids or (self.grammar is not None and tok in self.grammar.eos_ids):
                self.finish("stop")
                return
            if self.grammar is not None and not self.grammar.accept(tok):
                self.finish("stop")  # unreachable: every mode chooses tokens the grammar allows
                return
            self.token_ids.append(tok)
            self.new_tokens.append(tok)
            self.stats.completion_tokens += 1
            if logprobs is not None:
                self.new_logprobs.append(logprobs[i])
            if self.grammar is not None and self.grammar.is_stopped:
                self.finish("stop")  # the grammar is complete and admits nothing more
                return
        if self.remaining_tokens <= 0:
            self.finish("length")

    def finish(self, reason: FinishReason) -> None:
        if self.status is not Status.FINISHED:
            self.status = Status.FINISHED
            self.finish_reason = reason
            self.stats.finished_time = time.time()
