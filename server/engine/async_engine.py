"""The engine thread and its asyncio bridge (implements ``EngineClient`` for the HTTP layer).

One background thread owns the model and runs ``LLMEngine.step()`` while there is work.
Other threads never touch engine state: they post commands (add, abort) to a queue that the
engine thread drains before each step, and receive outputs through per-request asyncio
queues. A failing step is logged, its requests are finished with an error, and the loop
goes on serving. If the thread itself dies (a failed load, or anything escaping the loop),
``failure`` records why, every in-flight request is finished with an error, pending adds
fail with ``EngineDeadError``, and ``on_fatal(reason)`` is called so the process can exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator

from server.engine.client import EngineDeadError
from server.engine.engine import LLMEngine
from server.engine.outputs import RequestOutput
from server.engine.params import RequestParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    """The ``EngineClient`` over an ``LLMEngine`` driven by one background thread.

    Invariants: only the engine thread touches the ``LLMEngine`` (requests and aborts reach
    it through a command queue, drained before every step); each request's outputs are
    delivered, in order, to the event loop that asked for them; a stream that ends without a
    finished output (the client went away) posts an abort, so its KV pages are freed; an
    exception in a step fails that step's requests and the loop keeps serving."""

    def __init__(
        self,
        loader: Callable[[], LLMEngine],
        model_name: str,
        tokenizer: Any = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        """``loader`` builds the LLMEngine inside the engine thread (so /ready can answer
        503 while the weights load); ``tokenizer``, if given, is usable before that;
        ``on_fatal(reason)`` is called from the engine thread once it can no longer serve."""
        self._loader = loader
        self.model_name = model_name
        self._tokenizer = tokenizer
        self.engine: LLMEngine | None = None
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._loaded = threading.Event()
        self.load_error: BaseException | None = None
        self.failure: str | None = None  # set once the engine thread has stopped for good
        self._on_fatal = on_fatal
        self.draining = False
        self.started_at = time.time()
        self.ready_at: float | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the model is loaded (or failed to load)."""
        self._loaded.wait(timeout)
        if self.load_error is not None:
            raise RuntimeError(f"model failed to load: {self.load_error}") from self.load_error
        return self.engine is not None

    def is_ready(self) -> bool:
        return self.is_healthy() and self.engine is not None and not self.draining

    def is_healthy(self) -> bool:
        """False once the engine thread failed to load or died (liveness)."""
        return self.failure is None and (self._thread is None or self._thread.is_alive() or self._stop)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    async def drain(self, timeout: float) -> bool:
        """Stop admitting, wait for in-flight requests to finish. True if all finished in time."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._streams

    # ------------------------------------------------------- engine facts
    def _require(self) -> LLMEngine:
        if self.engine is None:
            raise EngineDeadError("the model is not loaded yet")
        return self.engine

    @property
    def max_model_len(self) -> int:
        return self._require().max_model_len

    @property
    def tokenizer(self) -> Any:
        if self.engine is None and self._tokenizer is not None:
            return self._tokenizer
        return self._require().tokenizer

    @property
    def image_inputs(self) -> Any:
        """``ImageInputs`` of a vision-language model, else None."""
        return self._require().image_inputs

    def kv_pages_free(self) -> int:
        return self._require().kv.num_free_pages

    def kv_pages_total(self) -> int:
        return self._require().kv.num_pages

    # ------------------------------------------------------------- requests
    async def generate(
        self, prompt_token_ids: list[int], params: RequestParams, request_id: str, images: list[Any] | None = None
    ) -> AsyncIterator[RequestOutput]:
        if self.failure is not None:
            raise EngineDeadError(self.failure)
        if not self.is_ready():
            raise EngineDeadError("the engine is not ready")
        loop = asyncio.get_running_loop()
        out_queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        added: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._streams[request_id] = (loop, out_queue)
        self._post("add", (request_id, prompt_token_ids, params, images, added))
        finished = False
        try:
            await asyncio.wrap_future(added)  # raises ValueError / QueueFullError from add_request
            while True:
                out = await out_queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._post("abort", (request_id, "abort"))

    async def abort(self, request_id: str, reason: str = "abort") -> None:
        self._post("abort", (request_id, reason))

    def _post(self, kind: str, payload: Any) -> None:
        self._commands.put((kind, payload))
        self._wake.set()
        if self.failure is not None:  # the thread is gone: nobody else will drain the queue
            self._fail_pending_commands()

    # ---------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            self.engine = self._loader()
        except BaseException as exc:  # reported through wait_loaded, is_healthy and on_fatal
            self.load_error = exc
            self._die(f"model failed to load: {_one_line(exc)}", exc)
            self._loaded.set()
            return
        self.ready_at = time.time()
        self._loaded.set()
        try:
            self._loop(self.engine)
        except BaseException as exc:  # the thread is dying: say so instead of hanging requests
            self._die(f"engine thread died: {_one_line(exc)}", exc)

    def _loop(self, engine: LLMEngine) -> None:
        while not self._stop:
            self._drain_commands(engine)
            if not engine.has_work:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception:
                logger.exception("engine step failed; failing its requests and continuing")
                outputs = self._fail_all(engine)
            self._deliver_all(outputs)

    def _die(self, reason: str, exc: BaseException) -> None:
        """Record ``reason``, end every in-flight request with an error, notify ``on_fatal``."""
        if isinstance(exc, ValueError):  # a configuration problem: the reason says it all
            logger.debug("engine stopped", exc_info=exc)
        else:
            logger.error("engine stopped", exc_info=exc)
        self.failure = reason
        self._fail_pending_commands()
        for request_id in list(self._streams):
            self._deliver(RequestOutput(request_id, [], finished=True, finish_reason="error", error=reason))
        if self._on_fatal is not None:
            self._on_fatal(reason)

    def _pending_commands(self) -> Iterator[tuple[str, Any]]:
        """Take the queued commands, oldest first, until the queue is empty."""
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _fail_pending_commands(self) -> None:
        for kind, payload in self._pending_commands():
            if kind == "add":
                try:
                    payload[-1].set_exception(EngineDeadError(self.failure or "the engine is not running"))
                except concurrent.futures.InvalidStateError:  # already answered
                    pass

    def _drain_commands(self, engine: LLMEngine) -> None:
        for kind, payload in self._pending_commands():
            if kind == "add":
                request_id, prompt, params, images, fut = payload
                try:
                    engine.add_request(request_id, prompt, params, images)
                except Exception as exc:
                    fut.set_exception(exc)
                else:
                    fut.set_result(None)
            elif kind == "abort":
                out = engine.abort(*payload)
                if out is not None:
                    self._deliver(out)

    def _fail_all(self, engine: LLMEngine) -> list[RequestOutput]:
        outputs = []
        for request_id in list(engine.requests):
            out = engine.abort(request_id, "error")
            if out is not None:
                out.error = "internal error while running the model"
                outputs.append(out)
        return outputs

    def _deliver(self, out: RequestOutput) -> None:
        self._deliver_all([out])

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop per step, not
        one per request (each wake-up is a self-pipe write and a loop iteration that compete
        with the engine's intra-op threads for the CPU)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the client's loop is gone
                pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
