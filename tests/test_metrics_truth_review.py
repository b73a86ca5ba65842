"""Do the Prometheus metrics tell the truth about the answers the connection layer (server.connections) writes?
Real uvicorn, real sockets, the guard wired as ``certserve serve`` wires it (server.serve.http_protocol).

Each test failed on the code before this review:
- ``test_a_pipelined_request_with_oversized_headers_does_not_answer_the_earlier_one``: httptools, a valid request
  whose app is still running followed on its connection by a next request whose headers exceed 64 KiB: the JSON 431
  was written at once, so the client read it as the answer to its valid request, and the connection was closed under
  it (a /certify job cancelled, counted as client_closed_request: the client had closed nothing). Now the 431 waits
  for the earlier answers, as the 400 for malformed bytes does.
- ``test_a_request_refused_by_the_connection_while_its_app_runs_is_counted_once``: a request whose chunked body the
  connection refuses while its app reads it (400 for a malformed chunk, 431 for an oversized trailer) was counted
  twice in certserve_rejected_requests_total: under the code it was answered with, and again as
  client_closed_request (the app saw the connection the guard closed as a disconnect). Now only the first.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from server.metrics import Metrics
from tests.metrics_helpers import families, value
from tests.test_connections_review2 import _read_until_closed
from tests.test_rev6a_review2 import _serve


def test_a_pipelined_request_with_oversized_headers_does_not_answer_the_earlier_one():
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from server.connections import MAX_HEADER_BYTES, guarded_protocol

    async def app(scope, receive, send):  # answers after 0.5 s, as a job would
        if scope["type"] != "http":
            return
        await asyncio.sleep(0.5)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"slow"})

    rejected: list[str] = []
    server, thread, port = _serve(app, guarded_protocol(HttpToolsProtocol, timeout=5.0, on_reject=rejected.append))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.1)  # its app runs; the next request's headers arrive meanwhile, beyond the limit
            try:
                sock.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n")
                for _ in range(MAX_HEADER_BYTES // 8192 + 4):
                    sock.sendall(b"X-Pad: " + b"a" * 8192 + b"\r\n")
                    time.sleep(0.002)
            except OSError:  # the server stopped reading (or closed): what it answered is checked below
                pass
            data = _read_until_closed(sock, 5)
        assert data.startswith(b"HTTP/1.1 200 ") and b"\r\n\r\nslow" in data, data[:300]
        assert rejected == ["headers_too_large"]
        if b"HTTP/1.1 431 " in data:  # (the client may lose it to a reset: it was still sending when closed)
            assert data.index(b"HTTP/1.1 431 ") > data.index(b"slow")
    finally:
        server.should_exit = True
        thread.join(5)


class _AuditOK:
    def audit_available(self) -> bool:
        return True


class _Service:  # what the routes read before parsing a body (admission)
    sealer = _AuditOK()


@pytest.mark.parametrize("refused, code", [
    ([b"zz\r\nnot a chunk\r\n"], "bad_request"),  # a malformed chunk size: 400
    ([b"0\r\n", *[b"X-T: " + b"a" * 8000 + b"\r\n"] * 24], "headers_too_large"),  # a trailer of ~190 KB: 431
])
@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_request_refused_by_the_connection_while_its_app_runs_is_counted_once(parser, refused, code, monkeypatch):
    from uvicorn.protocols.http import auto
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from server.app import create_app
    from server.serve import http_protocol
    from server.settings import Settings

    if parser == "h11":  # uvicorn's choice where httptools is not installed; it bounds a trailer itself (400)
        monkeypatch.setattr(auto, "AutoHTTPProtocol", H11Protocol)
        code = "bad_request"
    settings = Settings(body_timeout_seconds=5)
    metrics = Metrics()
    inner = create_app(settings, service=_Service(), metrics=metrics)
    done = threading.Event()

    async def app(scope, receive, send):  # the real app; ``done`` once the request's handling has ended
        try:
            await inner(scope, receive, send)
        finally:
            if scope["type"] == "http":
                done.set()

    server, thread, port = _serve(app, http_protocol(inner, settings))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /certify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"ima\r\n")
            time.sleep(0.2)  # the app reads the body
            try:
                for piece in refused:
                    sock.sendall(piece)
                    time.sleep(0.002)
            except OSError:  # the server stopped reading (or closed): what it answered is checked below
                pass
            data = _read_until_closed(sock, 5)
        assert done.wait(5), "the request's handling did not end"
        status = {"bad_request": b"400", "headers_too_large": b"431"}[code]
        if data:  # (the client may lose the answer to a reset: it was still sending when closed)
            assert data.startswith(b"HTTP/1.1 " + status), data[:300]
            assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == code
        fam = families(metrics.render().decode())["certserve_rejected_requests"]
        assert value(fam, "_total", reason=code) == 1
        assert value(fam, "_total", reason="client_closed_request") == 0, "the client closed nothing"
        assert value(families(metrics.render().decode())["certserve_internal_errors"], "_total") == 0
    finally:
        server.should_exit = True
        thread.join(5)
