"""Clients that are slow or go away while sending: the real app through its lifespan, driven at the ASGI level as
uvicorn drives it (receive() yields the body in chunks, then waits; http.disconnect once the client has gone).

Each test says which bug it was run against and that it failed then.
"""

from __future__ import annotations

import asyncio
import json

from server.app import create_app
from server.settings import Settings

SCOPE = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
         "path": "/certify", "raw_path": b"/certify", "query_string": b"", "root_path": "",
         "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
BODY = json.dumps({"image": [[0.5] * 28] * 28, "mode": "surrogate"}).encode()


def _scope(length: int) -> dict:
    return {**SCOPE, "headers": [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]}


def _counter(text: str, name: str, label: str = "") -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith(name + label))
    return float(line.rsplit(" ", 1)[1])


def _status_and_body(sent: list) -> tuple[int, dict]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


def test_a_trickled_body_gets_408_and_frees_its_admission_slot():
    """A client that sends half its body and then nothing held an admission slot forever (uvicorn has no body-read
    timeout): with the in-flight limit reached, every other request got 503 inflight_limit. Now the body must arrive
    within CERTSERVE_BODY_TIMEOUT_SECONDS of the request: 408 body_timeout, and the slot is free again. Run against
    the code before 2026-12-05: the trickled request never ended (wait_for timed out) and the next one got 503."""
    async def main():
        app = create_app(Settings(max_inflight_requests=1, body_timeout_seconds=0.5, drain_seconds=0), seed=1)
        async with app.router.lifespan_context(app):
            stalled, sent = asyncio.Event(), []
            chunks = [{"type": "http.request", "body": BODY[:100], "more_body": True}]

            async def trickle():
                if chunks:
                    return chunks.pop()
                await stalled.wait()  # never set: the client sends nothing more
                return {"type": "http.disconnect"}

            async def record(message):
                sent.append(message)

            await asyncio.wait_for(app(_scope(len(BODY)), trickle, record), timeout=10)
            full = [{"type": "http.request", "body": BODY, "more_body": False}]
            after: list = []

            async def whole():
                return full.pop() if full else {"type": "http.disconnect"}

            async def record_after(message):
                after.append(message)

            await asyncio.wait_for(app(_scope(len(BODY)), whole, record_after), timeout=10)
            return sent, after, app.state.metrics.render().decode()

    sent, after, metrics = asyncio.run(main())
    status, body = _status_and_body(sent)
    assert status == 408 and body["error"]["code"] == "body_timeout" and "0.5 s" in body["error"]["message"]
    assert _status_and_body(after)[0] == 200
    assert _counter(metrics, "certserve_rejected_requests_total", '{reason="body_timeout"}') == 1


def test_a_client_gone_mid_upload_is_499_not_an_internal_error():
    """A client that disconnects while sending its body is client_closed_request (499, counted as rejected), not an
    internal error with a traceback. Run against the code before 2026-12-05: starlette's ClientDisconnect reached the
    catch-all (500 internal, certserve_internal_errors_total 1); this test failed."""
    async def main():
        app = create_app(Settings(drain_seconds=0), seed=2)
        async with app.router.lifespan_context(app):
            messages = [{"type": "http.disconnect"}, {"type": "http.request", "body": BODY[:100], "more_body": True}]
            sent: list = []

            async def receive():
                return messages.pop()

            async def send(message):
                sent.append(message)

            await asyncio.wait_for(app(_scope(len(BODY)), receive, send), timeout=10)
            return sent, app.state.metrics.render().decode()

    sent, metrics = asyncio.run(main())
    assert _status_and_body(sent)[0] == 499
    assert _counter(metrics, "certserve_internal_errors_total") == 0
    assert _counter(metrics, "certserve_rejected_requests_total", '{reason="client_closed_request"}') == 1


def _cancelled_by_the_drain_window(seed: int) -> tuple[list, str]:
    """(messages sent, metrics text) for a request whose body is still uploading when uvicorn's graceful-shutdown
    window ends and it cancels the request."""
    async def main():
        app = create_app(Settings(body_timeout_seconds=60, drain_seconds=0), seed=seed)
        async with app.router.lifespan_context(app):
            chunks = [{"type": "http.request", "body": BODY[:100], "more_body": True}]
            sent: list = []

            async def receive():
                if chunks:
                    return chunks.pop()
                await asyncio.Event().wait()  # the rest of the body never comes

            async def send(message):
                sent.append(message)

            task = asyncio.ensure_future(app(_scope(len(BODY)), receive, send))
            await asyncio.sleep(0.3)
            task.cancel()  # what uvicorn does when its graceful-shutdown window ends
            try:
                await task
            except asyncio.CancelledError:
                pass
            return sent, app.state.metrics.render().decode()

    return asyncio.run(main())


def test_a_request_cancelled_by_the_drain_window_gets_the_json_envelope():
    """uvicorn cancels the requests still open when its graceful-shutdown window ends (e.g. a body still uploading
    at SIGTERM); the client must get 503 draining in the JSON envelope, not uvicorn's bare 'Internal Server Error'.
    Run against the code before 2026-12-05: nothing was sent before the cancellation; this test failed."""
    status, body = _status_and_body(_cancelled_by_the_drain_window(3)[0])
    assert status == 503 and body["error"]["code"] == "draining"


def test_the_drain_windows_503_carries_retry_after():
    """README: 503 + Retry-After for draining, 'also a request still open, e.g. still uploading, when the SIGTERM
    drain window closes' (server/errors.py: 503s carry Retry-After). RequestContext sent that 503 without the header.
    Run against the code before this test: no Retry-After; this test failed."""
    sent = _cancelled_by_the_drain_window(6)[0]
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = dict(start["headers"])
    assert start["status"] == 503 and int(headers[b"retry-after"]) >= 1


def test_the_drain_windows_503_is_counted_as_a_rejection():
    """The 503 draining that RequestContext answers for a request cancelled by the drain window is an error answer
    like any other: certserve_rejected_requests_total{reason="draining"} counts it (README: every error answer, by
    code). Run against the code before this test: failed (the counter stayed 0)."""
    sent, metrics = _cancelled_by_the_drain_window(4)
    assert _status_and_body(sent)[0] == 503
    assert _counter(metrics, "certserve_rejected_requests_total", '{reason="draining"}') == 1
    assert _counter(metrics, "certserve_internal_errors_total") == 0


def test_rays_proxy_404_without_a_replica_becomes_a_json_503():
    """While the Serve application is not deployed (starting, or deleted at shutdown) Ray's proxy answers a plain
    404 'Path not found' for every path; ProxyErrors makes it 503 replica_unavailable + Retry-After in the JSON
    envelope (the app's own 404s carry the replica header and pass). Run against the code before 2026-12-05: the
    plain 404 passed through; this test failed."""
    from server.ray_serve import REPLICA_HEADER, ProxyErrors

    def proxy_answering(status: int, marked: bool):
        async def app(scope, receive, send):
            headers = [(b"content-type", b"text/plain")] + ([(REPLICA_HEADER, b"r1")] if marked else [])
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b"Path '/certify' not found."})
        return app

    async def call(app):
        sent: list = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await ProxyErrors(app)({**SCOPE, "headers": []}, receive, send)
        return sent

    status, body = _status_and_body(asyncio.run(call(proxy_answering(404, marked=False))))
    assert status == 503 and body["error"]["code"] == "replica_unavailable"
    sent = asyncio.run(call(proxy_answering(404, marked=True)))
    assert sent[0]["status"] == 404  # the app's own answer
