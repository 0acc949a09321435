"""The engine thread and its asyncio bridge (implements ``EngineClient`` for the HTTP layer).

One background thread owns the model and runs ``LLMEngine.step()`` while there is work.
Other threads never touch engine state: they post commands (add, abort) to a queue that the
engine thread drains before each step, and receive outputs through per-request asyncio
queues. A failing step is logged, its requests are finished with an error, and the loop
goes on serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable

from server.engine.client import EngineDeadError
from server.engine.engine import LLMEngine
from server.engine.outputs import RequestOutput
from server.engine.params import RequestParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, loader: Callable[[], LLMEngine], model_name: str, tokenizer: Any = None) -> None:
        """``loader`` builds the LLMEngine inside the engine thread (so /ready can answer
        503 while the weights load); ``tokenizer``, if given, is usable before that."""
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
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self.engine is not None and not self.draining

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
    def block_size(self) -> int:
        return self._require().model_config.block_size

    @property
    def tokenizer(self) -> Any:
        if self.engine is None and self._tokenizer is not None:
            return self._tokenizer
        return self._require().tokenizer

    @property
    def image_inputs(self) -> Any:
        """``ImageInputs`` of a vision-language model, else None."""
        return self._require().image_inputs

    @property
    def is_diffusion(self) -> bool:
        return self._require().model_config.is_diffusion

    def kv_pages_free(self) -> int:
        return self._require().kv.num_free_pages

    def kv_pages_total(self) -> int:
        return self._require().kv.num_pages

    # ------------------------------------------------------------- requests
    async def generate(
        self, prompt_token_ids: list[int], params: RequestParams, request_id: str, images: list[Any] | None = None
    ) -> AsyncIterator[RequestOutput]:
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

    # ---------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            self.engine = self._loader()
        except BaseException as exc:  # reported through wait_loaded / is_ready
            logger.exception("model load failed")
            self.load_error = exc
            self._loaded.set()
            return
        self.ready_at = time.time()
        self._loaded.set()
        engine = self.engine
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
            for out in outputs:
                self._deliver(out)

    def _drain_commands(self, engine: LLMEngine) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
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
        target = self._streams.get(out.request_id)
        if target is None:
            return
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, out)
        except RuntimeError:  # the client's loop is gone
            pass
