"""Running the engine requests behind one HTTP request.

``ChoiceRun`` drives one engine request (one choice): it detokenizes its outputs
incrementally, applies stop strings (aborting the engine request on a match) and reports
``ChoiceEvent``s. ``Generation`` runs the n choices of a request as tasks, merges their
events in arrival order, and on ``close`` (end, error or client disconnect) cancels what is
still running, which aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from server.api.detokenize import IncrementalDetokenizer
from server.api.errors import EngineOutputError
from server.api.prompts import Prompt
from server.api.stop import StopStringMatcher
from server.engine.client import EngineClient
from server.engine.outputs import RequestOutput, RequestStats, TokenLogprob
from server.engine.params import RequestParams

logger = logging.getLogger("server.api")

DRAIN_TIMEOUT_S = 2.0  # after aborting on a stop string: wait this long for the final stats


@dataclass(frozen=True)
class ChoiceSpec:
    """One engine request: choice ``index`` of the response."""

    index: int
    prompt: Prompt
    params: RequestParams
    request_id: str


@dataclass
class ChoiceEvent:
    """New text of one choice; ``finish_reason`` is set exactly once, on its last event."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0  # set on the finishing event
    stats: RequestStats | None = None  # set on the finishing event when the engine gave them
    error: BaseException | None = None


class ChoiceRun:
    """Consumes one engine stream and reports text deltas through ``emit``."""

    def __init__(
        self,
        engine: EngineClient,
        tokenizer: Any,
        spec: ChoiceSpec,
        stop: list[str],
        emit: Callable[[ChoiceEvent], None],
    ) -> None:
        self.engine = engine
        self.spec = spec
        self.admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._emit = emit
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = StopStringMatcher(stop)
        self._pending_logprobs: list[TokenLogprob] = []
        self._token_count = 0
        self._engine_done = False  # the engine has nothing left running for this request
        self._iterator: AsyncIterator[RequestOutput] | None = None

    def _admit(self, exc: BaseException | None = None) -> None:
        if not self.admitted.done():
            if exc is None:
                self.admitted.set_result(None)
            else:
                self.admitted.set_exception(exc)

    async def run(self) -> None:
        """Submit, consume until finished (or stopped), then release the engine request."""
        try:
            try:
                prompt = self.spec.prompt
                images = {"images": list(prompt.images)} if prompt.images else {}
                stream = self.engine.generate(prompt.token_ids, self.spec.params, self.spec.request_id, **images)
            except BaseException:
                self._engine_done = True  # never admitted: nothing to abort
                raise
            self._iterator = stream.__aiter__()
            while not self._engine_done:
                try:
                    output = await self._iterator.__anext__()
                except StopAsyncIteration:
                    self._engine_done = True
                    raise EngineOutputError("the engine stream ended without a finished output") from None
                self._admit()
                await self._process(output)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._admit(exc)
            self._emit(ChoiceEvent(self.spec.index, error=exc))
        finally:
            await self._release()

    async def _process(self, output: RequestOutput) -> None:
        if output.error is not None or output.finish_reason == "error":
            self._engine_done = output.finished
            raise EngineOutputError(output.error or "the engine failed while generating")
        new_ids = list(output.new_token_ids)
        self._token_count += len(new_ids)
        self._pending_logprobs.extend(output.new_logprobs or [])
        found = self._stop.feed(self._detok.add(new_ids))
        text, finish, stats = found.text, None, None
        if found.stopped:
            finish = "stop"
            # a diffusion block or an accepted run may go past the stop string: count only the
            # tokens up to the one that completes it
            assert self._stop.stop_end is not None
            self._token_count = min(self._token_count, self._detok.tokens_covering(self._stop.stop_end))
            if output.finished:
                self._engine_done, stats = True, output.stats
            else:
                stats = await self._abort_and_drain()
        elif output.finished:
            self._engine_done = True
            if output.finish_reason == "abort":
                raise EngineOutputError("the engine aborted the request")
            tail = self._stop.feed(self._detok.flush())
            text += tail.text + self._stop.flush()
            finish = "stop" if tail.stopped or output.finish_reason != "length" else "length"
            stats = output.stats
        if text or finish:
            logprobs, self._pending_logprobs = self._pending_logprobs, []
            completion_tokens = self._token_count if finish else 0
            self._emit(ChoiceEvent(self.spec.index, text, logprobs, finish, completion_tokens, stats))

    async def _abort_and_drain(self) -> RequestStats | None:
        """A stop string matched: abort, and read the engine's last output for its stats."""
        await self.engine.abort(self.spec.request_id, reason="stop")
        self._engine_done = True
        iterator = self._iterator
        assert iterator is not None

        async def last_stats() -> RequestStats | None:
            async for output in iterator:
                if output.finished:
                    return output.stats
            return None

        try:
            return await asyncio.wait_for(last_stats(), DRAIN_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception:
            return None

    async def _release(self) -> None:
        """Abort the engine request if it may still run; close the engine stream."""
        if not self._engine_done:
            try:
                await self.engine.abort(self.spec.request_id)
            except Exception:
                logger.exception("abort of %s failed", self.spec.request_id)
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # pragma: no cover - a broken engine stream
                logger.debug("closing the stream of %s failed", self.spec.request_id, exc_info=True)


class Generation:
    """The n choices of one HTTP request, run concurrently."""

    def __init__(self, engine: EngineClient, tokenizer: Any, specs: list[ChoiceSpec], stop: list[str]) -> None:
        self._queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue()
        self._runs = [ChoiceRun(engine, tokenizer, spec, stop, self._queue.put_nowait) for spec in specs]
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def request_ids(self) -> list[str]:
        return [run.spec.request_id for run in self._runs]

    def start(self) -> None:
        self._tasks = [asyncio.create_task(run.run(), name=run.spec.request_id) for run in self._runs]

    async def wait_admitted(self, timeout: float | None) -> None:
        """Raise the first admission failure (queue full, invalid params...) seen within
        ``timeout`` seconds; return early once every choice produced an output."""
        futures = [run.admitted for run in self._runs]
        done, _ = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        for future in futures:
            if future in done and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]

    async def events(self, keepalive_s: float | None = None) -> AsyncIterator[ChoiceEvent | None]:
        """Events until every choice finished; ``None`` after ``keepalive_s`` without one.
        Raises the error of the first choice that fails."""
        remaining = len(self._runs)
        while remaining:
            try:
                if keepalive_s:
                    event = await asyncio.wait_for(self._queue.get(), keepalive_s)
                else:
                    event = await self._queue.get()
            except asyncio.TimeoutError:
                yield None
                continue
            if event.error is not None:
                raise event.error
            if event.finish_reason is not None:
                remaining -= 1
            yield event

    async def close(self) -> None:
        """Cancel whatever still runs (its engine requests are aborted) and wait for it."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            if not task.done():
                task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for run in self._runs:
            if run.admitted.done() and not run.admitted.cancelled():
                run.admitted.exception()  # mark as retrieved
            else:
                run.admitted.cancel()
