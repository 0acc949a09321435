"""HTTP side of the load generator: one streamed request, model discovery, /metrics scrape.

Works against any OpenAI-compatible server (ours, vLLM, SGLang, ...). Timing follows
``vllm bench serve``: TTFT = send -> first chunk with non-empty content; ITL = gaps
between consecutive content-bearing chunks (a multi-token chunk counts once).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from server.bench.prompts import Prompt


@dataclass
class RequestResult:
    index: int  # prompt index (position in the run's prompt sequence)
    prompt_id: int  # index into the prompt set (same prompt -> same id across runs)
    ok: bool = False
    error: str | None = None
    text: str = ""
    start: float = 0.0  # send time, seconds since the run started
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    chunks: int = 0  # content-bearing chunks
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    @property
    def output_tokens(self) -> int:
        u = self.usage or {}
        n = u.get("completion_tokens")
        return int(n) if isinstance(n, (int, float)) else self.chunks

    @property
    def output_tokens_from_usage(self) -> bool:
        return isinstance((self.usage or {}).get("completion_tokens"), (int, float))

    @property
    def prompt_tokens(self) -> int | None:
        n = (self.usage or {}).get("prompt_tokens")
        return int(n) if isinstance(n, (int, float)) else None

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        if self.ttft is None or n < 2:
            return None
        return (self.e2e - self.ttft) / (n - 1)


def normalize_base_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL with a path is kept as is."""
    url = url.rstrip("/")
    u = httpx.URL(url)
    if u.path in ("", "/"):
        url = url + "/v1"
    return url


def default_metrics_url(base_url: str) -> str:
    u = httpx.URL(base_url)
    path = u.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return str(u.copy_with(path=path + "/metrics", query=None))


def build_body(endpoint: str, model: str, prompt: Prompt, max_tokens: int, temperature: float,
               ignore_eos: bool, extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model}
    if endpoint == "chat":
        body["messages"] = prompt.chat_messages()
    else:
        body["prompt"] = prompt.text()
    body["max_tokens"] = prompt.max_tokens or max_tokens
    body["temperature"] = temperature
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra)
    return body


def _chunk_text(choice: dict[str, Any]) -> str:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        c = delta.get("content")
        return c if isinstance(c, str) else ""
    t = choice.get("text")  # completions endpoint
    return t if isinstance(t, str) else ""


async def stream_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str],
                         result: RequestResult, t_run0: float) -> RequestResult:
    """Send one streaming request and fill ``result`` (never raises for server errors)."""
    pieces: list[str] = []
    t0 = time.perf_counter()
    result.start = t0 - t_run0
    last: float | None = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                raw = (await resp.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {resp.status_code}: {raw[:300]}"
                result.e2e = time.perf_counter() - t0
                return result
            done = False
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, ': keep-alive' comments, event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    result.error = f"invalid SSE data: {data[:200]}"
                    break
                if isinstance(obj, dict) and obj.get("error"):
                    err = obj["error"]
                    result.error = "stream error: " + (err.get("message", str(err)) if isinstance(err, dict) else str(err))
                    continue
                if obj.get("usage"):
                    result.usage = obj["usage"]
                for choice in obj.get("choices") or []:
                    text = _chunk_text(choice)
                    if text:
                        now = time.perf_counter()
                        if result.ttft is None:
                            result.ttft = now - t0
                        else:
                            result.itls.append(now - last)  # type: ignore[operator]
                        last = now
                        result.chunks += 1
                        pieces.append(text)
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
            if not done and result.error is None:
                result.error = "stream ended without [DONE]"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    result.e2e = time.perf_counter() - t0
    result.text = "".join(pieces)
    result.ok = result.error is None
    return result


async def discover_model(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> str:
    resp = await client.get(base_url + "/models", headers=headers)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/models lists no model; pass --model")
    return str(data[0]["id"])


async def scrape_metrics(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> dict[tuple, float] | None:
    """Samples of a Prometheus text exposition, keyed by (name, sorted labels); None if
    the endpoint is absent or unreadable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = await client.get(url, headers=headers)
        if resp.status_code != 200:
            return None
        out: dict[tuple, float] = {}
        for fam in text_string_to_metric_families(resp.text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return out
    except (httpx.HTTPError, ValueError):
        return None
