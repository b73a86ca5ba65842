"""Request-path review: what a request gets when the sampling engine's thread dies under it, and the drain window's
503. The real app through its lifespan (embedded bundle, real onnxruntime, real engine), seeded.

Each test says what it guards and that it failed on the code before it.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from calibration.data import load_fashion_mnist
from models.engine import EngineStopped, SequentialEngine
from models.jobs import JobSpec
from models.sampling import SamplingEngine
from server.app import create_app
from server.settings import Settings

EASY = 2  # Fashion-MNIST test image #2 (a trouser): hit rate ~1, so a target of 0.97 keeps its job sampling


@pytest.fixture(scope="module")
def easy() -> np.ndarray:
    x = load_fashion_mnist().x_test[EASY]
    return (np.round(np.asarray(x) * 255) / 255).astype(np.float32)


def test_a_request_whose_engine_thread_dies_is_answered_at_once_not_at_its_deadline(easy):
    """The engine thread dies (a fault in its loop, here the chunk allocation) while a request's job is sampling.
    Nobody samples that job any more: it must be answered at once with the valid certificate of its landed samples,
    marked 'shutdown' (what stop() gives the live jobs of a dead engine), and the engine must hold no live job.
    Run against the code before this test: nobody answered the job until its deadline (8 s here, 30 s by default),
    when it came back 'stopped_by: deadline'; this test failed."""
    async def main():
        app = create_app(Settings(max_samples=10**6, drain_seconds=0), seed=31)
        async with app.router.lifespan_context(app):
            engine = app.state.service.engine
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as ac:
                request = asyncio.ensure_future(ac.post("/certify", json={
                    "image": easy.tolist(), "mode": "sequential", "target_radius": 0.97, "max_samples": 10**6,
                    "deadline_ms": 8000}))
                for _ in range(500):  # its job is live and sampling
                    if engine.live_jobs == 1 and engine.samples_processed > 64:
                        break
                    await asyncio.sleep(0.01)
                assert engine.live_jobs == 1 and not request.done()

                def broken(*args, **kwargs):
                    raise RuntimeError("engine loop fault")

                engine._table.allocate = broken  # the next turn's allocation raises: the engine thread ends
                t0 = time.monotonic()
                response = await request
                elapsed = time.monotonic() - t0
                engine._thread.join(timeout=5)
                live, alive = engine.live_jobs, engine.alive
                metrics = (await ac.get("/metrics")).text
        return response, elapsed, live, alive, metrics

    response, elapsed, live, alive, metrics = asyncio.run(main())
    assert not alive
    assert response.status_code == 200, (response.status_code, response.text[:300])
    cert = response.json()
    assert cert["stopped_by"] == "shutdown" and cert["samples"] > 64 and cert["method"] == "sequential"
    assert cert["class_index"] == 1 and cert["radius"] > 0  # a trouser: every landed sample counted for it
    assert elapsed < 3.0, f"answered {elapsed:.1f} s after the engine thread died (its deadline was 8 s)"
    assert live == 0
    assert "certserve_live_jobs 0.0" in metrics
    assert "certserve_internal_errors_total 0.0" in metrics


def test_a_job_being_admitted_when_the_engine_thread_dies_is_answered_at_once_and_frees_its_count(backend, easy,
                                                                                                monkeypatch):
    """A job taken from the pending queue by the engine thread, which then dies admitting it, was in no list but the
    deadline heap: it waited for its deadline and engine.live_jobs counted it for ever. Now it is answered at once (no samples: abstain, 'shutdown'), live_jobs is 0 and submit
    refuses. Run against the code before this test: the future was still pending 3 s later (live_jobs 1); this
    test failed."""
    original = SequentialEngine._table_for

    def dies_admitting(self, admit):
        if admit:
            raise SystemError("engine loop fault")
        return original(self, admit)

    monkeypatch.setattr(SequentialEngine, "_table_for", dies_admitting)
    engine = SequentialEngine(SamplingEngine(backend, sigma=0.25, num_classes=10, batch_size=256), max_live_jobs=1,
                              seed=5).start()
    try:
        fut = engine.submit(JobSpec(easy, 0.01, 1000, time.monotonic() + 8, tested_class=1))
        res = fut.result(timeout=3)
        assert res.stopped_by == "shutdown" and res.samples == 0 and res.class_index == -1 and res.radius == 0.0
        engine._thread.join(timeout=5)
        assert not engine.alive and engine.live_jobs == 0
        with pytest.raises(EngineStopped):
            engine.submit(JobSpec(easy, 0.01, 64, time.monotonic() + 8, tested_class=1))
    finally:
        engine.stop(0.0)


def test_a_batch_larger_than_the_live_job_limit_is_a_422_not_a_retryable_503(easy):
    """A sequential (fixed, cohen) batch of more images than CERTSERVE_MAX_LIVE_JOBS can never be admitted: it was
    refused with 503 queue_full + Retry-After, which no retry can pass (found by review: limit 6, batch of 8). Now 422
    too_many_images naming the limit (an auto batch keeps its 503: the surrogate may answer some of its images).
    Run against the old app: 503; this test failed."""
    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(max_live_jobs=6, drain_seconds=0), seed=12)) as client:
        r = client.post("/certify/batch", json={"images": [easy.tolist()] * 8, "mode": "sequential"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "too_many_images" and "6" in r.json()["error"]["message"]
        engine, end = client.app.state.service.engine, time.monotonic() + 10
        while engine.live_jobs and time.monotonic() < end:  # the refused batch's dropped jobs leave at the next step
            time.sleep(0.02)
        r = client.post("/certify/batch", json={"images": [easy.tolist()] * 2, "mode": "sequential",
                                                "max_samples": 500})
        assert r.status_code == 200, r.text


def test_a_request_after_the_engine_thread_died_is_told_engine_down(easy, monkeypatch):
    """New sampling requests after the engine thread died on a fault got 503 draining (nothing was draining) while
    GET /readyz said engine_down. Now both say engine_down (found by review). Run against the old service: draining;
    this test failed."""
    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(drain_seconds=0), seed=13)) as client:
        engine = client.app.state.service.engine
        monkeypatch.setattr(engine, "_prepare", lambda inflight: (_ for _ in ()).throw(RuntimeError("engine fault")))
        with engine._lock:
            engine._lock.notify_all()  # wake the idle engine thread: its next step raises
        end = time.monotonic() + 10
        while engine.alive and time.monotonic() < end:
            time.sleep(0.02)
        assert not engine.alive
        r = client.post("/certify", json={"image": easy.tolist(), "mode": "sequential", "max_samples": 200})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down", r.text
        assert client.get("/readyz").json()["error"]["code"] == "engine_down"
