"""What the engine hands back to callers: incremental outputs and per-request statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class RequestStats:
    """Accounting for one request. Every forward pass the request took part in is counted
    once, by kind (the engine starts every registered work kind at 0); TPF = emitted tokens /
    all forward passes (every kind counted)."""

    mode: str = "ar"
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    forward_passes: dict[str, int] = field(default_factory=dict)
    # passes by the decoder that ran them ("ar", "self_spec_linear", ...), then by kind: what
    # ``auto`` chose per step (fixed modes have one decoder)
    passes_by_decoder: dict[str, dict[str, int]] = field(default_factory=dict)
    acceptance_lengths: list[int] = field(default_factory=list)  # self_spec: accepted + bonus per cycle
    denoise_steps_per_block: list[int] = field(default_factory=list)  # diffusion
    preemptions: int = 0
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    prefill_done_time: float | None = None
    finished_time: float | None = None
    emission_times: list[float] = field(default_factory=list)  # wall time of each output increment
    model: str = ""

    @property
    def total_forward_passes(self) -> int:
        return sum(self.forward_passes.values())

    @property
    def tokens_per_forward(self) -> float:
        n = self.total_forward_passes
        return self.completion_tokens / n if n else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        a = self.acceptance_lengths
        return sum(a) / len(a) if a else 0.0


@dataclass
class TokenLogprob:
    """Log-probability of an emitted token under the model's raw (untempered) distribution."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """One increment of a request's output. ``new_token_ids`` never contains the mask id;
    stop/EOS tokens that end the request are not included. Exactly one output per request
    has ``finished=True``, and it is the last."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    new_logprobs: list[TokenLogprob] | None = None
    stats: RequestStats | None = None  # set on the finished output
    error: str | None = None
