"""Pure ASGI middleware (a BaseHTTPMiddleware would hide client disconnects): request context and the body limit."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from server.errors import error_bytes

log = logging.getLogger("certserve")


class RequestContext:
    """X-Request-ID in and out, the arrival time (deadlines count from it), and the last line of the error contract:
    any exception that reaches here becomes ``500 {"error": {"code": "internal", ...}}`` with the request id, is
    logged with its traceback and reported to ``on_internal_error`` (a metric); a request cancelled by the drain
    window gets ``503 draining``, reported to ``on_reject("draining")``. A HEAD request is answered as its GET, without
    the body."""

    def __init__(self, app, on_internal_error=None, on_reject=None):
        self.app, self.on_internal_error, self.on_reject = app, on_internal_error, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        supplied = dict(scope.get("headers") or []).get(b"x-request-id", b"")
        request_id = supplied.decode() if _echoable(supplied) else uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["received"] = time.monotonic()
        started = False
        head = scope.get("method") == "HEAD"
        if head:  # HEAD wherever GET (RFC 9110 9.3.2; probes and load balancers send it): the GET's answer, status
            scope = {**scope, "method": "GET"}  # and headers, without its body (FastAPI's GET routes answered 405)

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:  # uvicorn's drain window ended with this request still open (e.g. its body
            if not started:  # still uploading): the JSON envelope, not uvicorn's bare 500; then let the task go
                if self.on_reject is not None:
                    self.on_reject("draining")
                await send_json(send_with_id, 503, error_bytes("draining", "the server is shutting down; retry on "
                                                                           "another replica", request_id),
                                headers=[(b"retry-after", b"5")])  # like every 503 (README)
            raise
        except Exception:
            log.exception("internal error on %s %s (request %s)", scope.get("method"), scope.get("path"), request_id)
            if self.on_internal_error is not None:
                self.on_internal_error()
            if not started:
                await send_json(send_with_id, 500, error_bytes("internal", "internal server error (logged with this "
                                                                            "request id)", request_id))


def _echoable(request_id: bytes) -> bool:
    """A client's X-Request-ID is echoed as is when it is 1-64 printable ASCII characters (its bytes then round-trip
    through the header, the JSON body and the logs); any other is replaced by a fresh id, never altered."""
    return 0 < len(request_id) <= 64 and all(0x20 <= b < 0x7F for b in request_id)


class BodyLimit:
    """413 when Content-Length or the streamed body exceeds ``max_bytes``; 408 when the whole body has not arrived
    ``timeout`` seconds after the request did (a trickled body would hold its admission slot forever: uvicorn has no
    body-read timeout). ``on_reject(code)`` is called for each. Once the body is complete, ``receive`` is passed
    through untimed (the route then waits on it for a disconnect, as long as the job runs)."""

    def __init__(self, app, max_bytes: int, on_reject=None, timeout: float = 30.0):
        self.app, self.max_bytes, self.on_reject, self.timeout = app, max_bytes, on_reject, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        request_id = scope.get("state", {}).get("request_id")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(send, request_id)
        seen, done = 0, False
        deadline = scope.get("state", {}).get("received", time.monotonic()) + self.timeout

        async def limited_receive():
            nonlocal seen, done
            if done:
                return await receive()
            try:
                message = await _within(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                raise _BodyTimeout from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._reject(send, request_id)
        except _BodyTimeout:
            await self._reject(send, request_id, timed_out=True)

    async def _reject(self, send, request_id: str | None, *, timed_out: bool = False) -> None:
        code, status, message = (("body_timeout", 408, f"the request body did not arrive within {self.timeout:g} s")
                                 if timed_out else
                                 ("body_too_large", 413, f"request body exceeds {self.max_bytes} bytes"))
        if self.on_reject is not None:
            self.on_reject(code)
        await send_json(send, status, error_bytes(code, message, request_id))


async def _within(awaitable, seconds: float):
    """``await awaitable`` or asyncio.TimeoutError after ``seconds``: asyncio.timeout where Python has it (3.11+;
    ~4 us a call, no task), else asyncio.wait_for (~11 us, a task per call)."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


async def send_json(send, status: int, payload: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})
