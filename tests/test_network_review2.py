"""An attacker on the network (review 2): connections that hold the server past every limit of the app.

The server is ``certserve serve``'s own wiring (:func:`server.serve.run_serve`: uvicorn with the protocol class it
builds, httptools or h11), on a real loopback socket, around a small app that counts the requests it is running (as
the admission limit counts /certify requests). Each test says what it failed with on the old code.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.metrics import Metrics
from tests.serve_harness import serving
from tests.test_long_running_review2 import _closed_within, _flooded

BIG = 8 * 2**20  # an answer larger than the socket buffers (loopback: up to 4 MB on the server's side)


@pytest.fixture(params=["auto", "h11"])
def served(monkeypatch, request):
    """``certserve serve`` in a thread (CERTSERVE_BODY_TIMEOUT_SECONDS=0.5) around an app whose ``running`` list
    holds the requests not yet answered (as admit's slot, whose release waits for the response to be sent); yields
    (port, running, the uvicorn server); then no request may have raised (an internal error)."""
    running: list = []
    failures = app_failures = []

    async def big(req):
        return Response(b"x" * BIG)

    async def echo(req):
        return JSONResponse({"bytes": len(await req.body())})

    app = Starlette(routes=[Route("/big", big), Route("/echo", echo, methods=["POST"])])
    app.state.metrics = Metrics()

    class Counting:  # the request counts as running until its response is sent (or the client is gone)
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            running.append(scope)
            try:
                await self.inner(scope, receive, send)
            except ClientDisconnect:  # the client went away while sending (the real app answers 499)
                raise
            except Exception as exc:  # e.g. a write to a closed transport
                failures.append(exc)
                raise
            finally:
                running.remove(scope)

    wrapped = Counting(app)
    wrapped.state = app.state
    with serving(monkeypatch, wrapped, h11=request.param == "h11") as (port, srv):
        yield port, running, srv
        assert not app_failures, app_failures


def _reading_nothing(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def _wait(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_a_client_that_never_reads_its_answers_does_not_hold_its_request(served):
    """A client that pipelined requests and never read their answers (a small receive window, nothing read) held
    its next request in uvicorn's wait for the write buffer to drain, without a time limit: for /certify that is its
    admission slot. On ``certserve serve`` (CERTSERVE_MAX_INFLIGHT_REQUESTS=4): 4 such connections, each pipelining
    2500 /certify requests, held the 4 slots and every other client got 503 inflight_limit, still 20 s later (until
    the attacker let go). Now a connection whose answer makes no progress for CERTSERVE_BODY_TIMEOUT_SECONDS is
    aborted, and the request whose app runs is told its client is gone (uvicorn told only the last one parsed: the
    running one then wrote to the closed transport, a RuntimeError, on ``certserve serve`` a 500 logged and counted
    in certserve_internal_errors_total). Failed on the old code: the second request was still running 5 s later."""
    port, running, uv = served
    sock = _reading_nothing(port)
    try:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 3)  # the second waits, the third is parsed
        assert _wait(lambda: len(running) == 1, 5), "the second request did not start"
        assert _wait(lambda: not running, 5), "a client that reads nothing still holds its request"
        assert _wait(lambda: not uv.server_state.connections, 5), "its connection is still open"
    finally:
        sock.close()


def test_a_connection_closed_with_unread_answers_is_not_kept_open_forever(served):
    """The answer is sent whole into the transport's buffer; when the connection is then closed for idleness,
    asyncio's close() waits for that buffer to drain, i.e. forever where the client reads nothing: one unread
    8 MB answer kept the connection (its descriptor, its buffers) open for the life of the process. Now it is
    aborted CERTSERVE_BODY_TIMEOUT_SECONDS later. Failed on the old code: the connection was still open 5 s later."""
    port, running, uv = served
    sock = _reading_nothing(port)
    try:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _wait(lambda: uv.server_state.connections, 5)
        assert _wait(lambda: not running, 5)
        assert _wait(lambda: not uv.server_state.connections, 5), "the connection is still open"
    finally:
        sock.close()


def test_a_client_that_reads_slowly_but_steadily_gets_its_whole_answer(served):
    """The write timeout counts time without progress, not the whole transfer: a client reading its 8 MB answer in
    small pieces for longer than the timeout (0.5 s) gets all of it."""
    port, running, _ = served
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        sock.settimeout(5)
        data, started = bytearray(), time.monotonic()
        while chunk := sock.recv(256 * 1024):
            data += chunk
            time.sleep(0.02)
    assert time.monotonic() - started > 0.5
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and len(body) == BIG


def test_a_chunked_bodys_trailer_is_bounded_like_headers(served):
    """httptools buffers a chunked body's trailer fields whole, by repeated bytes concatenation on the event loop,
    and they are neither body (BodyLimit, 4 MiB) nor headers (64 KiB): on ``certserve serve`` one connection's 160 MB
    trailer took 31 s of CPU on the event loop (/healthz waited 11 s) and +289 MB of RSS, and it went on after the
    app's 408. Now a trailer section beyond 64 KiB is 431 headers_too_large and the connection is closed (h11 bounds
    it itself). Failed on the old code: no answer, the connection still open, after 4 MiB of trailer."""
    port, _, _ = served
    with socket.create_connection(("127.0.0.1", port)) as sock:
        answer = _flooded(sock, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-T: ")
    assert answer is not None, "the connection is still open"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 400 ")), head
    assert json.loads(body)["error"]["code"] in ("headers_too_large", "bad_request")


def test_a_chunked_body_with_a_small_trailer_still_passes(served):
    port, _, _ = served
    with socket.create_connection(("127.0.0.1", port)) as sock:
        chunks = b"".join(b"%x\r\n%s\r\n" % (n, b"y" * n) for n in (1, 300, 70000, 5))
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                     + chunks + b"0\r\nX-Checksum: " + b"c" * 4000 + b"\r\n\r\n")
        answer = _closed_within(sock, 5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 200 "), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"bytes": 70306}
