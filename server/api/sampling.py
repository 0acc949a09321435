"""From a validated request to engine ``RequestParams``.

Every option must be honoured or refused: an OpenAI field this server does not implement
is a 400 naming that field. Range checks are the engine's own (``server/engine/params.py``);
whether the chosen mode honours a field, and the defaults of the fields left out, are
decided once, when the engine resolves the request (``server/engine/modes/registry.py``).
Both raise ``ParamError``, which names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from server.api.errors import bad_request
from server.api.protocol import MAX_STOP_STRINGS, ChatCompletionRequest, GenerationRequest
from server.api.structured import grammar_of_response_format
from server.api.tools import ToolCallPlan, plan_tool_call
from server.engine.modes import get_mode
from server.engine.params import DecodeParams, LogitControls, ParamError, RequestParams, SamplingParams

# OpenAI fields this server does not implement, with the value that means "not used".
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "functions": ([],),
    "function_call": ("none",),
    "suffix": ("",),
    "best_of": (1,),
}

SEED_MODULUS = 2**63


@dataclass(frozen=True)
class GenerationOptions:
    """What the HTTP layer needs besides the engine params."""

    mode: str
    params: RequestParams  # for choice 0; see ``params_for_choice``
    stop: list[str]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # top-logprob count when logprobs were asked for, else None
    echo: bool
    tool_call: ToolCallPlan | None = None  # the output is a (constrained) tool call


def _check_unsupported(request: GenerationRequest) -> None:
    extra = request.model_extra or {}
    for name, neutral in UNSUPPORTED_FIELDS.items():
        value = extra.get(name)
        if value is not None and not any(value == v for v in neutral):
            raise bad_request(f"'{name}' is not supported by this server.", param=name)


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"At most {MAX_STOP_STRINGS} stop strings are allowed.", param="stop")
    if any(s == "" for s in stops):
        raise bad_request("Stop strings must not be empty.", param="stop")
    return stops


def _logprobs_count(request: GenerationRequest) -> int | None:
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("'top_logprobs' requires 'logprobs': true.", param="top_logprobs")
        return (request.top_logprobs or 0) if request.logprobs else None
    return request.logprobs


def _logit_bias(raw: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI sends token ids as the object's keys (strings)."""
    out = []
    for key, bias in (raw or {}).items():
        if not key.isascii() or not key.isdigit():
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}.", param="logit_bias")
        out.append((int(key), float(bias)))
    return tuple(out)


def logit_controls(request: GenerationRequest) -> LogitControls:
    """The request's penalties, logit_bias and min_tokens (absent = neutral)."""
    return LogitControls(
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
        logit_bias=_logit_bias(request.logit_bias),
        min_tokens=request.min_tokens or 0,
    )


def build_options(
    request: GenerationRequest,
    *,
    max_tokens: int,
    default_mode: str,
) -> GenerationOptions:
    """Check the request and build the engine parameters (400 on refusal)."""
    _check_unsupported(request)
    extra = request.model_extra or {}
    tool_call = None
    if isinstance(request, ChatCompletionRequest):
        tool_call = plan_tool_call(extra.get("tools"), extra.get("tool_choice"), extra.get("response_format"))
    elif extra.get("tools") or extra.get("tool_choice") not in (None, "none"):
        raise bad_request("'tools' are a chat completions field.", param="tools")
    mode = request.mode or default_mode
    stops = _stop_strings(request.stop)
    logprobs = _logprobs_count(request)
    echo = bool(getattr(request, "echo", None))
    if echo and logprobs is not None:
        raise bad_request("'echo' together with 'logprobs' is not supported (no prompt logprobs).", param="echo")
    try:
        get_mode(mode)
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=request.top_k or 0,
            seed=request.seed,
            ignore_eos=bool(request.ignore_eos),
            logprobs=logprobs,
            stop_token_ids=tuple(request.stop_token_ids or ()),
            controls=logit_controls(request),
            grammar=tool_call.grammar if tool_call else grammar_of_response_format(extra.get("response_format")),
        )
        decode = DecodeParams.from_fields(mode, request)
    except ParamError as exc:
        param = exc.param
        if param == "logprobs" and isinstance(request, ChatCompletionRequest):
            param = "top_logprobs"  # the chat field that carries the count
        raise bad_request(str(exc), param=param) from exc
    stream_options = request.stream_options
    if stream_options is not None and not request.stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    return GenerationOptions(
        mode=mode,
        params=RequestParams(sampling=sampling, decode=decode),
        stop=stops,
        n=request.n or 1,
        stream=bool(request.stream),
        include_usage=bool(stream_options and stream_options.include_usage),
        logprobs=logprobs,
        echo=echo,
        tool_call=tool_call,
    )


def params_for_choice(params: RequestParams, choice: int) -> RequestParams:
    """Choice ``i`` of an ``n > 1`` request: its own seed derived from the request's seed."""
    seed = params.sampling.seed
    if seed is None or choice == 0:
        return params
    return replace(params, sampling=replace(params.sampling, seed=(seed + choice) % SEED_MODULUS))


def requested_max_tokens(request: GenerationRequest) -> int | None:
    """``max_completion_tokens`` (chat, preferred) or ``max_tokens``."""
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return request.max_completion_tokens
    return request.max_tokens


__all__ = [
    "GenerationOptions",
    "build_options",
    "params_for_choice",
    "requested_max_tokens",
]
