"""Per-request parameters: how to sample and how to decode.

Every value a user can set is validated here and rejected with ``ValueError``
(the HTTP layer turns that into a 400). Engine code may assume validated params.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from server.engine.grammar import GrammarSpec
from server.engine.penalties import LogitControls

Mode = Literal["ar", "diffusion", "self_spec"]
UnmaskPolicy = Literal["threshold", "low_confidence", "leftmost"]

MODES: tuple[str, ...] = ("ar", "diffusion", "self_spec")
POLICIES: tuple[str, ...] = ("threshold", "low_confidence", "leftmost")


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. ``temperature == 0`` means greedy (argmax).

    ``seed`` makes sampling reproducible whatever else shares the batch: random
    numbers are derived from (seed, absolute position, purpose), never from a
    global generator. ``seed=None`` gets a random seed at admission.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per token (0 = only the chosen one)
    controls: LogitControls = field(default_factory=LogitControls)  # penalties, logit_bias, min_tokens
    grammar: GrammarSpec | None = None  # structured output: the text must follow this grammar

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {list(self.stop_token_ids)!r}")
        self.controls.validate(self.max_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class DecodeParams:
    """How the sequence is decoded: the mode and its knobs.

    ``block_length``/``refine_steps``/``draft_length`` of ``None`` are resolved
    against the checkpoint by :meth:`resolved` (block = config ``block_size``,
    refine steps = block length, draft length = block length - 1).
    """

    mode: Mode = "ar"
    refine_steps: int | None = None
    block_length: int | None = None
    threshold: float = 0.9
    policy: UnmaskPolicy = "threshold"
    draft_length: int | None = None
    seed_first_position: bool = True  # diffusion: canvas[0] = causal prediction (HF behaviour)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown unmasking policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        if self.refine_steps is not None and (not isinstance(self.refine_steps, int) or self.refine_steps < 1):
            raise ValueError(f"refine_steps must be an integer >= 1, got {self.refine_steps!r}")
        if self.block_length is not None and (not isinstance(self.block_length, int) or self.block_length < 1):
            raise ValueError(f"block_length must be an integer >= 1, got {self.block_length!r}")
        if self.draft_length is not None and (not isinstance(self.draft_length, int) or self.draft_length < 1):
            raise ValueError(f"draft_length must be an integer >= 1, got {self.draft_length!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")

    def resolved(self, default_block: int, max_model_len: int) -> "DecodeParams":
        """Fill the defaults from the checkpoint and check lengths against the context."""
        block = self.block_length if self.block_length is not None else default_block
        if block > max_model_len:
            raise ValueError(f"block_length {block} is larger than the context length {max_model_len}")
        draft = self.draft_length if self.draft_length is not None else max(1, block - 1)
        if draft + 1 > max_model_len:
            raise ValueError(f"draft_length {draft} does not fit the context length {max_model_len}")
        steps = self.refine_steps if self.refine_steps is not None else block
        return replace(self, block_length=block, draft_length=draft, refine_steps=steps)


@dataclass(frozen=True)
class RequestParams:
    """Everything a request asks of the engine besides its prompt."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    decode: DecodeParams = field(default_factory=DecodeParams)
