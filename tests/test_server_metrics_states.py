"""Prometheus metrics of the real app in particular states, each test on a fresh app of its own (the real embedded
bundle through its lifespan), parsed with prometheus_client's own text parser: the live-jobs and queue-depth gauges
of an idle server and of one with jobs in flight, the ready gauge following /readyz (draining, engine down), and the
counting of cancelled requests (labelled by route, pre-created at 0) and of refused batches (none of their images
counted). The metrics after a known mix of traffic are in tests/test_server_metrics.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from fastapi.testclient import TestClient

from calibration.data import load_fashion_mnist
from models.engine import JobSpec
from server.app import create_app
from server.settings import Settings
from tests.asgi_helpers import DisconnectingClient, json_post_scope
from tests.metrics_helpers import EASY, families, samples, value

METHODS = ("surrogate", "sequential", "fixed", "cohen")


def test_idle_server_reports_no_live_or_queued_jobs():
    """After every request has been answered, the engine holds no job: both gauges must read 0 (they are sampled
    at the start of each engine step, so they go stale unless the idle engine still steps: within 0.5 s). Read until
    they do (up to 5 s): the answer can reach the test before the engine thread's next step (seen once under load)."""
    x = load_fashion_mnist().x_test
    with TestClient(create_app(Settings(max_samples=500), seed=6)) as c:
        text = c.get("/metrics").text  # right after start-up: only the warm-up job has run
        fam = families(text)
        assert value(fam["certserve_live_jobs"]) == 0 and value(fam["certserve_queue_depth"]) == 0, \
            "idle after warm-up, but the gauges say a job is live/queued"
        r = c.post("/certify", json={"image": x[EASY].tolist(), "mode": "cohen", "max_samples": 200})
        assert r.status_code == 200
        engine = c.app.state.service.engine
        for _ in range(500):  # the engine retires the job right after answering it
            if engine.live_jobs == 0:
                break
            threading.Event().wait(0.01)
        assert engine.live_jobs == 0
        for _ in range(50):
            fam = families(c.get("/metrics").text)
            if value(fam["certserve_live_jobs"]) == 0 and value(fam["certserve_queue_depth"]) == 0:
                break
            threading.Event().wait(0.1)
        assert value(fam["certserve_live_jobs"]) == 0 and value(fam["certserve_queue_depth"]) == 0


def test_live_jobs_gauge_counts_jobs_in_flight():
    """While sequential jobs run, certserve_live_jobs reports them."""
    x = load_fashion_mnist().x_test
    with TestClient(create_app(Settings(max_samples=10**6, drain_seconds=0), seed=8)) as c:
        engine = c.app.state.service.engine
        results = []

        def go():
            results.append(c.post("/certify", json={"image": x[EASY].tolist(), "mode": "cohen",
                                                    "max_samples": 20_000, "deadline_ms": 2500}))

        threads = [threading.Thread(target=go) for _ in range(2)]
        for t in threads:
            t.start()
        seen = 0.0
        for _ in range(300):
            if engine.live_jobs == 2 and engine.samples_processed > 64 + 1024:
                seen = value(families(c.get("/metrics").text)["certserve_live_jobs"])
                break
            threading.Event().wait(0.01)
        for t in threads:
            t.join(timeout=60)
        assert seen == 2
        assert all(r.status_code == 200 for r in results)


def test_ready_gauge_follows_readyz():
    """certserve_ready reads 0 exactly when GET /readyz answers 503: while draining, and once the engine thread is
    dead. Run against the code before 2026-12-05: failed (the gauge was set to 1 at start-up and stayed 1 while /readyz
    answered 503 engine_down or draining)."""
    def ready_gauge(c) -> float:
        return value(families(c.get("/metrics").text)["certserve_ready"])

    with TestClient(create_app(Settings(drain_seconds=0), seed=9)) as c:
        assert c.get("/readyz").status_code == 200 and ready_gauge(c) == 1
        c.app.state.draining = True
        r = c.get("/readyz")
        assert (r.status_code, r.json()["error"]["code"]) == (503, "draining") and ready_gauge(c) == 0
        c.app.state.draining = False
        assert c.get("/readyz").status_code == 200 and ready_gauge(c) == 1
        c.app.state.service.engine.stop(0)  # the engine thread ends: not ready, although the process still answers
        r = c.get("/readyz")
        assert (r.status_code, r.json()["error"]["code"]) == (503, "engine_down") and ready_gauge(c) == 0


def _requests_total(text: str) -> dict:
    fam = families(text)["certserve_requests"]
    return {(s.labels["method"], s.labels["outcome"]): s.value for s in samples(fam, "_total")}


