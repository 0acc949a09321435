"""``create_app``: the FastAPI application around an ``EngineClient``.

``app.state`` holds ``engine`` (the EngineClient), ``settings`` (ServerSettings),
``metrics_registry`` (what /metrics exposes), ``draining`` (bool) and ``begin_drain()``
(sets ``draining``: /ready and new generation requests then answer 503).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import prometheus_client
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from fastapi.responses import JSONResponse, Response

from server.api.errors import APIError, install_error_handlers
from server.api.images import ImageLimits
from server.api.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from server.api.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthStatus,
    ModelCard,
    ModelList,
    VersionInfo,
)
from server.api.serving import resolve_model, serve_generation_safely
from server.api.settings import ServerSettings
from server.engine.client import EngineClient

logger = logging.getLogger("server.api")

OWNED_BY = "nld-server"

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    500: {"model": ErrorResponse, "description": "Internal error"},
    503: {"model": ErrorResponse, "description": "Queue full or draining (see Retry-After)"},
}


_STREAM_MODELS = (ChatCompletionChunk, CompletionChunk, ErrorResponse)


def _sse_event_schema(chunk_model: type) -> dict[str, Any]:
    """One server-sent event: ``data`` is a JSON chunk, an error object, or ``[DONE]``."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (chunk_model, ErrorResponse)]}
    return {
        "type": "object",
        "description": "one server-sent event (stream: true)",
        "properties": {
            "data": {
                "anyOf": [
                    {"type": "string", "const": "[DONE]"},
                    {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
                ]
            },
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
        },
        "required": ["data"],
    }


def _generation_responses(model: type, chunk_model: type) -> dict[int | str, dict[str, Any]]:
    stream = {"text/event-stream": {"schema": _sse_event_schema(chunk_model)}}
    return {200: {"model": model, "content": stream, "description": "JSON, or SSE when stream is true"}, **_ERRORS}


def _engine_says(engine: EngineClient, question: str) -> bool:
    """``engine.is_ready()`` / ``engine.is_healthy()``, False if asking fails."""
    try:
        return bool(getattr(engine, question)())
    except Exception:
        logger.exception("engine.%s() failed", question)
        return False


def _is_ready(engine: EngineClient) -> bool:
    return _engine_says(engine, "is_ready")


def _is_healthy(engine: EngineClient) -> bool:
    return _engine_says(engine, "is_healthy")


def _bound_token_ids(node: Any, vocab_size: int) -> None:
    """Give every integer (token id) inside a prompt schema the vocabulary's upper bound."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = vocab_size - 1
        for value in node.values():
            _bound_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, vocab_size)


def _install_openapi(app: FastAPI, served_model_names: tuple[str, ...], engine: EngineClient) -> None:
    """The generated OpenAPI schema, with ``model`` restricted to the served names, prompt
    token ids to the vocabulary, and the stream chunk models added for the SSE schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            _, stream_defs = models_json_schema(
                [(m, "serialization") for m in _STREAM_MODELS], ref_template="#/components/schemas/{model}"
            )
            for name, definition in stream_defs.get("$defs", {}).items():
                components.setdefault(name, definition)
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                model_field = components.get(name, {}).get("properties", {}).get("model")
                if model_field is not None:
                    model_field["enum"] = list(served_model_names)
            prompt_field = components.get("CompletionRequest", {}).get("properties", {}).get("prompt")
            if prompt_field is not None and engine.tokenizer is not None:
                _bound_token_ids(prompt_field, len(engine.tokenizer))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    engine: EngineClient,
    *,
    served_model_names: list[str],
    api_key: str | None,
    default_mode: str,
    max_body_bytes: int,
    metrics_registry: prometheus_client.CollectorRegistry | None = None,
    version: str,
    keepalive_s: float = 10.0,
    default_max_tokens: int = 4096,
    image_limits: ImageLimits | None = None,
) -> FastAPI:
    """Build the OpenAI-compatible app serving ``engine``.

    ``served_model_names`` are the names a request's ``model`` may use (the engine's
    ``model_name`` when empty); ``api_key`` guards ``/v1/*`` when set; ``default_mode``
    applies when a request gives none (knob defaults are the engine's); ``keepalive_s`` is the SSE
    keep-alive interval; ``default_max_tokens`` caps the default completion budget;
    ``image_limits`` bounds image inputs (and allows fetching image URLs).
    """
    settings = ServerSettings(
        served_model_names=tuple(served_model_names or [engine.model_name]),
        api_key=api_key or None,
        default_mode=default_mode,
        max_body_bytes=max_body_bytes,
        version=version,
        keepalive_s=keepalive_s,
        default_max_tokens=default_max_tokens,
        image_limits=image_limits or ImageLimits(),
    )
    app = FastAPI(title="nld-server", version=version, description="OpenAI-compatible tri-mode diffusion LM server")
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics_registry = metrics_registry if metrics_registry is not None else prometheus_client.REGISTRY
    app.state.draining = False

    def begin_drain() -> None:
        """Stop accepting work: /ready and new generation requests answer 503."""
        app.state.draining = True

    app.state.begin_drain = begin_drain
    install_error_handlers(app)
    # Added innermost first: RequestId wraps ApiKey wraps BodyLimit wraps the routes.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(RequestIdMiddleware)
    created = int(time.time())

    def card(name: str) -> ModelCard:
        max_len = engine.max_model_len if _is_ready(engine) else None
        return ModelCard(id=name, created=created, owned_by=OWNED_BY, root=engine.model_name, max_model_len=max_len)

    @app.post(
        "/v1/chat/completions", response_model=None, responses=_generation_responses(ChatCompletionResponse, ChatCompletionChunk),
        tags=["openai"],
    )
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        """Chat completion (set ``stream`` for SSE). Extensions: mode, refine_steps, ..."""
        return await serve_generation_safely(request, body)

    @app.post(
        "/v1/completions", response_model=None, responses=_generation_responses(CompletionResponse, CompletionChunk), tags=["openai"]
    )
    async def completions(request: Request, body: CompletionRequest) -> Response:
        """Legacy text completion (set ``stream`` for SSE)."""
        return await serve_generation_safely(request, body)

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]}, tags=["openai"])
    async def list_models() -> ModelList:
        return ModelList(data=[card(name) for name in settings.served_model_names])

    @app.get(
        "/v1/models/{model_id:path}", response_model=ModelCard, responses={401: _ERRORS[401], 404: _ERRORS[404]},
        tags=["openai"],
    )
    async def get_model(model_id: str) -> ModelCard:
        return card(resolve_model(settings, model_id))

    @app.get(
        "/health", response_model=HealthStatus, tags=["ops"],
        responses={503: {"model": HealthStatus, "description": "The engine failed and cannot serve"}},
    )
    async def health() -> Response:
        """Liveness: 200 while the engine can serve (or is still loading); 503 once it failed."""
        if not _is_healthy(engine):
            return JSONResponse({"status": "failed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get(
        "/ready", response_model=HealthStatus, tags=["ops"],
        responses={503: {"model": HealthStatus, "description": "Not ready, or draining"}},
    )
    async def ready() -> Response:
        """Readiness: 200 only when the engine is ready and the server is not draining."""
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "1"})
        if not _is_ready(engine):
            return JSONResponse({"status": "not_ready"}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready"})

    @app.get(
        "/metrics", response_class=Response, tags=["ops"],
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}},
    )
    async def metrics() -> Response:
        registry = app.state.metrics_registry
        return Response(prometheus_client.generate_latest(registry), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/version", response_model=VersionInfo, tags=["ops"])
    async def get_version() -> VersionInfo:
        return VersionInfo(version=version)

    _install_openapi(app, settings.served_model_names, engine)
    return app


__all__ = ["create_app", "APIError"]
