"""Ray Serve's HTTP proxy side of certserve: the proxy callback's middleware (installed by
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=server.ray_serve:proxy_middlewares``, also in each replica's own listener
under HAProxy). Answers no replica produced become certserve's JSON envelope, and each request carries one request
id the app echoes. Imports no Ray: the proxy loads it before any replica exists.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from server.errors import error_bytes
from server.middleware import _echoable

log = logging.getLogger("certserve")

#: The header the app puts on every response it produces (server.ray_serve.ReplicaHeader): an answer without it
#: came from Ray's proxy, not from a replica.
REPLICA_HEADER = b"x-certserve-replica"


class ProxyErrors:
    """In Ray's HTTP proxy: an answer that no replica produced, and that is an error, becomes certserve's JSON
    envelope, 503 + Retry-After.

    The app marks every response it produces (:class:`ReplicaHeader`). When a replica dies with the request in flight
    the proxy sends nothing at all (uvicorn would then answer a bare ``500 Internal Server Error``); Serve's
    backpressure answers an unmarked ``503``; while the application is not deployed (starting, or deleted at
    shutdown) the proxy answers an unmarked ``404`` for every path (the app is mounted at ``/``, so its own 404s are
    marked). None of them certified anything: the client should retry, possibly on another replica, and this says so.

    Whatever the proxy raises, ``asyncio.CancelledError`` included (a ``BaseException``, which ``except Exception``
    let through to uvicorn's bare 500), becomes the same 503 while no answer has started. Once the client has its
    whole answer, a later failure is logged, not raised: uvicorn would close the keep-alive connection, and drop the
    next request the client may already have sent on it ("Server disconnected without sending a response")."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope = one_request_id(scope)
        started = replaced = complete = False

        async def checked_send(message):
            nonlocal started, replaced, complete
            if replaced:
                return  # the proxy's own body of the replaced answer
            if message["type"] == "http.response.start":
                started = True
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if (message["status"] >= 500 or message["status"] == 404) and REPLICA_HEADER not in headers:
                    replaced = True
                    await send_unavailable(send, message["status"], headers)
                    complete = True
                    return
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True

        try:
            await self.app(scope, receive, checked_send)
        except (Exception, asyncio.CancelledError) as exc:
            if started and not complete:
                raise  # a partial answer: only closing the connection tells the client it is cut
            if complete:
                log.warning("Ray's proxy failed after a complete response; keeping the connection", exc_info=True)
            else:
                log.warning("Ray's proxy failed before any response; answering 503", exc_info=True)
                await send_unavailable(send, 500, _request_id_only(scope))
            if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                raise  # this task was cancelled (the server stops): the client has its answer, honour the cancel
            return
        if not started:
            await send_unavailable(send, 500, _request_id_only(scope))


def _being_cancelled() -> bool:
    """Whether the running task has a cancel() pending (not merely an inner future's CancelledError passing by)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+; before, a CancelledError is taken as a cancel
    return task is not None and (cancelling is None or cancelling() > 0)


def one_request_id(scope: dict) -> dict:
    """The request's scope with at most one X-Request-ID, one the app echoes (server.middleware): else Ray's
    RequestIdMiddleware, which runs inside this one, would answer the client's raw header (or the first of several)
    while the app puts a fresh id (or the last) in the body, its logs and the audit record."""
    headers = scope.get("headers") or []
    ids = [v for k, v in headers if k.lower() == b"x-request-id"]
    if not ids or len(ids) == 1 and _echoable(ids[0]):
        return scope
    request_id = ids[0] if _echoable(ids[0]) else uuid.uuid4().hex[:16].encode()
    return {**scope, "headers": [(k, v) for k, v in headers if k.lower() != b"x-request-id"] +
            [(b"x-request-id", request_id)]}


def _request_id_only(scope) -> dict[bytes, bytes]:
    """The request's X-Request-ID (as :func:`send_unavailable`'s headers): the rest of a REQUEST's headers is not an
    answer's (a client's own Retry-After was copied into the 503)."""
    return {k.lower(): v for k, v in scope.get("headers", []) if k.lower() == b"x-request-id"}


async def send_unavailable(send, status: int, headers: dict[bytes, bytes]) -> None:
    request_id = headers.get(b"x-request-id", b"").decode("latin-1") or None
    retry_after = headers.get(b"retry-after", b"1")
    if status == 503:  # Serve's back-pressure: max_queued_requests waiting for a replica
        code, message = "inflight_limit", "every replica holds its limit of requests and the queue is full; retry later"
    elif status == 404:  # the proxy knows no application: not deployed yet, or deleted at shutdown
        code, message = "replica_unavailable", "no replica serves requests right now (starting or shutting down); retry"
    else:
        code, message = "replica_unavailable", "the replica serving this request stopped; nothing was certified, retry"
    body = error_bytes(code, message, request_id)
    out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"retry-after", retry_after)]
    if request_id:
        out.append((b"x-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": 503, "headers": out})
    await send({"type": "http.response.body", "body": body})
