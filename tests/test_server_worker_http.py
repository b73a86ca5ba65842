"""The two behaviours of the sequential worker that are only visible through HTTP, on the real app through its
lifespan (real default bundle, real engine, real Fashion-MNIST test images): a full queue answers 503 with
Retry-After, and a client that goes away gets its job dropped; plus dozens of concurrent requests sharing the engine.
The engine driven directly is tested in tests/test_server_worker.py.
"""

from __future__ import annotations

import asyncio
import json

import httpx

from server.app import create_app
from server.settings import Settings
from tests import worker_helpers
from tests.asgi_helpers import DisconnectingClient, json_post_scope
from tests.worker_helpers import EASY

images = worker_helpers.images  # the module-scoped fixture


# ---------------------------------------------------------------------------------------------------- through HTTP
def test_http_queue_full_is_503_with_retry_after(images):
    """max_live_jobs=1: of several concurrent Cohen requests one is admitted, the others are refused at once."""
    img = images[EASY].tolist()

    async def main():
        app = create_app(Settings(max_live_jobs=1, max_samples=2000, drain_seconds=0), seed=23)
        async with app.router.lifespan_context(app):
            engine = app.state.service.engine
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=120) as ac:
                responses = await asyncio.gather(*(ac.post("/certify", json={"image": img, "mode": "cohen"})
                                                   for _ in range(6)))
                for _ in range(1000):  # the engine retires the finished job right after answering it
                    if engine.live_jobs == 0:
                        break
                    await asyncio.sleep(0.01)
                retry = await ac.post("/certify", json={"image": img, "mode": "cohen", "max_samples": 200})
                metrics = (await ac.get("/metrics")).text
        return responses, retry, metrics

    responses, retry, metrics = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert codes[0] == 200 and codes[-1] == 503, codes
    assert set(codes) == {200, 503}
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            err = r.json()["error"]
            assert err["code"] == "queue_full" and "retry" in err["message"]
    assert retry.status_code == 200  # once the job is done, the slot is free again
    n503 = codes.count(503)
    assert f'certserve_rejected_requests_total{{reason="queue_full"}} {float(n503)}' in metrics


def test_http_many_concurrent_requests(images):
    """Dozens of concurrent sequential and Cohen requests share the engine and are all answered."""
    async def main():
        app = create_app(Settings(max_samples=200, drain_seconds=0), seed=25)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=120) as ac:
                payloads = [{"image": images[i].tolist(), "mode": "cohen" if i % 4 == 0 else "sequential",
                             "alpha": 0.01} for i in range(48)]
                responses = await asyncio.gather(*(ac.post("/certify", json=p) for p in payloads))
            batches = app.state.service.engine.batches
        return payloads, responses, batches

    payloads, responses, batches = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * len(payloads)
    for p, r in zip(payloads, responses):
        body = r.json()
        assert body["method"] == p["mode"] and body["guarantee"]["alpha"] == 0.01
        assert body["samples"] <= (300 if p["mode"] == "cohen" else 200)
    assert batches < len(payloads)  # requests shared model calls


def test_http_client_disconnect_drops_the_job(images):
    """Client gone: the job must be dropped (design: 'Client gone: drop the job'). The request is driven at the ASGI
    level like a server does it: after the body, receive() blocks while the client is connected and returns
    http.disconnect once it has gone."""
    body = json.dumps({"image": images[EASY].tolist(), "mode": "sequential", "max_samples": 10**6,
                       "deadline_ms": 20_000}).encode()

    async def main():
        app = create_app(Settings(max_samples=10**6, drain_seconds=0), seed=24)
        async with app.router.lifespan_context(app):
            engine, client = app.state.service.engine, DisconnectingClient(body)
            task = asyncio.ensure_future(app(json_post_scope("/certify", body), client.receive, client.send))
            for _ in range(600):  # the job is live and sampling
                if engine.live_jobs and engine.samples_processed > 64:
                    break
                await asyncio.sleep(0.01)
            client.gone.set()
            dropped_at = None
            for _ in range(300):  # up to ~3 s for the engine to drop it
                await asyncio.sleep(0.01)
                if engine.live_jobs == 0:
                    dropped_at = engine.samples_processed
                    break
            live_after = engine.live_jobs
            await asyncio.wait({task}, timeout=30)
            if not task.done():
                task.cancel()
            metrics = app.state.metrics.render().decode()
        return dropped_at, live_after, metrics

    dropped_at, live_after, metrics = asyncio.run(main())
    assert live_after == 0 and dropped_at is not None, \
        "the client disconnected but its sequential job kept sampling for 3 s (not dropped)"
    assert 'outcome="cancelled"' in metrics
