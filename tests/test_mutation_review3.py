"""Mutation audit of the service's protective code, round 3: one test per injected bug that no earlier test caught.

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. The checks are structural (a slot count, a
refusal, a recorded wait, a job table's state), not timings; where a bug would make the server hang, a generous bound
(10 s) turns the hang into a failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.engine import JobSpec, SequentialEngine
from models.sampling import PendingCounts
from server.app import create_app
from server.client import CertserveClient
from server.settings import Settings
from tests.test_engine_races import wait_until

SCOPE = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
         "path": "/certify", "raw_path": b"/certify", "query_string": b"", "root_path": "",
         "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
GREY = np.full((28, 28), 0.5).tolist()
BODY = json.dumps({"image": GREY, "mode": "surrogate"}).encode()


def _scope(headers: list) -> dict:
    return {**SCOPE, "headers": [(b"content-type", b"application/json"), *headers]}


def _status_and_body(sent: list) -> tuple[int, dict]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


async def _whole_request(app) -> list:
    """One complete /certify request (surrogate): the messages the app sent."""
    full, sent = [{"type": "http.request", "body": BODY, "more_body": False}], []

    async def receive():
        return full.pop() if full else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(app(_scope([(b"content-length", str(len(BODY)).encode())]), receive, send), timeout=10)
    return sent


# --------------------------------------------------------------------------------------------- server/app.py admit
def test_a_request_cancelled_while_admitted_frees_its_admission_slot():
    """A request task cancelled while it holds its admission slot (Ray Serve cancels a replica's request when its
    client goes away; uvicorn at the end of its drain window) must give the slot back. Bug guarded against (run
    against it, this test failed: inflight stayed 1 and the next request got 503 inflight_limit): ``admit`` releasing
    the slot in ``except Exception`` / ``else`` instead of ``finally`` (a CancelledError, or the GeneratorExit of the
    dependency's close, is no Exception). tests/test_server_slow_clients.py frees the slot only through a 408 (an
    Exception)."""
    async def main():
        app = create_app(Settings(max_inflight_requests=1, body_timeout_seconds=60, drain_seconds=0), seed=11)
        async with app.router.lifespan_context(app):
            chunks = [{"type": "http.request", "body": BODY[:100], "more_body": True}]

            async def stalled():
                if chunks:
                    return chunks.pop()
                await asyncio.Event().wait()  # the rest of the body never comes

            async def ignore(message):
                pass

            task = asyncio.ensure_future(app(_scope([(b"content-length", str(len(BODY)).encode())]), stalled, ignore))
            for _ in range(1000):  # admitted: it holds the one slot, waiting for its body
                if app.state.inflight == 1:
                    break
                await asyncio.sleep(0.01)
            assert app.state.inflight == 1
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            held = app.state.inflight
            after = await _whole_request(app)
            return held, after

    held, after = asyncio.run(main())
    assert held == 0, "the cancelled request kept its admission slot"
    assert _status_and_body(after)[0] == 200


# ------------------------------------------------------------------------------------ server/middleware.py BodyLimit
def test_a_trickled_chunked_body_gets_408_too():
    """A body sent chunked (no Content-Length) that stops arriving must also get 408 body_timeout and free its slot.
    Bug guarded against (run against it, this test failed: the request never ended, asyncio.wait_for raised
    TimeoutError): BodyLimit arming its body timeout only when the request has a Content-Length. The existing 408
    tests (tests/test_server_slow_clients.py, tests/test_metrics_truth_review.py) all send a Content-Length."""
    async def main():
        app = create_app(Settings(max_inflight_requests=1, body_timeout_seconds=0.5, drain_seconds=0), seed=12)
        async with app.router.lifespan_context(app):
            chunks, sent = [{"type": "http.request", "body": BODY[:100], "more_body": True}], []

            async def trickle():
                if chunks:
                    return chunks.pop()
                await asyncio.Event().wait()  # never: the client sends nothing more
                return {"type": "http.disconnect"}

            async def record(message):
                sent.append(message)

            await asyncio.wait_for(app(_scope([(b"transfer-encoding", b"chunked")]), trickle, record), timeout=10)
            return sent, await _whole_request(app)

    sent, after = asyncio.run(main())
    status, body = _status_and_body(sent)
    assert status == 408 and body["error"]["code"] == "body_timeout"
    assert _status_and_body(after)[0] == 200  # its admission slot is free again


# ---------------------------------------------------------------------------------- server/app.py batch image limit
def test_a_batch_of_exactly_max_batch_images_is_accepted():
    """CERTSERVE_MAX_BATCH_IMAGES is the largest batch accepted (README: "at most"); one more is 422
    too_many_images. Bug guarded against (run against it, this test failed: 422 for 3 images with the limit 3):
    ``len(images) >= limit`` in certify_batch. tests/test_server_api.py sends only 65 images with the limit 64."""
    with TestClient(create_app(Settings(max_batch_images=3, drain_seconds=0), seed=13)) as client:
        ok = client.post("/certify/batch", json={"images": [GREY] * 3, "mode": "surrogate"})
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["results"]) == 3
        over = client.post("/certify/batch", json={"images": [GREY] * 4, "mode": "surrogate"})
        assert over.status_code == 422 and over.json()["error"]["code"] == "too_many_images", over.text


# ------------------------------------------------------------------------------- models/engine.py cancelled jobs
class _GatedSampler:
    """A fake SamplingEngine: every sample of a chunk counts for class image[0]; ``gate`` holds results back."""

    def __init__(self, batch_size: int = 64):
        self.batch_size, self.sigma, self.num_classes = batch_size, 0.25, 10
        self.gate = threading.Event()
        self.launched = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1)

    def launch(self, images, sizes, rng):
        sizes = np.asarray(sizes, dtype=np.int64)
        counts = np.zeros((len(sizes), self.num_classes), dtype=np.int64)
        counts[np.arange(len(sizes)), images[:, 0].astype(np.int64)] = sizes
        self.launched += 1

        def work():
            self.gate.wait()
            return counts, 0.0

        return PendingCounts(self._pool.submit(work))

    def close(self):
        self._pool.shutdown(wait=True)


def test_a_cancelled_job_stops_sampling():
    """A job whose future is cancelled (its client went away) is dropped at the engine's next turn: no further batch
    samples for it. Bug guarded against (run against it, this test failed: the fixed job kept its slot running and
    the engine kept launching batches for it): _prepare marking a cancelled job finished without clearing its slot's
    ``running``. tests/test_server_worker.py::test_cancelled_job_is_dropped_and_engine_keeps_serving passed with the
    bug: its best-radius job stops by itself after ~1,300 samples (its policy certifies), so it was dropped anyway.
    Here a fixed-n job of 10^7 samples can only end by the cancellation."""
    sampler = _GatedSampler()
    engine = SequentialEngine(sampler, max_live_jobs=4, seed=0).start()
    try:
        fut = engine.submit(JobSpec(np.array([1, 0], dtype=np.float32), 0.01, 10**7, time.monotonic() + 60,
                                    kind="fixed", tested_class=1))
        assert wait_until(lambda: sampler.launched >= 1, timeout=10.0)  # sampling, its batches held back
        assert fut.cancel()
        sampler.gate.set()
        table = engine._table
        assert wait_until(lambda: not table.running.any() and not table.inflight.any(), timeout=10.0), \
            "the engine kept sampling for a cancelled job"
        launched = sampler.launched
        time.sleep(0.2)
        assert sampler.launched == launched and engine.samples_processed < 10**5
    finally:
        sampler.gate.set()
        engine.stop(0.0)


# ------------------------------------------------------------------------------------- server/settings.py limits
LIMITS = ["max_inflight_requests", "max_live_jobs", "max_batch_images", "max_pixels", "max_body_bytes",
          "body_timeout_seconds", "default_deadline_ms", "max_samples", "auto_max_samples", "audit_backups"]


@pytest.mark.parametrize("value", ["0", "-1"])
@pytest.mark.parametrize("name", LIMITS)
def test_a_zero_or_negative_limit_is_refused(monkeypatch, name, value):
    """Every limit the protective code relies on must be positive: CERTSERVE_MAX_INFLIGHT_REQUESTS=0 would refuse
    every request with 503, a negative one too; a zero body timeout would 408 every body. Bug guarded against (run
    against it, this test failed for max_inflight_requests): the ``ge=1`` bound dropped from a limit's Field. No
    earlier test set any of these limits to 0 or below."""
    monkeypatch.setenv(f"CERTSERVE_{name.upper()}", value)
    with pytest.raises(ValueError, match=name):
        Settings()


# ------------------------------------------------------------------------------------------ server/client.py
@pytest.mark.parametrize("retry_after", ["7", "0"])
def test_the_client_waits_the_retry_after_the_server_asks(monkeypatch, retry_after):
    """A 503 is retried after its Retry-After (seconds), not after the client's own back-off. Bug guarded against (run
    against it, this test failed: it slept 0.1 s instead of 7): CertserveClient._post sleeping ``_backoff(attempt)``
    after a 503. tests/test_client_retries.py checks that a 503 is retried and that an HTTP-date Retry-After parses,
    not how long the client waits."""
    answers = [httpx.Response(503, headers={"retry-after": retry_after},
                              json={"error": {"code": "queue_full", "message": "busy"}}),
               httpx.Response(200, json={"certified": True, "radius": 0.5})]
    calls: list = []

    def handler(request):
        calls.append(request)
        return answers[len(calls) - 1]

    slept: list = []
    monkeypatch.setattr("server.client.time.sleep", slept.append)
    client = CertserveClient("http://certserve.test", retries=3)
    client._http = httpx.Client(base_url="http://certserve.test", transport=httpx.MockTransport(handler))
    try:
        assert client.certify(b"png")["radius"] == 0.5
    finally:
        client.close()
    assert len(calls) == 2 and slept == [float(retry_after)]
