"""A tiny fake OpenAI-compatible server for the bench tests (fixtures in conftest.py).

It streams deterministic chat-completion chunks whose shape depends on the request's
``mode`` (ar: one token a chunk; diffusion: blocks of 4; self_spec: 3 a chunk) and reports
the usage extension (``tokens_per_forward``, ``forward_passes``, ``mean_acceptance_length``)
unless built with ``usage_extension=False``; then TPF is only visible on ``/metrics``, which
is rendered by the real :class:`server.metrics.Metrics`.

diffusion with ``refine_steps`` < 4 corrupts the last token of some answers (rs=1: every
answer, rs=2: answers of even prompts), so agreement with AR drops as refine_steps drops.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import zlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

BLOCK = 4


def stable_hash(s: str) -> int:
    return zlib.crc32(s.encode("utf-8"))


def answer_tokens(prompt: str, max_tokens: int) -> list[str]:
    h = stable_hash(prompt)
    n = min(max_tokens, 8 + h % 5)
    return [f"w{(h + 7 * i) % 97} " for i in range(n)]


def plan(prompt: str, body: dict[str, Any]) -> tuple[list[str], list[str], dict[str, Any], dict[str, Any]]:
    """(tokens, chunks, usage extension, stats fields) for one request."""
    mode = body.get("mode", "ar")
    max_tokens = int(body.get("max_tokens") or 16)
    toks = answer_tokens(prompt, max_tokens)
    n = len(toks)
    ext: dict[str, Any] = {}
    fwd = {"prefill": 1}
    if mode == "ar":
        chunks = toks
        fwd["decode"] = n - 1
    elif mode == "diffusion":
        rs = body.get("refine_steps") or BLOCK
        if rs == 1 or (rs == 2 and stable_hash(prompt) % 2 == 0):
            toks = toks[:-1] + ["zzz "]
        chunks = ["".join(toks[i:i + BLOCK]) for i in range(0, n, BLOCK)]
        blocks = len(chunks)
        fwd["denoise"] = blocks * min(rs, BLOCK)
        fwd["commit"] = blocks
    elif mode == "self_spec":
        chunks = ["".join(toks[i:i + 3]) for i in range(0, n, 3)]
        fwd["draft"] = len(chunks)
        fwd["verify"] = len(chunks)
        ext["mean_acceptance_length"] = n / len(chunks)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    passes = sum(fwd.values())
    ext["tokens_per_forward"] = n / passes
    ext["forward_passes"] = passes
    return toks, chunks, ext, {"mode": mode, "forward_passes": fwd, "n": n,
                               "acceptance": [3] * len(chunks) if mode == "self_spec" else [],
                               "denoise": [min(body.get("refine_steps") or BLOCK, BLOCK)] * len(chunks)
                               if mode == "diffusion" else []}


def make_app(usage_extension: bool = True):
    from server.engine.modes import work_kind_names
    from server.engine.outputs import RequestStats
    from server.metrics import CONTENT_TYPE, Metrics

    app = FastAPI()
    metrics = Metrics("fake-model")
    app.state.metrics = metrics
    app.state.requests = []

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "test"}]}

    @app.get("/metrics")
    async def prom():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.requests.append(body)
        prompt = body["messages"][-1]["content"]
        try:
            toks, chunks, ext, st = plan(prompt, body)
        except ValueError as e:
            return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error",
                                           "param": "mode", "code": "invalid_value"}}, status_code=400)
        arrival = time.time()
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(toks),
                 "total_tokens": len(prompt.split()) + len(toks)}
        if usage_extension:
            usage.update(ext)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(arrival),
                "model": body.get("model", "fake-model")}

        def frame(obj: dict[str, Any]) -> bytes:
            return f"data: {json.dumps(obj)}\n\n".encode()

        async def gen():
            emissions = []
            yield frame({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
            for c in chunks:
                await asyncio.sleep(0.002)
                emissions.append(time.time())
                yield frame({**base, "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]})
            yield frame({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            if include_usage:
                yield frame({**base, "choices": [], "usage": usage})
            fp = {k: 0 for k in work_kind_names()}
            fp.update(st["forward_passes"])
            metrics.on_request_finished(RequestStats(
                mode=st["mode"], prompt_tokens=usage["prompt_tokens"], completion_tokens=st["n"],
                forward_passes=fp, acceptance_lengths=st["acceptance"], denoise_steps_per_block=st["denoise"],
                arrival_time=arrival, first_scheduled_time=arrival, prefill_done_time=arrival,
                first_token_time=emissions[0], finished_time=emissions[-1], emission_times=emissions,
                model="fake-model"), "length")
            yield b"data: [DONE]\n\n"  # after recording, so a scrape after [DONE] sees it

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


class ServerThread:
    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
