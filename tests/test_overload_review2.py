"""Overload, backpressure and cancellation through HTTP (review 2): the real app through its lifespan (the embedded
default bundle, the real engine) driven at the ASGI level as a server drives it, ``certserve serve``'s own protocol
class on a real socket, and the engine with a gated fake sampler. Each test says what it failed with on the old code.

A request waiting on its engine job watches for its client going away with ONE pending ``receive()``, not a poll:
uvicorn resumes reading the connection on every receive() call, so a poll every 50 ms let a client pipeline its next
request's body into the server's memory without limit while this one sampled (measured on ``certserve serve``: 79 MB
accepted in 15 s on one connection, RSS +74 MB, past CERTSERVE_MAX_BODY_BYTES and the admission limit; after the fix
the socket buffers' 4 MB, RSS flat).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest

from calibration.data import load_fashion_mnist
from models.engine import SequentialEngine
from server.app import create_app
from server.settings import Settings
from tests.asgi_helpers import json_post_scope
from tests.test_engine_races import LabelSampler, fixed_job, wait_until
from tests.test_long_running_review2 import _closed_within, served  # noqa: F401 (served: a fixture)

EASY = 2


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_fashion_mnist().x_test[:8]


class Connection:
    """A server's side of one request: the body in one message, then every further receive() counted (uvicorn
    resumes reading the socket on each) and pending until the client goes away (``gone``) or the response is sent."""

    def __init__(self, body: bytes):
        self.body, self.sent_body, self.calls_after_body = body, False, 0
        self.gone, self.answered = asyncio.Event(), asyncio.Event()
        self.status, self.chunks = None, []

    async def receive(self):
        if not self.sent_body:
            self.sent_body = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        if self.gone.is_set() or self.answered.is_set():  # as uvicorn: no wait once it is known
            return {"type": "http.disconnect"}
        self.calls_after_body += 1
        waits = [asyncio.ensure_future(self.gone.wait()), asyncio.ensure_future(self.answered.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return {"type": "http.disconnect"}

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                self.answered.set()

    def json(self) -> dict:
        return json.loads(b"".join(self.chunks))


def _run(settings: Settings, path: str, payload: dict, *, leave_after: float | None = None, seed: int = 31):
    body = json.dumps(payload).encode()

    async def main():
        app = create_app(settings, seed=seed)
        async with app.router.lifespan_context(app):
            conn = Connection(body)
            task = asyncio.ensure_future(app(json_post_scope(path, body), conn.receive, conn.send))
            if leave_after is not None:
                await asyncio.sleep(leave_after)
                conn.gone.set()
            await asyncio.wait_for(task, 60)
            engine, table = app.state.service.engine, app.state.service.engine._table
            for _ in range(300):  # the engine thread drops a cancelled job at its next turn, its batches in flight land
                if not table.running.any() and not table.inflight.any():
                    break
                await asyncio.sleep(0.01)
            before = engine.samples_processed
            await asyncio.sleep(0.3)
            assert engine.samples_processed == before, "the engine kept sampling after the answer"
            return conn, engine.live_jobs

    return asyncio.run(main())


@pytest.mark.parametrize("path", ["/certify", "/certify/batch"])
def test_a_request_waiting_on_its_job_does_not_poll_receive(images, path):
    """A Cohen request (batch: of 3 images) sampling until its 1.5 s deadline calls receive() once after its body,
    not every 50 ms (about 30 calls per image on the old code)."""
    common = {"mode": "cohen", "max_samples": 10**6, "deadline_ms": 1500}
    payload = ({"images": [images[i].tolist() for i in range(3)], **common} if path.endswith("batch")
               else {"image": images[EASY].tolist(), **common})
    conn, live = _run(Settings(max_samples=10**6, drain_seconds=0), path, payload)
    assert conn.status == 200, conn.chunks
    answers = conn.json()["results"] if path.endswith("batch") else [conn.json()]
    assert all(a["stopped_by"] == "deadline" for a in answers)
    assert conn.calls_after_body <= 1, f"receive() called {conn.calls_after_body} times while the job sampled"
    assert live == 0


def test_a_client_gone_still_drops_its_job_at_once(images):
    """The single pending receive() still sees the client go: the job is dropped (499), well before its deadline."""
    payload = {"image": images[EASY].tolist(), "mode": "cohen", "max_samples": 10**6, "deadline_ms": 20_000}
    conn, live = _run(Settings(max_samples=10**6, drain_seconds=0), "/certify", payload, leave_after=0.5)
    assert conn.status == 499 and conn.json()["error"]["code"] == "client_closed_request"
    assert live == 0


# ---------------------------------------------------------------------------------------------------- protocol errors
@pytest.mark.parametrize("served", ["auto", "h11"], indirect=True)
@pytest.mark.parametrize("raw", [
    b"POST /certify HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /certify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"GARBAGE\r\n\r\n",
], ids=["content-length-not-a-number", "content-length-twice", "no-request-line"])
def test_a_request_the_http_parser_refuses_gets_the_json_envelope(served, raw):
    """uvicorn answered these with a plain-text 400 'Invalid HTTP request received.' (the old code): the README's
    contract is the JSON envelope with a message that says what was expected."""
    port, app = served
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(raw)
        data = _closed_within(sock, 5)
    assert data is not None, "the connection was left open"
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"content-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and "Content-Length" in error["message"], error
    assert 'certserve_rejected_requests_total{reason="bad_request"} 1.0' in app.state.metrics.render().decode()


# ---------------------------------------------------------------------------------------------------- freed places
def test_a_cancelled_job_frees_its_place_at_once_not_at_the_engines_next_turn():
    """max_live_jobs=1, the engine thread inside a model call (the gate holds it): the live job's caller cancels, a
    new job comes. live_jobs counted the cancelled job until the engine thread's next turn (after the model call
    in progress), so the new job was refused with QueueFull (the old code); it is accepted, and the engine still
    bounds what is live."""
    sampler = LabelSampler()
    sampler.gate.clear()
    engine = SequentialEngine(sampler, max_live_jobs=1, seed=0).start()
    far = time.monotonic() + 60
    try:
        first = engine.submit(fixed_job(0, far))
        assert wait_until(lambda: engine.batches == 0 and engine._table is not None and engine._table.running.any())
        first.cancel()
        assert engine.live_jobs == 0
        second = engine.submit(fixed_job(1, far, budget=64))  # QueueFull on the old code
        assert engine.live_jobs == 1
        with pytest.raises(Exception, match="sampling jobs are in flight"):
            engine.submit(fixed_job(2, far))
        sampler.gate.set()
        result = second.result(timeout=30)
        assert result.stopped_by == "budget" and result.samples == 64
        assert wait_until(lambda: engine.live_jobs == 0)
    finally:
        sampler.gate.set()
        engine.stop(0.0)


def test_the_request_after_a_client_gone_takes_its_place(images):
    """Through HTTP, max_live_jobs=1: a client leaves its long Cohen request (499), the next request right after is
    answered; on the old code it was 503 queue_full whenever the engine thread had not yet had its next turn (6 of
    10 seeded trials on the 2-core machine). Here the engine thread is held inside its model call when the client
    leaves, so that turn cannot come first."""
    long = {"image": images[EASY].tolist(), "mode": "cohen", "max_samples": 10**6, "deadline_ms": 20_000}
    short = {"image": images[EASY].tolist(), "mode": "cohen", "max_samples": 100}

    async def main():
        app = create_app(Settings(max_samples=10**6, max_live_jobs=1, drain_seconds=0), seed=37)
        async with app.router.lifespan_context(app):
            engine = app.state.service.engine
            gate = threading.Event()
            gate.set()
            launch = engine.sampler.launch

            def held_launch(*args, **kwargs):  # the model call in progress when the client leaves
                gate.wait()
                return launch(*args, **kwargs)

            engine.sampler.launch = held_launch
            body = json.dumps(long).encode()
            gone = Connection(body)
            task = asyncio.ensure_future(app(json_post_scope("/certify", body), gone.receive, gone.send))
            for _ in range(500):
                if engine.samples_processed > 500:
                    break
                await asyncio.sleep(0.01)
            gate.clear()
            await asyncio.sleep(0.2)  # the engine thread is now held in a launch
            gone.gone.set()
            await task
            body = json.dumps(short).encode()
            nxt = Connection(body)
            waiting = asyncio.ensure_future(app(json_post_scope("/certify", body), nxt.receive, nxt.send))
            await asyncio.sleep(0.2)
            gate.set()
            await asyncio.wait_for(waiting, 60)
            return gone, nxt

    gone, nxt = asyncio.run(main())
    assert gone.status == 499
    assert nxt.status == 200, nxt.json()
    assert nxt.json()["samples"] == 200
