"""The connection guard (server.connections) after the 2026-12-06 changes, with real clients (review 2).

Each test failed on the code before this review (549a229):
- ``test_a_malformed_request_after_a_running_one_does_not_answer_it``: httptools, a valid request whose app is
  still running followed on its connection by bytes the parser refuses in the NEXT request's line or headers (no
  request queued: the guard's check looked only at the queue and at an answer already started): the JSON 400 was
  written at once, so the client read it as the answer to its valid request, and the connection was closed under
  it (on ``certserve serve``: a sequential /certify cancelled, counted client_closed_request). Now the 400 waits
  for the earlier answers (as h11 does: it parses the next request only then), and a malformed queued request is
  never run.
- ``test_a_steady_reader_of_a_large_answer_is_not_aborted``: the write timeout ran from pause_writing to
  resume_writing, i.e. the whole transport buffer (megabytes, above the socket's) had to drain within
  CERTSERVE_BODY_TIMEOUT_SECONDS however steadily the client read: a client reading an 8 MB answer at ~2 MB/s was
  aborted after 0.5 s. Now it is time without progress (nginx's send_timeout): any bytes taken re-arm it.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.test_network_review2 import BIG, served  # noqa: F401  (the fixture: certserve serve's own wiring)
from tests.test_rev6a_review2 import _serve


def _read_until_closed(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return data


@pytest.mark.parametrize("parser", ["httptools", "h11"])
@pytest.mark.parametrize("valid", [1, 2])
@pytest.mark.parametrize("bad", [b"GARBAGE\x01 /x HTTP/1.1\r\n\r\n",
                                 b"GET /n HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                                 b"POST /n HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nbad\r\n"])
def test_a_malformed_request_after_a_running_one_does_not_answer_it(parser, valid, bad):
    import asyncio

    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from server.connections import guarded_protocol

    started: list[str] = []

    async def app(scope, receive, send):  # answers after 0.3 s, as a job would
        if scope["type"] != "http":
            return
        started.append(scope["path"])
        await asyncio.sleep(0.3)
        body = scope["path"].encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    rejected: list[str] = []
    base = HttpToolsProtocol if parser == "httptools" else H11Protocol
    server, thread, port = _serve(app, guarded_protocol(base, timeout=5.0, on_reject=rejected.append))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            paths = ["/slow", "/second"][:valid]
            sock.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p.encode() for p in paths) + bad)
            data = _read_until_closed(sock, 5)
        # the valid requests are answered, in order, then the 400 (the JSON envelope), then the connection closes
        assert data.startswith(b"HTTP/1.1 200 "), data[:300]
        *answers, refusal = data.split(b"HTTP/1.1 ")[1:]
        assert [a.rpartition(b"\r\n\r\n")[2].decode() for a in answers] == paths, data[:300]
        assert refusal.startswith(b"400 Bad Request"), data
        assert json.loads(refusal.partition(b"\r\n\r\n")[2])["error"]["code"] == "bad_request"
        # (h11 starts the app of a request whose headers are valid, then answers its malformed body 400)
        assert started[:valid] == paths and rejected == ["bad_request"]
    finally:
        server.should_exit = True
        thread.join(5)


def test_a_steady_reader_of_a_large_answer_is_not_aborted(served):  # noqa: F811
    """CERTSERVE_BODY_TIMEOUT_SECONDS=0.5; the client takes 64 KiB every 25 ms (~2.5 MB/s: progress every 25 ms)."""
    port, running, uv = served
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        sock.settimeout(5)
        data = bytearray()
        try:
            while chunk := sock.recv(65536):
                data += chunk
                time.sleep(0.025)
        except ConnectionResetError:
            pass
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert len(body) == BIG, f"aborted after {len(body)} of {BIG} bytes"
