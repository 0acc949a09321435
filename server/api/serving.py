"""The two generation endpoints: request -> engine requests -> OpenAI response or SSE stream."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.api.disconnect import ClientDisconnected, cancel_on_disconnect
from server.api.errors import APIError, bad_request, from_engine_exception, internal_error, service_unavailable
from server.api.generation import ChoiceSpec, Generation
from server.api.images import chat_prompt_with_images, image_parts, prepare_images
from server.api.logprobs import chat_logprobs, completion_logprobs
from server.api.prompts import Prompt, completion_prompts, resolve_max_tokens
from server.api.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    GenerationRequest,
)
from server.api.sampling import GenerationOptions, build_options, params_for_choice, requested_max_tokens
from server.api.settings import ServerSettings
from server.api.tools import chat_message
from server.api.streaming import EventStreamResponse, StreamMeta, chat_stream, completion_stream
from server.api.usage import build_usage
from server.engine.client import EngineClient
from server.engine.outputs import RequestStats, TokenLogprob

logger = logging.getLogger("server.api")


@dataclass
class _ChoiceResult:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "stop"
    completion_tokens: int = 0
    stats: RequestStats | None = None


def resolve_model(settings: ServerSettings, name: str | None) -> str:
    """The served name the request asked for (the first served name when it names none, as
    this server serves one model); 404 ``model_not_found`` otherwise."""
    if name is None:
        return settings.served_model_names[0]
    if name in settings.served_model_names:
        return name
    raise APIError(
        404,
        f"The model '{name}' does not exist; served models: {', '.join(settings.served_model_names)}.",
        param="model",
        code="model_not_found",
    )


async def _close_shielded(generation: Generation) -> None:
    with anyio.CancelScope(shield=True):
        await generation.close()


async def _collect(generation: Generation) -> dict[int, _ChoiceResult]:
    results: dict[int, _ChoiceResult] = {}
    async for event in generation.events():
        assert event is not None
        result = results.setdefault(event.index, _ChoiceResult())
        result.text.append(event.text)
        result.logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            result.finish_reason = event.finish_reason
            result.completion_tokens = event.completion_tokens
            result.stats = event.stats
    return results


@dataclass
class _Plan:
    """Everything decided before the engine is called."""

    is_chat: bool
    model: str
    response_id: str
    created: int
    prompts: list[Prompt]
    options: GenerationOptions
    specs: list[ChoiceSpec]


def _plan(request: GenerationRequest, engine: EngineClient, settings: ServerSettings, images: list | None = None) -> _Plan:
    model = resolve_model(settings, request.model)
    is_chat = isinstance(request, ChatCompletionRequest)
    tokenizer = engine.tokenizer
    if is_chat:
        image_inputs = getattr(engine, "image_inputs", None)
        prompts = [chat_prompt_with_images(tokenizer, request, image_inputs, images or [])]  # type: ignore[arg-type]
    else:
        prompts = completion_prompts(tokenizer, request)  # type: ignore[arg-type]
    prompt_param = "messages" if is_chat else "prompt"
    requested = requested_max_tokens(request)
    per_prompt = [
        build_options(
            request,
            max_tokens=resolve_max_tokens(
                requested, len(p.token_ids), engine.max_model_len, settings.default_max_tokens, prompt_param
            ),
            default_mode=settings.default_mode,
        )
        for p in prompts
    ]
    options = per_prompt[0]
    if len(prompts) * options.n > settings.max_choices:
        raise bad_request(f"At most {settings.max_choices} choices (prompts x n) per request.", param="n")
    response_id = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}"
    specs = []
    for p, (prompt, opts) in enumerate(zip(prompts, per_prompt)):
        for i in range(options.n):
            index = p * options.n + i
            specs.append(ChoiceSpec(index, prompt, params_for_choice(opts.params, i), f"{response_id}-{index}"))
    return _Plan(is_chat, model, response_id, int(time.time()), prompts, options, specs)


def _stream_meta(plan: _Plan) -> StreamMeta:
    echo = {s.index: s.prompt.text for s in plan.specs} if plan.options.echo else {}
    return StreamMeta(
        response_id=plan.response_id,
        created=plan.created,
        model=plan.model,
        mode=plan.options.mode,
        indices=[s.index for s in plan.specs],
        prompt_tokens=sum(len(p.token_ids) for p in plan.prompts),
        include_usage=plan.options.include_usage,
        logprobs=plan.options.logprobs,
        echo_texts=echo,
        tool_call=plan.options.tool_call,
    )


def _response(plan: _Plan, results: dict[int, _ChoiceResult], tokenizer: Any) -> dict[str, Any]:
    usage = build_usage(
        sum(len(p.token_ids) for p in plan.prompts),
        (r.completion_tokens for r in results.values()),
        (r.stats for r in results.values()),
        plan.options.mode,
    )
    top_n = plan.options.logprobs
    if plan.is_chat:
        chat_choices = []
        for index, r in sorted(results.items()):
            message, finish = chat_message("".join(r.text), r.finish_reason, plan.options.tool_call)
            chat_choices.append(ChatChoice(
                index=index,
                message=message,
                logprobs=chat_logprobs(tokenizer, r.logprobs, top_n) if top_n is not None else None,
                finish_reason=finish,  # type: ignore[arg-type]
            ))
        body: Any = ChatCompletionResponse(
            id=plan.response_id, object="chat.completion", created=plan.created, model=plan.model,
            choices=chat_choices, usage=usage,
        )
    else:
        prompt_of = {s.index: s.prompt for s in plan.specs}
        choices = []
        for index, r in sorted(results.items()):
            prefix = prompt_of[index].text if plan.options.echo else ""
            logprobs = completion_logprobs(tokenizer, r.logprobs, top_n, len(prefix)) if top_n is not None else None
            choices.append(
                CompletionChoice(index=index, text=prefix + "".join(r.text), logprobs=logprobs, finish_reason=r.finish_reason)  # type: ignore[arg-type]
            )
        body = CompletionResponse(
            id=plan.response_id, object="text_completion", created=plan.created, model=plan.model,
            choices=choices, usage=usage,
        )
    return body.model_dump(mode="json", exclude_unset=True)


async def serve_generation(http_request: Request, request: GenerationRequest) -> Response:
    """Serve ``/v1/chat/completions`` or ``/v1/completions``."""
    state = http_request.app.state
    settings: ServerSettings = state.settings
    engine: EngineClient = state.engine
    if state.draining:
        raise service_unavailable("The server is shutting down and accepts no new requests.", code="draining")
    if not engine.is_ready():
        raise service_unavailable("The model is still loading; retry shortly.", code="loading")
    resolve_model(settings, request.model)
    images = []
    if isinstance(request, ChatCompletionRequest) and image_parts(request):
        # decoding and resizing are CPU work: off the event loop
        images = await anyio.to_thread.run_sync(
            prepare_images, request, getattr(engine, "image_inputs", None), settings.image_limits
        )
    plan = _plan(request, engine, settings, images)
    logger.info(
        "request %s -> %s mode=%s choices=%d stream=%s",
        getattr(http_request.state, "request_id", "-"), plan.response_id, plan.options.mode,
        len(plan.specs), plan.options.stream,
    )
    generation = Generation(engine, engine.tokenizer, plan.specs, plan.options.stop)
    generation.start()
    if plan.options.stream:
        try:
            await generation.wait_admitted(settings.keepalive_s)
        except BaseException as exc:
            await _close_shielded(generation)
            if not isinstance(exc, Exception):
                raise
            raise from_engine_exception(exc) from exc
        meta = _stream_meta(plan)
        make_stream = chat_stream if plan.is_chat else completion_stream
        return EventStreamResponse(
            make_stream(generation, meta, engine.tokenizer, settings.keepalive_s), on_close=generation.close
        )
    try:
        results = await cancel_on_disconnect(http_request.receive, _collect(generation))
    except ClientDisconnected:
        logger.info("client of %s disconnected; aborted", plan.response_id)
        return Response(status_code=499)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise from_engine_exception(exc) from exc
    finally:
        await _close_shielded(generation)
    return JSONResponse(_response(plan, results, engine.tokenizer))


async def serve_generation_safely(http_request: Request, request: GenerationRequest) -> Response:
    """``serve_generation`` with unexpected faults logged and answered as a plain 500."""
    try:
        return await serve_generation(http_request, request)
    except APIError:
        raise
    except Exception:
        logger.exception("internal error serving %s", http_request.url.path)
        raise internal_error() from None
