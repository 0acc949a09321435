"""Per-request parameters: what a request asks for, and what the engine runs with.

``RequestParams`` is what a caller asks: ``SamplingParams`` plus a ``DecodeParams`` whose
mode knobs are ``None`` when not given. ``LLMEngine.resolve_params`` turns it, once, at the
edge of the engine, into ``ResolvedParams``: frozen, every knob filled (see
``server.engine.modes.registry.resolve_decode`` for the order of defaults). Every check of a
user value raises ``ParamError``, which names the parameter so the HTTP layer can fill the
OpenAI ``param`` field; each rule is written once, here or in the mode that owns it.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field, fields
from typing import ClassVar, TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from server.engine.grammar import GrammarSpec

UnmaskPolicy = Literal["threshold", "low_confidence", "leftmost"]
POLICIES: tuple[str, ...] = ("threshold", "low_confidence", "leftmost")


class ParamError(ValueError):
    """A request parameter that cannot be honoured. ``param`` is the request field's name
    (None when no single field is to blame)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


PENALTY_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty")
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class LogitControls:
    """The per-request logit controls (applied by ``server.engine.penalties``); the neutral
    value of each field means "off". Which modes honour the penalties is theirs to declare
    (``DecodeMode.honours_penalties``)."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0

    def validate(self, max_tokens: int) -> None:
        """Range checks (ParamError names the field)."""
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ParamError(name, f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ParamError("repetition_penalty", f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        for token, bias in self.logit_bias:
            if token < 0 or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ParamError(
                    "logit_bias", f"logit_bias needs token ids >= 0 and biases in [-100, 100], got {token}: {bias}"
                )
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= max_tokens:
            raise ParamError("min_tokens", f"min_tokens must be in [0, max_tokens={max_tokens}], got {self.min_tokens!r}")

    def penalties_set(self) -> tuple[str, ...]:
        """The penalty fields set to something other than their neutral value."""
        neutral = LogitControls()
        return tuple(name for name in PENALTY_FIELDS if getattr(self, name) != getattr(neutral, name))

    @functools.cached_property
    def penalizes(self) -> bool:
        return bool(self.penalties_set())

    @functools.cached_property
    def active(self) -> bool:
        """Whether any control is on (read for every request at every step; the fields are frozen)."""
        return self.penalizes or bool(self.logit_bias) or self.min_tokens > 0


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
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ParamError("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ParamError("temperature", f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ParamError("top_k", f"top_k must be >= 0 (0 disables it), got {self.top_k!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ParamError("logprobs", f"logprobs must be in [0, 20], got {self.logprobs!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ParamError("seed", f"seed must be in [0, 2**63), got {self.seed!r}")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ParamError("stop_token_ids", f"stop_token_ids must be token ids >= 0, got {list(self.stop_token_ids)!r}")
        self.controls.validate(self.max_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# --------------------------------------------------------------------------- decode knobs


def _positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise ParamError(name, f"{name} must be an integer >= 1, got {value!r}")


def _unit_interval(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ParamError(name, f"{name} must be in (0, 1], got {value!r}")


def _policy(name: str, value: Any) -> None:
    if value not in POLICIES:
        raise ParamError(name, f"unknown unmasking policy {value!r}; expected one of {', '.join(POLICIES)}")


SPEC_VARIANTS: tuple[str, ...] = ("linear", "quadratic")


def _variant(name: str, value: Any) -> None:
    if value not in SPEC_VARIANTS:
        raise ParamError(name, f"unknown self_spec variant {value!r}; expected one of {', '.join(SPEC_VARIANTS)}")


CONFIDENCE_MEASURES: tuple[str, ...] = ("probability", "margin")


def _confidence(name: str, value: Any) -> None:
    if value not in CONFIDENCE_MEASURES:
        raise ParamError(name, f"unknown confidence measure {value!r}; expected one of {', '.join(CONFIDENCE_MEASURES)}")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ParamError(name, f"{name} must be true or false, got {value!r}")


# The one range rule of each decode knob, whoever supplies the value (a request, a server
# setting, a model's generation_config.json). Which mode honours which knob is the mode's.
KNOB_RULES: dict[str, Callable[[str, Any], None]] = {
    "block_length": _positive_int,
    "refine_steps": _positive_int,
    "draft_length": _positive_int,
    "threshold": _unit_interval,
    "policy": _policy,
    "seed_first_position": _boolean,
    "lookahead": _boolean,
    "guess_seed": _boolean,
    "confidence": _confidence,
    "variant": _variant,
}


def check_knob(name: str, value: Any) -> None:
    """Raise ParamError unless ``value`` is valid for the decode knob ``name``."""
    rule = KNOB_RULES.get(name)
    if rule is None:
        raise ParamError(name, f"unknown decoding parameter {name!r}")
    rule(name, value)


@dataclass(frozen=True)
class DecodeParams:
    """The decoding a request asks for: the mode and the knobs it sets (None = not set).

    Knob values are range-checked here (``KNOB_RULES``); whether the mode honours a knob, and
    its default, are decided when the engine resolves the request."""

    mode: str = "ar"
    refine_steps: int | None = None
    block_length: int | None = None
    threshold: float | None = None
    policy: UnmaskPolicy | None = None
    draft_length: int | None = None
    seed_first_position: bool | None = None  # diffusion: canvas[0] = causal prediction (HF behaviour)
    lookahead: bool | None = None  # diffusion: the commit pass also proposes the next block
    guess_seed: bool | None = None  # diffusion with lookahead: that canvas starts with a guessed seed
    confidence: str | None = None  # diffusion: what threshold compares, "probability" or "margin"
    variant: str | None = None  # self_spec: "linear" (draft + verify) or "quadratic" (one pass)

    def __post_init__(self) -> None:
        for name, value in self.knobs().items():
            check_knob(name, value)

    # the knobs a caller may set (seed_first_position is internal: the reference tests' switch)
    CALLER_KNOBS: ClassVar[tuple[str, ...]] = (
        "refine_steps", "block_length", "threshold", "policy", "draft_length", "variant", "lookahead", "confidence",
        "guess_seed",
    )

    @classmethod
    def from_fields(cls, mode: str, source: Any) -> "DecodeParams":
        """The caller knobs read by name from ``source`` (an API request, parsed CLI arguments)."""
        return cls(mode=mode, **{name: getattr(source, name) for name in cls.CALLER_KNOBS})

    def knobs(self) -> dict[str, Any]:
        """The knobs this request sets."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "mode" and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class RequestParams:
    """Everything a request asks of the engine besides its prompt."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    decode: DecodeParams = field(default_factory=DecodeParams)


@dataclass(frozen=True)
class ModeParams:
    """Base of each mode's resolved knobs (every field set; subclasses add the mode's own)."""

    mode: str

    def of(self, mode: str) -> "ModeParams":
        """The params ``mode`` runs with. A mode reads its params through this, so a composite
        mode (one that delegates to others per step) can hold theirs and hand each its own."""
        assert mode == self.mode, f"params of mode {self.mode!r} asked for {mode!r}"
        return self


@dataclass(frozen=True)
class ResolvedParams:
    """What a request runs with: sampling as asked, decoding with every default filled."""

    sampling: SamplingParams
    decode: ModeParams


@dataclass(frozen=True)
class ResolveContext:
    """What resolution needs to know about the served model and the server.

    ``server_defaults``: knob -> value set by the operator (e.g. ``--default-refine-steps``),
    used by every mode that honours the knob; ``model_defaults``: mode -> knob -> value from
    the model folder's ``generation_config.json`` (``nld_decoding``)."""

    block_size: int
    max_model_len: int
    max_pass_tokens: int  # the per-step token budget: no single pass may exceed it
    mask_token_id: int | None  # None: not a diffusion checkpoint (only causal modes run)
    server_defaults: dict[str, Any] = field(default_factory=dict)
    model_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    cost_model: Any = None  # the engine's CostModel (server.engine.cost_model), read by "auto"
