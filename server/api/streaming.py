"""Server-sent events for streamed chat and legacy completions.

Order on the wire, per response: (chat) one role chunk per choice; content chunks, each
carrying everything one engine output made stable (a diffusion block, a self_spec run);
exactly one chunk with a ``finish_reason`` per choice; with ``include_usage`` a last chunk
with ``choices: []`` and the usage; then ``data: [DONE]``. While no output arrives for
``keepalive_s`` a ``: keep-alive`` comment line is sent. A failure after the stream began
becomes one ``data: {"error": {...}}`` frame, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.errors import from_engine_exception
from server.api.generation import ChoiceEvent, Generation
from server.api.logprobs import chat_logprobs, completion_logprobs
from server.api.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    UsageInfo,
)
from server.api.tools import ToolCallPlan, ToolCallStreamer, tool_call_deltas
from server.api.usage import build_usage
from server.engine.outputs import RequestStats

logger = logging.getLogger("server.api")

KEEPALIVE_FRAME = ": keep-alive\n\n"
DONE_FRAME = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_data(payload: BaseModel | Mapping[str, Any]) -> str:
    """One ``data:`` frame; models are dumped with only the fields that were set."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json(exclude_unset=True)
    else:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that always watches for the client going away.

    The body is streamed while ``receive`` is watched for ``http.disconnect``; whichever
    ends first cancels the other. ``on_close`` runs at the end in every case (shielded from
    cancellation), so engine requests are aborted whenever the client leaves.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(content, headers=SSE_HEADERS, media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-send
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                if self._on_close is not None:
                    await self._on_close()


@dataclass
class StreamMeta:
    """Per-response constants of a stream."""

    response_id: str
    created: int
    model: str
    mode: str
    indices: list[int]
    prompt_tokens: int
    include_usage: bool
    logprobs: int | None  # top-logprob count when logprobs were asked for
    echo_texts: dict[int, str] = field(default_factory=dict)  # completions + echo: prompt text per choice
    tool_call: ToolCallPlan | None = None  # chat: the output of every choice is a tool call


@dataclass
class _Totals:
    completion_tokens: dict[int, int] = field(default_factory=dict)
    stats: dict[int, RequestStats | None] = field(default_factory=dict)

    def add(self, event: ChoiceEvent) -> None:
        self.completion_tokens[event.index] = event.completion_tokens
        self.stats[event.index] = event.stats

    def usage(self, meta: StreamMeta) -> UsageInfo:
        return build_usage(meta.prompt_tokens, self.completion_tokens.values(), self.stats.values(), meta.mode)


def _error_frame(exc: BaseException) -> str:
    return sse_data(from_engine_exception(exc).body())


async def _with_errors(frames: AsyncIterator[str]) -> AsyncIterator[str]:
    """Append ``[DONE]``; turn a failure into an error frame first."""
    try:
        async for frame in frames:
            yield frame
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        yield _error_frame(exc)
    yield DONE_FRAME


async def _event_frames(
    generation: Generation,
    meta: StreamMeta,
    keepalive_s: float | None,
    delta_frames: Callable[[ChoiceEvent], list[str]],
    finish_frame: Callable[[ChoiceEvent], str],
    usage_frame: Callable[[UsageInfo], str],
) -> AsyncIterator[str]:
    """The frames of a stream's events, whatever the endpoint: keep-alives while waiting, the
    delta frames of each event (``delta_frames`` sees every event, finishing ones included),
    a frame per finished choice, then usage when asked for."""
    totals = _Totals()
    async for event in generation.events(keepalive_s):
        if event is None:
            yield KEEPALIVE_FRAME
            continue
        for frame in delta_frames(event):
            yield frame
        if event.finish_reason is not None:
            totals.add(event)
            yield finish_frame(event)
    if meta.include_usage:
        yield usage_frame(totals.usage(meta))


def chat_stream(generation: Generation, meta: StreamMeta, tokenizer: Any, keepalive_s: float | None) -> AsyncIterator[str]:
    """SSE frames of a streamed chat completion."""

    def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        c = ChatCompletionChunk(
            id=meta.response_id, object="chat.completion.chunk", created=meta.created, model=meta.model, choices=choices
        )
        if meta.include_usage:
            c.usage = usage
        return sse_data(c)

    calls = {index: ToolCallStreamer() for index in meta.indices} if meta.tool_call else {}

    def deltas(event: ChoiceEvent) -> list[str]:
        if calls:  # a tool-call choice streams its call's pieces, never its raw text
            parts = tool_call_deltas(calls[event.index], event, meta.tool_call)
            return [chunk([ChatChunkChoice(index=event.index, delta=d, logprobs=None, finish_reason=None)]) for d in parts]
        if not (event.text or event.logprobs):
            return []
        logprobs = chat_logprobs(tokenizer, event.logprobs, meta.logprobs) if meta.logprobs is not None else None
        content = ChatDelta(content=event.text)
        return [chunk([ChatChunkChoice(index=event.index, delta=content, logprobs=logprobs, finish_reason=None)])]

    def finish(event: ChoiceEvent) -> str:
        reason = event.finish_reason
        if calls and reason == "stop" and calls[event.index].started:
            reason = meta.tool_call.finish_reason  # type: ignore[union-attr]
        done = ChatChunkChoice(index=event.index, delta=ChatDelta(), logprobs=None, finish_reason=reason)  # type: ignore[arg-type]
        return chunk([done])

    async def frames() -> AsyncIterator[str]:
        for index in meta.indices:
            role = ChatDelta(role="assistant", content="")
            yield chunk([ChatChunkChoice(index=index, delta=role, logprobs=None, finish_reason=None)])
        async for frame in _event_frames(generation, meta, keepalive_s, deltas, finish, lambda u: chunk([], usage=u)):
            yield frame

    return _with_errors(frames())


def completion_stream(
    generation: Generation, meta: StreamMeta, tokenizer: Any, keepalive_s: float | None
) -> AsyncIterator[str]:
    """SSE frames of a streamed legacy completion."""

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        c = CompletionChunk(id=meta.response_id, object="text_completion", created=meta.created, model=meta.model, choices=choices)
        if meta.include_usage:
            c.usage = usage
        return sse_data(c)

    async def frames() -> AsyncIterator[str]:
        offsets = {index: 0 for index in meta.indices}
        for index, text in meta.echo_texts.items():
            offsets[index] = len(text)
            yield chunk([CompletionChoice(index=index, text=text, logprobs=None, finish_reason=None)])
        def deltas(event: ChoiceEvent) -> list[str]:
            if not (event.text or event.logprobs):
                return []
            logprobs = None
            if meta.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, event.logprobs, meta.logprobs, offsets[event.index])
            offsets[event.index] += len(event.text)
            return [chunk([CompletionChoice(index=event.index, text=event.text, logprobs=logprobs, finish_reason=None)])]

        def finish(event: ChoiceEvent) -> str:
            return chunk([CompletionChoice(index=event.index, text="", logprobs=None, finish_reason=event.finish_reason)])  # type: ignore[arg-type]

        async for frame in _event_frames(generation, meta, keepalive_s, deltas, finish, lambda u: chunk([], usage=u)):
            yield frame

    return _with_errors(frames())