def test_cancelled_requests_are_labelled_by_route_and_precreated():
    """A client that goes away while its mode=auto request waits on its sequential fallback: one cancelled job under
    method="sequential" (the route, as every other outcome), never under the mode ("auto"), and the cancelled series
    exist at 0 before the first cancellation (so rate() sees it). Driven at the ASGI level like a server does:
    receive() returns http.disconnect once the client has gone. Run against the code before 2026-12-05: failed (no
    cancelled series before; then method="auto")."""
    x = load_fashion_mnist().x_test
    body = json.dumps({"image": x[EASY].tolist(), "target_radius": 5.0, "max_samples": 10**6,
                       "deadline_ms": 20_000}).encode()  # fallback below_target_radius: a sequential job, never done

    async def main():
        app = create_app(Settings(max_samples=10**6, drain_seconds=0), seed=11)
        async with app.router.lifespan_context(app):
            before = app.state.metrics.render().decode()
            engine, client = app.state.service.engine, DisconnectingClient(body)
            task = asyncio.ensure_future(app(json_post_scope("/certify", body), client.receive, client.send))
            for _ in range(600):  # the job is live and sampling
                if engine.live_jobs and engine.samples_processed > 64:
                    break
                await asyncio.sleep(0.01)
            client.gone.set()
            await asyncio.wait_for(task, timeout=30)
            return before, app.state.metrics.render().decode(), client.sent

    before, after, sent = asyncio.run(main())
    assert sent[0]["status"] == 499
    got_before, got = _requests_total(before), _requests_total(after)
    assert {m: got_before.get((m, "cancelled")) for m in METHODS} == {m: 0.0 for m in METHODS}
    assert {k: v for k, v in got.items() if v} == {("sequential", "cancelled"): 1.0}
    assert all(m in METHODS for m, _ in got), sorted(got)
    fam = families(after)
    assert value(fam["certserve_rejected_requests"], "_total", reason="client_closed_request") == 1
    assert value(fam["certserve_fallbacks"], "_total", reason="below_target_radius") == 0  # no certificate


def test_batch_refused_for_queue_full_drops_its_other_jobs_uncounted():
    """A batch whose third image is refused (queue_full: max_live_jobs=2) is refused (at alpha below alpha_cal every
    image samples, so it is 422 too_many_images, tests/test_docs_review2.py; before, 503 queue_full); its other two
    jobs are dropped at once, and they are no cancellation: no certserve_requests_total series moves. Run against the
    code before 2026-12-05: failed (the two jobs kept sampling until the 503 had gone out, then were counted as
    method="auto", outcome="cancelled")."""
    x = load_fashion_mnist().x_test
    with TestClient(create_app(Settings(max_samples=10**6, max_live_jobs=2, drain_seconds=0), seed=12)) as c:
        engine = c.app.state.service.engine
        r = c.post("/certify/batch", json={"images": [x[i].tolist() for i in (EASY, 0, 1)], "alpha": 0.0005,
                                           "max_samples": 10**6, "deadline_ms": 10_000})
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_images"
        threading.Event().wait(0.5)  # the engine drops cancelled jobs at its next step; a watcher polls every 0.05 s
        assert engine.live_jobs == 0, "the refused batch's jobs kept running"
        got = _requests_total(c.get("/metrics").text)
    assert {k: v for k, v in got.items() if v} == {}
    assert all(m in METHODS for m, _ in got), sorted(got)


def test_batch_refused_after_a_surrogate_answer_counts_none_of_its_images():
    """An auto batch whose first image the surrogate answers at once and whose third is refused (queue_full:
    max_live_jobs=2, one slot held by another job, the second image's sequential fallback holds the other) is
    answered 503: none of its images is a certificate the client gets, so no certserve_requests_total series moves
    (the HELP: "The other images of a batch refused for another error (e.g. queue_full) are not counted"). Run
    against the code before this test: failed (surrogate/certified counted 1 for the refused batch). (Its two
    fallbacks fit an idle engine: with max_live_jobs=1, as first written, the batch is now refused up front with 422
    too_many_images, tests/test_leftovers_serve.py.)"""
    x = load_fashion_mnist().x_test
    with TestClient(create_app(Settings(max_samples=10**6, max_live_jobs=2, drain_seconds=0), seed=13)) as c:
        engine = c.app.state.service.engine  # another request's job, straight on the engine (counted nowhere)
        held = engine.submit(JobSpec(x[0].astype("float32"), 0.01, 10**7, time.monotonic() + 60, kind="fixed"))
        try:
            # image EASY: the surrogate certifies it (radius >= 1.6 sigma); image 0: below auto's threshold ->
            # sequential
            r = c.post("/certify/batch", json={"images": [x[i].tolist() for i in (EASY, 0, 0)],
                                               "max_samples": 10**6, "deadline_ms": 10_000})
        finally:
            held.cancel()
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full", r.text
        text = c.get("/metrics").text
    assert {k: v for k, v in _requests_total(text).items() if v} == {}
    fam = families(text)
    assert value(fam["certserve_rejected_requests"], "_total", reason="queue_full") == 1
    assert value(fam["certserve_samples_per_certificate"], "_count", method="surrogate") == 0
