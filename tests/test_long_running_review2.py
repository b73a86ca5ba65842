"""Long-running behaviour (review): what a connection or a request may hold after it has stopped making progress.

The server is ``certserve serve``'s own wiring (:func:`server.serve.run_serve`: uvicorn with the protocol class it
builds), on a real loopback socket, around a small app (the bundle is not needed to open connections).
Each test says what it failed with on the old code.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from server.metrics import Metrics
from tests.serve_harness import serving


@pytest.fixture
def served(monkeypatch, request):
    """``certserve serve`` (run_serve) in a thread with CERTSERVE_BODY_TIMEOUT_SECONDS=0.5; yields (port, app).
    Indirect parameter "h11": uvicorn's h11 protocol (its choice where httptools is not installed)."""
    async def slow(request):
        await asyncio.sleep(1.5)
        return JSONResponse({"status": "slow"})

    app = Starlette(routes=[Route("/healthz", lambda request: JSONResponse({"status": "ok"})), Route("/slow", slow)])
    app.state.metrics = Metrics()
    with serving(monkeypatch, app, h11=getattr(request, "param", None) == "h11") as (port, _):
        yield port, app


def _flooded(sock: socket.socket, head: bytes) -> bytes | None:
    """Send ``head`` then 4 MiB of "a" (it may be refused and closed meanwhile); what came back before the close."""
    sock.sendall(head)
    try:
        for _ in range(64):
            sock.sendall(b"a" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused and closed while it was still sending
    return _closed_within(sock, 5)


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing ``sock`` within ``seconds`` (None: still open)."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


@pytest.mark.parametrize("served", ["auto", "h11"], indirect=True)
def test_a_connection_that_never_completes_its_headers_is_closed(served):
    """uvicorn arms no timer before a request's headers: a connection that sent nothing, or half a request line,
    held its descriptor for the life of the process (60 such connections: 60 more descriptors, still open a minute
    later). Now they get CERTSERVE_BODY_TIMEOUT_SECONDS: closed (nothing sent) or 408 header_timeout (part sent).
    Failed on the old code: the connections were still open 5 s later."""
    port, app = served
    silent = socket.create_connection(("127.0.0.1", port))
    partial = socket.create_connection(("127.0.0.1", port))
    partial.sendall(b"POST /certify HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
    keep = socket.create_connection(("127.0.0.1", port))  # one answered request, then half of the next one
    keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    keep.settimeout(5)
    assert b"200 OK" in keep.recv(65536)
    keep.sendall(b"GET /healthz HTTP/1.1\r\nHo")
    try:
        assert _closed_within(silent, 5) == b""
        for sock in (partial, keep):
            answer = _closed_within(sock, 5)
            assert answer is not None, "a stalled connection is still open"
            assert answer.startswith(b"HTTP/1.1 408 ") and b'"code": "header_timeout"' in answer, answer
            assert b"did not arrive within 0.5 s" in answer
    finally:
        for sock in (silent, partial, keep):
            sock.close()
    assert b'certserve_rejected_requests_total{reason="header_timeout"} 2.0' in app.state.metrics.render()


@pytest.mark.parametrize("served", ["auto", "h11"], indirect=True)
def test_headers_beyond_64_kib_are_refused_without_buffering_them(served):
    """The httptools parser buffered a header of any size: one connection sending a 200 MB header line grew the
    server by ~280 MB and got no answer. Now 431 headers_too_large once the headers pass 64 KiB, and the connection
    is closed. Failed on the old code: 4 MB of header sent, no answer within 5 s.
    h11 (uvicorn's protocol where httptools is not installed; mutation round 7c found this): h11's own bound on an
    unfinished request head (``certserve serve`` sets it to the same 64 KiB) refused it first, as 400 bad_request
    ("the request is not valid HTTP/1.1: a malformed request line, ...") counted as bad_request. Failed on the code
    before that fix: the answer was the 400."""
    port, app = served
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        answer = _flooded(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
    finally:
        sock.close()
    assert answer is not None and answer.startswith(b"HTTP/1.1 431 "), answer
    assert b'"code": "headers_too_large"' in answer and b"65536 bytes" in answer
    text = app.state.metrics.render()
    assert b'certserve_rejected_requests_total{reason="headers_too_large"} 1.0' in text
    assert b'certserve_rejected_requests_total{reason="bad_request"} 0.0' in text


@pytest.mark.parametrize("served", ["auto", "h11"], indirect=True)
def test_keep_alive_requests_and_ordinary_headers_still_pass(served):
    """The guard ends with each request's headers and restarts after its answer: requests on one connection, each
    within the time limit, all get their answer (also with headers near 32 KiB: on h11, uvicorn's protocol where
    httptools is missing, these got h11's own 400 above 16 KiB until serve raised its limit to the guard's 64 KiB)."""
    port, _ = served
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        for k in range(4):
            big = b"X-Pad: " + b"p" * 32_000 + b"\r\n" if k == 1 else b""
            request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n"
            for i in range(0, len(request), 8_000):  # in parts, as a network delivers them: not in one read
                sock.sendall(request[i:i + 8_000])
                time.sleep(0.02)
            assert b"200 OK" in sock.recv(65536)
            time.sleep(0.3)  # below the 0.5 s header limit, between requests


@pytest.mark.parametrize("served", ["auto", "h11"], indirect=True)
def test_a_body_still_arriving_after_an_early_answer_is_not_taken_for_headers(served):
    """An answer sent before the request's body was read (a 413 on Content-Length, a 401, a 405, a route that ignores
    the body) leaves the connection open while the client finishes sending its body. The guard restarted at that
    answer and counted the rest of the body as the next request's headers: past 64 KiB a 431 headers_too_large was
    written after the answer and the connection closed under a client still sending (or, for a body slower than the
    time limit, a 408 header_timeout). Now the header phase starts only once the request's body has been received."""
    port, _ = served
    body = b"b" * 300_000
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        first = sock.recv(65536)
        assert b"200 OK" in first, first
        for k in range(0, len(body), 20_000):  # the rest of the body, over longer than the 0.5 s header limit
            sock.sendall(body[k:k + 20_000])
            time.sleep(0.05)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        second = sock.recv(65536)
        assert second.startswith(b"HTTP/1.1 200 OK"), second


def test_headers_sent_while_the_previous_request_is_answered_are_bounded_too(served):
    """The guard counted header bytes only while its timer ran: headers sent while the previous request on the
    connection was still being answered (a slow certification) were never counted, and httptools buffered them
    whatever their size (8 MB of one header line: no answer, all of it held). Now they count from the end of that
    request's body: 431 headers_too_large once they pass 64 KiB."""
    port, _ = served
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sock.settimeout(3)
        sent = 0
        try:
            while sent < 8 * 2 ** 20:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        answer = _closed_within(sock, 5)
    finally:
        sock.close()
    assert answer is not None and b"HTTP/1.1 431 " in answer, (sent, answer)
    assert b'"code": "headers_too_large"' in answer
