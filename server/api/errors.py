"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

``APIError`` is raised anywhere in the HTTP layer; the handlers installed by
``install_error_handlers`` turn it, FastAPI's validation errors, Starlette's HTTP errors
and unexpected exceptions into that shape. ``code`` is always a string slug or null.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.client import EngineDeadError, QueueFullError

logger = logging.getLogger("server.api")

RETRY_AFTER_S = "1"


class EngineOutputError(RuntimeError):
    """The engine ended a request with an error output, or aborted it on its own."""


class APIError(Exception):
    """An error answered to the client with ``status`` and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def service_unavailable(message: str, code: str = "service_unavailable") -> APIError:
    """503 with Retry-After: the client should come back shortly."""
    return APIError(503, message, type="service_unavailable_error", code=code, headers={"Retry-After": RETRY_AFTER_S})


def internal_error(message: str = "The server had an internal error while processing the request.") -> APIError:
    """500: a real fault; the message is deliberately generic."""
    return APIError(500, message, type="internal_server_error", code="internal_error")


# Names the engine's ValueError messages start with / mention, mapped to request fields.
_VALUE_ERROR_PARAMS: tuple[tuple[str, str], ...] = (
    ("unmasking policy", "policy"),
    ("unknown mode", "mode"),
    ("max_tokens", "max_tokens"),
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("logprobs", "logprobs"),
    ("seed", "seed"),
    ("refine_steps", "refine_steps"),
    ("block_length", "block_length"),
    ("draft_length", "draft_length"),
    ("threshold", "threshold"),
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("repetition_penalty", "repetition_penalty"),
    ("logit_bias", "logit_bias"),
    ("min_tokens", "min_tokens"),
    ("stop_token_ids", "stop_token_ids"),
    ("response_format", "response_format"),
)


def param_of_value_error(message: str) -> str | None:
    """The request field a parameter ``ValueError`` message is about (the first one named)."""
    best: tuple[int, str] | None = None
    for needle, param in _VALUE_ERROR_PARAMS:
        match = re.search(rf"\b{re.escape(needle)}\b", message)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), param)
    return best[1] if best else None


def from_engine_exception(exc: BaseException) -> APIError:
    """Map an exception raised while submitting to / streaming from the engine."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return service_unavailable(str(exc) or "The request queue is full; retry later.", code="queue_full")
    if isinstance(exc, ValueError):
        return bad_request(str(exc), param=param_of_value_error(str(exc)))
    if isinstance(exc, EngineOutputError):
        logger.error("engine reported a failure: %s", exc)
        return APIError(500, f"The engine failed to generate: {exc}", type="internal_server_error", code="engine_error")
    if isinstance(exc, EngineDeadError):
        logger.error("engine is dead: %s", exc)
        return internal_error("The inference engine is not running.")
    logger.error("internal error while generating", exc_info=(type(exc), exc, exc.__traceback__))
    return internal_error()


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "function"}


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``; union tags dropped."""
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(item, int):
            if parts:
                parts.append(f"[{item}]")
        elif isinstance(item, str) and re.fullmatch(r"[a-z_][a-z0-9_]*", item) and item not in _TYPE_TAGS:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return bad_request("The request body is not valid JSON.", code="invalid_json")
    first = errors[0] if errors else {}
    param = _param_from_loc(tuple(first.get("loc", ())))
    if param is None and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return bad_request("The request body must be a JSON object with the required fields.")
    detail = "; ".join(sorted({f"{_param_from_loc(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[:4]}))
    return bad_request(f"Invalid request: {detail}", param=param)


async def _handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _validation_error(exc).response()


_HTTP_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


async def _handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 404:
        message = f"Unknown route: {request.method} {request.url.path}"
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    kind = "invalid_request_error" if status < 500 else "internal_server_error"
    err = APIError(status, message, type=kind, code=_HTTP_CODES.get(status), headers=exc.headers or {})
    return err.response()


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return internal_error().response()


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape (and 400, not 422, for validation)."""
    app.add_exception_handler(APIError, _handle_api_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(Exception, _handle_unexpected)
