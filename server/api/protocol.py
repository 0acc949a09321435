"""Pydantic models of the OpenAI-compatible wire format (requests, responses, stream chunks).

Requests are parsed strictly (a string where a number belongs is a 400, not a coercion) and
unknown fields are kept aside in ``model_extra`` and otherwise ignored: OpenAI clients send
fields we never heard of. Our extensions (``mode``, ``refine_steps`` ...) are top-level
fields, which is where the openai client's ``extra_body`` puts them.

Which modes exist and which fields each honours is not decided here: the engine's mode
registry (``server/engine/modes``) decides, so ``mode`` is a plain string here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_STOP_STRINGS = 4
MAX_N = 16
MAX_LOGPROBS = 20

PolicyName = Literal["threshold", "low_confidence", "leftmost"]
FinishReasonName = Literal["stop", "length", "tool_calls"]


# --------------------------------------------------------------------------- requests


def _integral_float_to_int(value: Any) -> Any:
    """JSON Schema counts ``5.0`` as an integer; accept it (but never strings or 5.5)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_AsInt = BeforeValidator(_integral_float_to_int)
# (the bounds must precede the validator for them to show in the JSON schema)
PositiveInt = Annotated[int, Field(ge=1), _AsInt]
NonNegativeInt = Annotated[int, Field(ge=0), _AsInt]
SeedInt = Annotated[int, Field(ge=0, lt=2**63), _AsInt]
ChoiceCount = Annotated[int, Field(ge=1, le=MAX_N), _AsInt]
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS), _AsInt]
TokenIds = Annotated[list[NonNegativeInt], Field(min_length=1)]


class _RequestModel(BaseModel):
    """Base of every request model: strict types, unknown fields tolerated."""

    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_RequestModel):
    include_usage: Optional[bool] = None


class TextContentPart(_RequestModel):
    type: Literal["text"]
    text: str


class ToolCallFunction(_RequestModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(_RequestModel):
    """A tool call of an earlier assistant turn, sent back by the client."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ImageURL(_RequestModel):
    url: str = Field(description="a data: URL (base64 PNG, JPEG or WebP); http(s) only when the server allows fetching")
    detail: Optional[Literal["auto", "low", "high"]] = None  # accepted and ignored


class ImageContentPart(_RequestModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextContentPart, ImageContentPart], Field(discriminator="type")]


class ChatMessage(_RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None  # assistant only
    tool_call_id: Optional[str] = None  # tool only


StopField = Union[str, list[str], None]


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds a string that is not valid Unicode text."""
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


class _GenerationRequest(_RequestModel):
    """Fields shared by chat and legacy completions, plus our decoding extensions."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # json.loads lets lone surrogates through (escaped, or as bytes ED A0 80); no tokenizer
        # or UTF-8 encoder can take them, so the body is refused here
        if _has_lone_surrogate(data):
            raise ValueError("the body holds a string with a lone UTF-16 surrogate (not valid Unicode)")
        return data

    model: Optional[str] = Field(None, description="a served model name; the served model when omitted")
    max_tokens: Optional[PositiveInt] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[SeedInt] = None
    n: Optional[ChoiceCount] = None
    stop: StopField = Field(None, description=f"up to {MAX_STOP_STRINGS} non-empty strings")
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # --- extensions (top level; the openai client sends them through ``extra_body``)
    mode: Optional[str] = Field(None, description="decoding mode (ar, diffusion, self_spec, ...); the server default when absent")
    refine_steps: Optional[PositiveInt] = Field(None, description="diffusion: denoising steps per block")
    block_length: Optional[PositiveInt] = Field(None, description="diffusion / self_spec: block length")
    threshold: Optional[float] = Field(None, gt=0.0, le=1.0, description="diffusion: unmasking confidence threshold")
    policy: Optional[PolicyName] = Field(None, description="diffusion: unmasking policy")
    draft_length: Optional[PositiveInt] = Field(None, description="self_spec: drafted tokens per cycle")
    variant: Optional[str] = Field(None, description="self_spec: linear (draft + verify) or quadratic (one pass per cycle)")
    lookahead: Optional[bool] = Field(None, description="diffusion: each commit pass also proposes the next block")
    guess_seed: Optional[bool] = Field(None, description="diffusion with lookahead: the proposed block starts with the seed "
                                                         "guessed by the previous pass; a right guess saves a denoise pass")
    confidence: Optional[str] = Field(None, description="diffusion: what threshold compares: a proposal's probability or "
                                                        "its margin over the runner-up")
    top_k: Optional[NonNegativeInt] = Field(None, description="0 disables top-k")
    ignore_eos: Optional[bool] = None
    # --- logit controls (OpenAI's, and vLLM's repetition_penalty / min_tokens / stop_token_ids)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    min_tokens: Optional[NonNegativeInt] = None
    stop_token_ids: Optional[list[NonNegativeInt]] = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[PositiveInt] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[LogprobCount] = None


PromptField = Union[str, Annotated[list[str], Field(min_length=1)], TokenIds, Annotated[list[TokenIds], Field(min_length=1)]]


class CompletionRequest(_GenerationRequest):
    prompt: PromptField
    echo: Optional[bool] = None
    logprobs: Optional[LogprobCount] = None


GenerationRequest = Union[ChatCompletionRequest, CompletionRequest]


# --------------------------------------------------------------------------- responses


class _ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_ResponseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(_ResponseModel):
    error: ErrorDetail


class UsageInfo(_ResponseModel):
    """OpenAI usage plus forward-pass accounting (our extension)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    forward_passes: Optional[int] = None
    forward_passes_by_kind: Optional[dict[str, int]] = None
    forward_passes_by_decoder: Optional[dict[str, dict[str, int]]] = None  # decoder -> kind -> passes
    tokens_per_forward: Optional[float] = None
    mean_acceptance_length: Optional[float] = Field(None, description="self_spec only")


class TopLogprob(_ResponseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(_ResponseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(_ResponseModel):
    content: Optional[list[ChatTokenLogprob]] = None
    refusal: Optional[list[ChatTokenLogprob]] = None


class ToolCallOutFunction(_ResponseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCallOut(_ResponseModel):
    """A tool call in a response; in a stream chunk only ``index`` and the new parts are set."""

    index: Optional[int] = None
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: ToolCallOutFunction


class ChatResponseMessage(_ResponseModel):
    role: Literal["assistant"]
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallOut]] = None


class ChatChoice(_ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: FinishReasonName


class ChatCompletionResponse(_ResponseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(_ResponseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallOut]] = None


class ChatChunkChoice(_ResponseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[FinishReasonName] = None


class ChatCompletionChunk(_ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None


class CompletionLogprobs(_ResponseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: Optional[list[Optional[dict[str, float]]]] = None
    text_offset: list[int]


class CompletionChoice(_ResponseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[FinishReasonName] = None


class CompletionResponse(_ResponseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(_ResponseModel):
    """A streamed legacy-completions chunk (same ``object`` as the full response, as OpenAI does)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(_ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    max_model_len: int | None = None  # None while the model loads or the server drains


class ModelList(_ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthStatus(_ResponseModel):
    status: str


class VersionInfo(_ResponseModel):
    version: str
