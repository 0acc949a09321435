"""Plain ASGI middlewares: request ids, API-key check, request-body size limit.

They are plain ASGI (not ``BaseHTTPMiddleware``) so that streaming responses and
client-disconnect messages pass through untouched.
"""

from __future__ import annotations

import hmac
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


async def _send_error(scope: Scope, send: Send, err: APIError, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    response = err.response()
    response.raw_headers.extend(extra_headers or [])
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - a JSONResponse never reads
    return {"type": "http.disconnect"}


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class RequestIdMiddleware:
    """Honour ``X-Request-Id`` (a fresh one when absent or malformed), store it in
    ``scope["state"]["request_id"]`` and echo it on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = _header(scope, REQUEST_ID_HEADER.encode())
        incoming = raw.decode("latin-1") if raw else ""
        request_id = incoming if _VALID_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class ApiKeyMiddleware:
    """Require ``Authorization: Bearer <api_key>`` on every path under ``protected_prefix``."""

    def __init__(self, app: ASGIApp, api_key: str, protected_prefix: str = "/v1") -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.prefix = protected_prefix

    def _authorized(self, scope: Scope) -> bool:
        given = _header(scope, b"authorization") or b""
        return hmac.compare_digest(given, self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path == self.prefix or path.startswith(self.prefix + "/")):
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "OPTIONS" or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        err = APIError(401, "Missing or incorrect API key; send it as 'Authorization: Bearer <key>'.", code="invalid_api_key")
        await _send_error(scope, send, err, [(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    """Refuse request bodies larger than ``max_body_bytes`` with 413.

    ``Content-Length`` is checked first; the body is then read in full (up to the limit)
    and replayed to the app, so a lying or missing Content-Length cannot get past it.
    After the replay, ``receive`` is the server's own (disconnect detection keeps working).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than {self.max_body_bytes} bytes.", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    await _send_error(scope, send, self._too_large(), [(b"connection", b"close")])
                    return
            except ValueError:
                await _send_error(scope, send, APIError(400, "Invalid Content-Length header."))
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                await _send_error(scope, send, self._too_large(), [(b"connection", b"close")])
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
