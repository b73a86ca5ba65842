"""Pure ASGI middleware (a BaseHTTPMiddleware would hide client disconnects): request context and the body limit."""

from __future__ import annotations

import logging
import time
import uuid

from server.errors import error_bytes

log = logging.getLogger("certserve")


class RequestContext:
    """X-Request-ID in and out, the arrival time (deadlines count from it), and the last line of the error contract:
    any exception that reaches here becomes ``500 {"error": {"code": "internal", ...}}`` with the request id, is
    logged with its traceback and reported to ``on_internal_error`` (a metric)."""

    def __init__(self, app, on_internal_error=None):
        self.app, self.on_internal_error = app, on_internal_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        supplied = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")[:64]
        request_id = supplied if supplied.isprintable() and supplied else uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["received"] = time.monotonic()
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("internal error on %s %s (request %s)", scope.get("method"), scope.get("path"), request_id)
            if self.on_internal_error is not None:
                self.on_internal_error()
            if not started:
                await send_json(send_with_id, 500, error_bytes("internal", "internal server error (logged with this "
                                                                            "request id)", request_id))


class BodyLimit:
    """413 when Content-Length or the streamed body exceeds ``max_bytes``; ``on_reject(code)`` is called for each."""

    def __init__(self, app, max_bytes: int, on_reject=None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        request_id = scope.get("state", {}).get("request_id")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(send, request_id)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._reject(send, request_id)

    async def _reject(self, send, request_id: str | None) -> None:
        if self.on_reject is not None:
            self.on_reject("body_too_large")
        await send_json(send, 413, error_bytes("body_too_large", f"request body exceeds {self.max_bytes} bytes",
                                               request_id))


class _BodyTooLarge(Exception):
    pass


async def send_json(send, status: int, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
