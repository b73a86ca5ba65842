"""Mutation audit, round 7c: connections, metrics and the process lifecycle: the connection guard's header phase and
write timeouts (server.connections), ``certserve serve``'s uvicorn wiring (server.serve), the metrics and the places
that update them (server.metrics, server.app, server.middleware), and the error-code -> status table (server.errors)
as seen through the real app.

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. This round also found and fixed two real
bugs in server/connections.py, each guarded by a test that failed on the code before the fix: an unread answer that
closes its connection below the write buffer's high-water mark was never aborted (here), and on h11 headers beyond
64 KiB were 400 bad_request, not 431 (tests/test_long_running_review2.py, its h11 case). Connection tests run ``certserve serve``'s own
wiring (tests/serve_harness.py: run_serve, uvicorn and the guard) on a loopback socket around a small app; each takes
well under a few seconds.
"""

from __future__ import annotations

import socket
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from server.metrics import Metrics
from tests.asgi_helpers import DisconnectingClient, json_post_scope
from tests.serve_harness import serving
from tests.test_long_running_review2 import _closed_within

CHUNK = 16 * 1024  # below the transport's 64 KiB high-water mark: one chunk left unsent pauses nothing


def _wait(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


# ------------------------------------------------------------------------------------------ the connection guard
def _filling_app(servers: list) -> Starlette:
    """An app whose /fill streams 16 KiB chunks until the connection's socket is full (a client that reads nothing),
    then ends its answer: its last chunk's rest stays unsent in the transport, below the high-water mark (writing is
    never paused, so no write timer is armed by pause_writing)."""
    async def fill(request):
        transport = next(iter(servers[0].server_state.connections)).transport

        async def chunks():
            for _ in range(2048):  # up to 32 MiB; the kernel's buffers take a few MiB
                yield b"x" * CHUNK
                if transport.get_write_buffer_size():  # the socket is full: this chunk's rest waits unsent
                    return
        return StreamingResponse(chunks())

    app = Starlette(routes=[Route("/fill", fill)])
    app.state.metrics = Metrics()
    return app


def _reading_nothing(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def _left_unread_is_aborted(monkeypatch, h11: bool, request: bytes) -> None:
    """Send ``request`` on a connection that reads nothing to the /fill app; its answer must end with the connection
    closing, and the connection must then be gone within 5 s (the guard's timeout: 0.5 s)."""
    servers: list = []
    with serving(monkeypatch, _filling_app(servers), h11=h11) as (port, uv):
        servers.append(uv)
        sock = _reading_nothing(port)
        try:
            sock.sendall(request)
            assert _wait(lambda: any(c.transport.is_closing() for c in uv.server_state.connections), 5), \
                "the connection was not closed"
            assert _wait(lambda: not uv.server_state.connections, 5), "a closed connection with unsent bytes is " \
                                                                       "still open"
        finally:
            sock.close()


@pytest.mark.parametrize("h11", [False, True], ids=["httptools", "h11"])
def test_a_closing_answer_left_unread_below_the_high_water_mark_is_aborted(monkeypatch, h11):
    """A real bug (found by this round, not a mutant): an answer that closes its connection (``Connection: close``,
    HTTP/1.0) to a client that reads nothing, whose unsent rest stays below the transport's 64 KiB high-water mark
    (so writing was never paused and no write timer was armed), kept the connection, its descriptor and its buffers
    open for the life of the process: uvicorn's cycle calls transport.close(), which waits for the buffer to drain
    without a limit. The app here streams 16 KiB chunks until the socket is full, then ends its answer: on the old
    code the connection was still open 5 s later (timeout 0.5 s). Now it is aborted once its answer makes no progress
    for CERTSERVE_BODY_TIMEOUT_SECONDS, as a paused one is."""
    _left_unread_is_aborted(monkeypatch, h11, b"GET /fill HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize("h11", [False, True], ids=["httptools", "h11"])
def test_an_unread_answer_closed_at_the_keep_alive_timeout_is_aborted(monkeypatch, h11):
    """A kept-alive connection whose answer's rest is unread is closed by uvicorn's keep-alive timer (armed before
    the guard's idle timer, with the same CERTSERVE_KEEP_ALIVE_SECONDS); asyncio's close() then waits for the client
    without a limit. Mutant guarded against (run against it, this test failed): HeaderGuard.timeout_keep_alive_handler
    not arming the write timer (``if False:``): the connection was still open 5 s later."""
    monkeypatch.setenv("CERTSERVE_KEEP_ALIVE_SECONDS", "0.5")
    _left_unread_is_aborted(monkeypatch, h11, b"GET /fill HTTP/1.1\r\nHost: x\r\n\r\n")


def test_a_408_closing_a_connection_with_an_unread_answer_is_aborted(monkeypatch):
    """httptools: a client that read nothing and sent half of its next request gets 408 header_timeout after the
    header limit, and the guard closes the connection (_close) with that answer's and the 408's bytes unsent.
    Mutant guarded against (run against it, this test failed): _close not arming the write timer where bytes are
    left (``if False:``): asyncio's close() waited for the client forever."""
    _left_unread_is_aborted(monkeypatch, False, b"GET /fill HTTP/1.1\r\nHost: x\r\n\r\nGET /fill HTTP/1.1\r\nHo")


@pytest.mark.parametrize("h11", [False, True], ids=["httptools", "h11"])
def test_exactly_64_kib_of_unfinished_headers_is_within_the_limit(monkeypatch, h11):
    """The guard bounds what a connection makes the server buffer before its headers end: more than 64 KiB
    (MAX_HEADER_BYTES = 65536) of them is 431 headers_too_large at once; exactly 65536 bytes is within the limit (the
    connection then gets the header time limit: 408 header_timeout, 0.5 s here). Mutant guarded against (run against
    it, this test failed): data_received comparing ``>= max_bytes`` (the existing tests send 32 KiB or several MiB,
    nothing at the boundary)."""
    app = Starlette(routes=[Route("/healthz", lambda request: JSONResponse({"status": "ok"}))])
    app.state.metrics = Metrics()
    with serving(monkeypatch, app, h11=h11) as (port, _):
        for size, expected in ((65536, b"HTTP/1.1 408 "), (65537, b"HTTP/1.1 431 ")):
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: "
            unfinished = head + b"p" * (size - len(head))
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for i in range(0, size, 16_384):  # in parts, as a network delivers them
                    sock.sendall(unfinished[i:i + 16_384])
                    time.sleep(0.01)
                sock.settimeout(5)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(expected), (size, answer[:200])


def _pacing_app() -> Starlette:
    """/slow answers after 0.5 s; /stream starts its answer at once (not reading the body), ends it 0.5 s later."""
    import asyncio

    async def slow(request):
        await asyncio.sleep(0.5)
        return JSONResponse({"status": "slow"})

    async def stream(request):
        async def parts():
            yield b"first part;"
            await asyncio.sleep(0.5)
            yield b"last part"
        return StreamingResponse(parts())

    app = Starlette(routes=[Route("/healthz", lambda request: JSONResponse({"status": "ok"})), Route("/slow", slow),
                            Route("/stream", stream, methods=["POST"])])
    app.state.metrics = Metrics()
    return app


def _read_until_closed(sock: socket.socket, seconds: float = 5) -> bytes:
    data = _closed_within(sock, seconds)
    assert data is not None, f"the connection is still open after {seconds} s"
    return data


def test_pipelined_requests_each_under_the_header_limit_all_pass(monkeypatch):
    """httptools: requests pipelined behind a slow one are parsed while it is answered (the timer is off then), so
    each one's header bytes are counted from the end of the previous body and must restart at the end of its own
    headers; three pipelined requests of 30 KB of headers each are all answered. Mutant guarded against (run against
    it, this test failed): on_headers_complete not resetting _header_bytes (the three summed past 64 KiB: 431
    headers_too_large for a client that never sent more than 30 KB of headers per request)."""
    with serving(monkeypatch, _pacing_app()) as (port, _):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.1)  # /slow runs: what follows is parsed while it is answered
            pad = b"X-Pad: " + b"p" * 30_000 + b"\r\n"
            for _ in range(3):
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + pad + b"\r\n")
                time.sleep(0.05)
            sock.settimeout(5)
            answer = b""
            while answer.count(b"HTTP/1.1 ") < 4:
                answer += sock.recv(65536)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # still usable
            answer += _read_until_closed(sock)
    assert answer.count(b"HTTP/1.1 200 OK") == 5 and b" 431 " not in answer, answer[:300]


@pytest.mark.parametrize("h11", [False, True], ids=["httptools", "h11"])
def test_a_malformed_body_under_a_started_answer_closes_without_a_second_status_line(monkeypatch, h11):
    """An answer already being sent when its request's chunked body turns out malformed: the connection is closed;
    writing the 400 then would splice a second status line into the first answer's body (a client reads a corrupt
    answer as a valid one). Mutant guarded against (run against it, this test failed): send_400_response's
    ``cycle.response_started and not cycle.response_complete`` branch dropped (``if False:``)."""
    with serving(monkeypatch, _pacing_app(), h11=h11) as (port, _):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
            sock.settimeout(5)
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 "), first
            sock.sendall(b"zz-not-a-chunk-size\r\n")
            answer = first + _read_until_closed(sock)
    assert answer.count(b"HTTP/1.1 ") == 1 and b"bad_request" not in answer, answer


@pytest.mark.parametrize("h11", [False, True], ids=["httptools", "h11"])
def test_the_connections_own_answers_say_they_close_it(monkeypatch, h11):
    """408 header_timeout, 431 headers_too_large and 400 bad_request are written by the connection guard, which then
    closes the connection: each must say ``connection: close`` (RFC 9112 9.6; a client's pool would otherwise keep
    the connection for its next request and get a reset), carry its exact Content-Length and the JSON envelope with
    request_id null. Mutant guarded against (run against it, this test failed): _refuse writing the head without its
    ``connection: close`` line (the existing tests check only the status line and the code)."""
    import json

    app = Starlette(routes=[Route("/healthz", lambda request: JSONResponse({"status": "ok"}))])
    app.state.metrics = Metrics()
    with serving(monkeypatch, app, h11=h11) as (port, _):
        answers = {}
        for code, sent in (("header_timeout", b"GET /healthz HTTP/1.1\r\nHo"),
                           ("headers_too_large", b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 70_000),
                           ("bad_request", b"GARBAGE\x01 /x HTTP/1.1\r\n\r\n")):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(sent)
                answers[code] = _read_until_closed(sock)
    for code, answer in answers.items():
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        assert b"connection: close" in lines, (code, head)
        assert b"content-length: %d" % len(body) in lines, (code, head)
        assert json.loads(body) == {"error": {"code": code, "message": json.loads(body)["error"]["message"],
                                              "request_id": None}}


# ------------------------------------------------------------------------------------------------- SIGTERM
def test_serve_hands_uvicorn_its_keep_alive_and_the_drain_plus_the_answers_grace(monkeypatch):
    """run_serve's uvicorn configuration: its keep-alive timer is CERTSERVE_KEEP_ALIVE_SECONDS (uvicorn's own default
    is 5 s: a kept-alive connection was closed under clients and balancers that reuse it for 60 s, the race that
    test_keep_alive_defaults_above_common_client_and_balancer_idle_timeouts is about), and its graceful-shutdown
    timeout is the drain plus ANSWER_GRACE_SECONDS (at the drain alone uvicorn cancels the requests the engine
    answers at that same moment: 503 draining instead of their certificates). Mutants guarded against (each run,
    this test failed): ``timeout_keep_alive=`` not passed; ``timeout_graceful_shutdown=settings.drain_seconds``;
    stop_seconds without the grace."""
    from server.serve import ANSWER_GRACE_SECONDS

    monkeypatch.setenv("CERTSERVE_KEEP_ALIVE_SECONDS", "61")
    monkeypatch.setenv("CERTSERVE_DRAIN_SECONDS", "7")
    app = Starlette(routes=[Route("/healthz", lambda request: JSONResponse({"status": "ok"}))])
    app.state.metrics = Metrics()
    with serving(monkeypatch, app) as (_, uv):
        assert uv.config.timeout_keep_alive == 61
        assert uv.config.timeout_graceful_shutdown == 7 + ANSWER_GRACE_SECONDS


def test_sigterm_flips_readiness_at_once_and_lets_requests_on_their_way_submit():
    """``certserve serve``'s DrainingServer.handle_exit on SIGTERM (the real app through its lifespan, the real
    engine): /readyz answers 503 draining and certserve_ready reads 0 at once (a load balancer stops sending), the
    engine's drain starts, and a request already on its way still gets its certificate (the engine accepts until its
    stop time). Mutants guarded against (each run, this test failed): ``app_state.draining = True`` dropped (/readyz
    still 200 during the drain), and the drain thread calling engine.stop with ``accept=False`` (the request got 503
    draining)."""
    import signal

    from fastapi.testclient import TestClient

    from calibration.data import load_fashion_mnist
    from server.app import create_app
    from server.serve import _draining_server_class
    from server.settings import Settings
    from tests.metrics_helpers import EASY, families, value

    x = load_fashion_mnist().x_test
    with TestClient(create_app(Settings(max_samples=500, drain_seconds=2), seed=7)) as c:
        server_class, uvicorn = _draining_server_class()
        srv = server_class(uvicorn.Config(c.app))
        srv.app_state = c.app.state
        assert c.get("/readyz").status_code == 200
        srv.handle_exit(signal.SIGTERM, None)
        r = c.get("/readyz")
        assert (r.status_code, r.json()["error"]["code"]) == (503, "draining")
        assert value(families(c.get("/metrics").text)["certserve_ready"]) == 0
        engine = c.app.state.service.engine
        assert _wait(lambda: engine.stopping, 5), "the engine's drain did not start"
        r = c.post("/certify", json={"image": x[EASY].tolist(), "mode": "cohen", "max_samples": 200})
        assert r.status_code == 200, r.text



# ------------------------------------------------------------------------------------------------- metrics
def _cancelled_while_audited(tmp_path, path: str, payload: dict, blocked_from: int) -> tuple[str, list]:
    """The real app (embedded bundle, an audit log) at the ASGI level, as a server drives it: ``payload`` posted to
    ``path``; audit records from the ``blocked_from``-th (0-based) on wait (a stalled writer); once one waits, the
    client goes away (receive() returns http.disconnect). Returns the /metrics text and what was sent."""
    import asyncio
    import json
    import threading

    from server.app import create_app
    from server.settings import Settings

    body = json.dumps(payload).encode()
    release, writing, calls = threading.Event(), threading.Event(), []

    async def main():
        app = create_app(Settings(audit_log=str(tmp_path / "audit.jsonl"), drain_seconds=0), seed=12)
        async with app.router.lifespan_context(app):
            audit = app.state.service.sealer.audit
            real_append = audit.append_json

            def slow_append(obj):
                calls.append(obj)
                if len(calls) > blocked_from:
                    writing.set()
                    release.wait(10)
                real_append(obj)
            audit.append_json = slow_append
            client = DisconnectingClient(body)
            try:
                task = asyncio.ensure_future(app(json_post_scope(path, body), client.receive, client.send))
                for _ in range(1000):  # a certificate is built and waits on its audit record
                    if writing.is_set():
                        break
                    await asyncio.sleep(0.01)
                assert writing.is_set(), "no audit record waited"
                client.gone.set()
                await asyncio.wait_for(task, timeout=10)
            finally:
                release.set()
            return app.state.metrics.render().decode(), client.sent

    return asyncio.run(main())


def _answered(text: str) -> dict:
    from tests.metrics_helpers import families

    fam = families(text)["certserve_requests"]
    return {(s.labels["method"], s.labels["outcome"]): s.value for s in fam.samples
            if s.name == "certserve_requests_total" and s.value}


def test_a_surrogate_answer_cancelled_while_it_waits_on_its_audit_record_counts_under_surrogate(tmp_path):
    """A mode=auto request that the surrogate answers, whose audit record is slow to write, and whose client goes
    away meanwhile: one cancelled certificate under method="surrogate" (the route that built it, reported by
    on_route), none under "sequential" (the route an auto request waits on only when it falls back). Mutant guarded
    against (run against it, this test failed): Metrics.observe_cancelled ignoring ``route`` (counted under
    "sequential")."""
    from calibration.data import load_fashion_mnist
    from tests.metrics_helpers import EASY, families, value

    x = load_fashion_mnist().x_test
    text, sent = _cancelled_while_audited(tmp_path, "/certify", {"image": x[EASY].tolist()}, blocked_from=0)
    assert sent[0]["status"] == 499
    assert _answered(text) == {("surrogate", "cancelled"): 1.0}
    assert value(families(text)["certserve_rejected_requests"], "_total", reason="client_closed_request") == 1


def test_a_batch_whose_client_went_away_counts_its_images_certified_before(tmp_path):
    """/certify/batch, mode=auto, [an image the surrogate answers, a gray image that falls back to sequential]: the
    first is certified (its audit record written), the second's certificate waits on its record when the client goes
    away. The batch is 499; its images are counted as /certify counts them: the first certified (its certificate was
    built and recorded), the second cancelled. Mutant guarded against (run against it, this test failed): _drop_batch
    taking every failure for a refusal (``batch_refused = True``: the certified image was not counted at all)."""
    import numpy as np

    from calibration.data import load_fashion_mnist
    from tests.metrics_helpers import EASY

    x = load_fashion_mnist().x_test
    images = [x[EASY].tolist(), np.full_like(x[EASY], 0.5).tolist()]
    text, sent = _cancelled_while_audited(tmp_path, "/certify/batch", {"images": images, "max_samples": 500},
                                          blocked_from=1)
    assert sent[0]["status"] == 499
    assert _answered(text) == {("surrogate", "certified"): 1.0, ("sequential", "cancelled"): 1.0}

def test_the_worker_batch_fill_ratio_is_samples_over_capacity():
    """certserve_worker_batch_fill_ratio ("Worker batch size / capacity"): a batch of 64 noise samples in a 256-sample
    capacity observes 0.25 (and one of 256: 1.0). Mutant guarded against (run against it, this test failed):
    on_batch observing 1.0 whatever the batch (a dashboard of batching efficiency that always reads full)."""
    from tests.metrics_helpers import families, value

    m = Metrics()
    m.on_batch(samples=64, capacity=256, jobs=1, seconds=0.01)
    m.on_batch(samples=256, capacity=256, jobs=2, seconds=0.02)
    fam = families(m.render().decode())
    assert value(fam["certserve_worker_batch_fill_ratio"], "_sum") == pytest.approx(1.25)
    assert value(fam["certserve_worker_batch_fill_ratio"], "_count") == 2
    assert value(fam["certserve_worker_batch_size"], "_sum") == 320
    assert value(fam["certserve_samples_processed"], "_total") == 320


def test_internal_errors_have_their_own_counter_not_a_rejected_series_stuck_at_zero():
    """Unexpected exceptions are counted by certserve_internal_errors_total only (RequestContext); every other error
    code has its certserve_rejected_requests_total series pre-created at 0. A reason="internal" series there would
    read 0 forever: an alert written on it never fires. Mutant guarded against (run against it, this test failed):
    the pre-creation loop not skipping "internal"."""
    from certification.errors import CODES
    from tests.metrics_helpers import families

    fam = families(Metrics().render().decode())["certserve_rejected_requests"]
    reasons = {s.labels["reason"] for s in fam.samples if s.name == "certserve_rejected_requests_total"}
    assert reasons == set(CODES) - {"internal"}


def test_an_unexpected_exception_is_a_json_500_counted_once_as_an_internal_error():
    """The real app through its lifespan: a route raising an unexpected exception (here the bundle's model card) is
    answered 500 ``internal`` with the request id, and counted once in certserve_internal_errors_total (the alert on
    unexpected failures), not as a rejection. Mutant guarded against (run against it, this test failed):
    RequestContext not calling on_internal_error (the 500 answered, the counter stuck at 0)."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings
    from tests.metrics_helpers import families, value

    with TestClient(create_app(Settings(), seed=13), raise_server_exceptions=False) as c:
        def broken():
            raise RuntimeError("boom (test)")
        c.app.state.service.card = broken
        r = c.get("/v1/models", headers={"X-Request-ID": "req-7c"})
        assert r.status_code == 500 and r.json()["error"] == {
            "code": "internal", "message": r.json()["error"]["message"], "request_id": "req-7c"}
        fam = families(c.get("/metrics").text)
    assert value(fam["certserve_internal_errors"], "_total") == 1
    assert not any(s.value for s in fam["certserve_rejected_requests"].samples
                   if s.name == "certserve_rejected_requests_total")
