"""Prometheus metrics of the real app after real traffic, parsed with prometheus_client's own text parser: every
documented series exists with its labels and buckets, and the numbers add up (requests by method and outcome,
fallbacks by reason, samples per certificate, samples processed = what the certificates report + the warm-up job,
worker batches). Optionally ``promtool check metrics`` (apt package ``prometheus``) lints the exposition.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import re
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from calibration.data import load_fashion_mnist
from server.app import create_app
from server.settings import Settings

EASY = 2
WARM_UP_SAMPLES = 64  # the lifespan's warm-up job (documented in CertificationService.start)
LATENCY_BUCKETS = [0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   15.0, 20.0, 30.0, 32.0, 45.0, 60.0]
METHODS = ("surrogate", "sequential", "fixed", "cohen")


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, suffix: str = "", **labels) -> list:
    name = family.name + suffix
    return [s for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(family, suffix: str = "", **labels) -> float:
    found = samples(family, suffix, **labels)
    assert len(found) == 1, f"{family.name}{suffix}{labels}: {len(found)} samples"
    return found[0].value


def buckets(family, **labels) -> list[tuple[float, float]]:
    out = [(float(s.labels["le"]), s.value) for s in samples(family, "_bucket", **labels)]
    return sorted(out)


@pytest.fixture(scope="module")
def traffic():
    """A fresh app, a known mix of requests, then one /metrics scrape."""
    x = load_fashion_mnist().x_test
    easy = x[EASY].tolist()
    with TestClient(create_app(Settings(max_samples=1000), seed=5)) as c:
        certs = []

        def ok(payload):
            r = c.post("/certify", json=payload)
            assert r.status_code == 200, r.text
            certs.append(r.json())

        ok({"image": easy})  # surrogate
        ok({"image": x[0].tolist()})  # surrogate (or a sequential fallback if it abstains)
        ok({"image": easy, "alpha": 0.0005})  # fallback: alpha_below_alpha_cal
        ok({"image": easy, "per_input": True})  # fallback: per_input_requested
        ok({"image": easy, "mode": "sequential", "max_samples": 300})  # sequential, no fallback
        ok({"image": easy, "mode": "cohen", "max_samples": 200})  # cohen: 100 + 200 samples
        r = c.post("/certify/batch", json={"images": [x[i].tolist() for i in range(3)], "mode": "cohen",
                                           "max_samples": 100})
        assert r.status_code == 200
        certs.extend(r.json()["results"])
        assert c.post("/certify", json={"image": [[2.0]]}).status_code == 422  # rejected: bad_image
        big = b'{"image": "' + b"A" * (5 * 1024 * 1024) + b'"}'  # beyond the default 4 MiB body limit
        assert c.post("/certify", content=big, headers={"content-type": "application/json"}).status_code == 413
        assert c.get("/no-such-page").status_code == 404
        assert c.get("/certify").status_code == 405
        text = c.get("/metrics").text
        card = c.get("/v1/models").json()[0]
    return {"certs": certs, "text": text, "families": families(text), "card": card}


def test_all_documented_series_exist(traffic):
    fam = traffic["families"]
    expected = {
        "certserve_requests": "counter", "certserve_request_duration_seconds": "histogram",
        "certserve_samples_per_certificate": "histogram", "certserve_fallbacks": "counter",
        "certserve_rejected_requests": "counter", "certserve_worker_batch_size": "histogram",
        "certserve_worker_batch_fill_ratio": "histogram", "certserve_queue_depth": "gauge",
        "certserve_live_jobs": "gauge", "certserve_samples_processed": "counter",
        "certserve_model_inference_seconds": "histogram", "certserve_ready": "gauge",
        "certserve_http_request_duration_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert name in fam, f"{name} missing; have {sorted(fam)}"
        assert fam[name].type == kind, f"{name} is a {fam[name].type}, expected {kind}"
    assert all(name.startswith("certserve_") for name in fam if not name.startswith(("python_", "process_")))


def test_requests_by_method_and_outcome(traffic):
    fam = traffic["families"]["certserve_requests"]
    want: dict = defaultdict(int)
    for cert in traffic["certs"]:
        want[(cert["method"], "certified" if cert["certified"] else "abstained")] += 1
    got = {(s.labels["method"], s.labels["outcome"]): s.value for s in samples(fam, "_total")}
    # label combinations are pre-created at 0 (so rate() sees the first request); compare the non-zero ones
    assert {k: v for k, v in got.items() if v} == {k: float(v) for k, v in want.items()}
    assert sum(got.values()) == len(traffic["certs"]) == 9
    assert got[("cohen", "certified")] + got.get(("cohen", "abstained"), 0) == 4


def test_request_duration_histogram_buckets_from_250us_to_60s(traffic):
    """Sub-millisecond buckets (surrogate answers) and buckets around the default 30 s deadline. Run against the code
    before 2026-12-05: failed (lowest bucket 1 ms, nothing between 10 and 30 s or between 30 and 60 s)."""
    fam = traffic["families"]["certserve_request_duration_seconds"]
    per_method = defaultdict(int)
    for cert in traffic["certs"]:
        per_method[cert["method"]] += 1
    for method, n in per_method.items():
        b = buckets(fam, method=method)
        assert [le for le, _ in b[:-1]] == LATENCY_BUCKETS and b[-1][0] == float("inf")
        counts = [v for _, v in b]
        assert counts == sorted(counts), "cumulative bucket counts must not decrease"
        assert counts[-1] == value(fam, "_count", method=method) == n
        assert value(fam, "_sum", method=method) > 0


def test_samples_per_certificate(traffic):
    fam = traffic["families"]["certserve_samples_per_certificate"]
    for method in {c["method"] for c in traffic["certs"]}:
        mine = [c["samples"] for c in traffic["certs"] if c["method"] == method]
        assert value(fam, "_count", method=method) == len(mine)
        assert value(fam, "_sum", method=method) == sum(mine)
    assert value(fam, "_sum", method="cohen") == (100 + 200) + 3 * (100 + 100)
    if any(c["method"] == "surrogate" for c in traffic["certs"]):
        assert value(fam, "_sum", method="surrogate") == 0


def test_fallbacks_by_reason(traffic):
    fam = traffic["families"]["certserve_fallbacks"]
    want: dict = defaultdict(int)
    for cert in traffic["certs"]:
        if cert["fallback_reason"]:
            want[cert["fallback_reason"]] += 1
    got = {s.labels["reason"]: s.value for s in samples(fam, "_total")}
    # label combinations are pre-created at 0 (so rate() sees the first request); compare the non-zero ones
    assert {k: v for k, v in got.items() if v} == {k: float(v) for k, v in want.items()}
    assert got["alpha_below_alpha_cal"] == 1 and got["per_input_requested"] == 1


def test_rejections_by_reason(traffic):
    """Every error answer is counted, including the 413 of the body limit (a middleware) and Starlette's 404 / 405
    (neither was counted before 2026-12-05: this test failed)."""
    fam = traffic["families"]["certserve_rejected_requests"]
    assert value(fam, "_total", reason="bad_image") == 1
    assert value(fam, "_total", reason="body_too_large") == 1
    assert value(fam, "_total", reason="not_found") == 1 and value(fam, "_total", reason="method_not_allowed") == 1


def test_samples_processed_add_up(traffic):
    """Every noise sample the engine ran belongs to a certificate (or to the warm-up job)."""
    fam = traffic["families"]
    processed = value(fam["certserve_samples_processed"], "_total")
    assert processed == WARM_UP_SAMPLES + sum(c["samples"] for c in traffic["certs"])
    batch = fam["certserve_worker_batch_size"]
    assert value(batch, "_sum") == processed
    n_batches = value(batch, "_count")
    assert n_batches >= 1
    assert value(fam["certserve_model_inference_seconds"], "_count", model="base") == n_batches
    assert value(fam["certserve_model_inference_seconds"], "_sum", model="base") > 0


def test_batch_fill_ratio_is_a_fraction(traffic):
    fam = traffic["families"]["certserve_worker_batch_fill_ratio"]
    b = dict(buckets(fam))
    total = value(fam, "_count")
    assert total >= 1 and b[1.0] == total == b[float("inf")]  # every observation <= 1
    assert 0 < value(fam, "_sum") <= total


def test_gauges(traffic):
    fam = traffic["families"]
    assert value(fam["certserve_ready"]) == 1
    for name in ("certserve_queue_depth", "certserve_live_jobs"):
        assert value(fam[name]) >= 0


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


def test_promtool_check_metrics(traffic):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (apt-get install prometheus to lint the exposition format)")
    proc = subprocess.run([promtool, "check", "metrics"], input=traffic["text"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), \
        f"promtool check metrics:\n{proc.stdout}\n{proc.stderr}"


def test_latency_values_are_plausible(traffic):
    """Timings in the certificates are milliseconds and agree in scale with the histogram (seconds)."""
    fam = traffic["families"]["certserve_request_duration_seconds"]
    total_s = sum(value(fam, "_sum", method=m) for m in {c["method"] for c in traffic["certs"]})
    total_ms = sum(c["timings"]["total_ms"] for c in traffic["certs"])
    assert total_s == pytest.approx(total_ms / 1e3, rel=1e-6)
    assert np.all([c["timings"]["total_ms"] < 60_000 for c in traffic["certs"]])


def test_latency_help_says_what_is_measured_and_http_time_is_its_own_histogram(traffic):
    """certserve_request_duration_seconds is service time (decode start to certificate), not HTTP time; the HTTP time
    of answered requests (arrival to response) is certserve_http_request_duration_seconds, one per request, never
    shorter than the service time it contains. Run against the code before 2026-12-05: failed (HELP "Certification
    latency by method", no HTTP histogram)."""
    fam = traffic["families"]
    doc = fam["certserve_request_duration_seconds"].documentation
    assert "decode" in doc and "not HTTP time" in doc
    assert "a batch of 3 images adds 3" in fam["certserve_requests"].documentation
    assert "client_closed_request" in fam["certserve_requests"].documentation
    http = fam["certserve_http_request_duration_seconds"]
    assert [le for le, _ in buckets(http, route="/certify")][:-1] == LATENCY_BUCKETS
    singles = [c for c in traffic["certs"] if c["request_id"] not in
               {b["request_id"] for b in traffic["certs"][-3:]}]  # the batch's three share one request id
    assert value(http, "_count", route="/certify") == len(singles) == 6
    assert value(http, "_count", route="/certify/batch") == 1
    assert value(http, "_sum", route="/certify") >= sum(c["timings"]["total_ms"] for c in singles) / 1e3
    batch_ms = max(c["timings"]["total_ms"] for c in traffic["certs"][-3:])
    assert value(http, "_sum", route="/certify/batch") >= batch_ms / 1e3


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
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/certify", "raw_path": b"/certify", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}

    async def main():
        app = create_app(Settings(max_samples=10**6, drain_seconds=0), seed=11)
        async with app.router.lifespan_context(app):
            before = app.state.metrics.render().decode()
            engine, gone, sent = app.state.service.engine, asyncio.Event(), []
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                if messages:
                    return messages.pop()
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            task = asyncio.ensure_future(app(scope, receive, send))
            for _ in range(600):  # the job is live and sampling
                if engine.live_jobs and engine.samples_processed > 64:
                    break
                await asyncio.sleep(0.01)
            gone.set()
            await asyncio.wait_for(task, timeout=30)
            return before, app.state.metrics.render().decode(), sent

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
    max_live_jobs=1, the second image's sequential fallback holds the one slot) is answered 503: none of its images is
    a certificate the client gets, so no certserve_requests_total series moves (the HELP: "The other images of a batch
    refused for another error (e.g. queue_full) are not counted"). Run against the code before this test: failed
    (surrogate/certified counted 1 for the refused batch)."""
    x = load_fashion_mnist().x_test
    with TestClient(create_app(Settings(max_samples=10**6, max_live_jobs=1, drain_seconds=0), seed=13)) as c:
        # image EASY: the surrogate certifies it (radius >= 1.6 sigma); image 0: below auto's threshold -> sequential
        r = c.post("/certify/batch", json={"images": [x[i].tolist() for i in (EASY, 0, 0)], "max_samples": 10**6,
                                           "deadline_ms": 10_000})
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        text = c.get("/metrics").text
    assert {k: v for k, v in _requests_total(text).items() if v} == {}
    fam = families(text)
    assert value(fam["certserve_rejected_requests"], "_total", reason="queue_full") == 1
    assert value(fam["certserve_samples_per_certificate"], "_count", method="surrogate") == 0


def test_dashboard_units_and_scrape_jobs(traffic):
    """docker/grafana/dashboards/certserve.json queries only series the app exports, shows durations (and only
    those) in seconds, and its up{} selectors match the scrape job of both Prometheus configs (compose: certserve; Ray:
    ray). Run against the code before 2026-12-05: failed (certserve_live_jobs in unit "s"; up{job="certserve"} only)."""
    root = Path(__file__).resolve().parents[1]
    dash = json.loads((root / "docker/grafana/dashboards/certserve.json").read_text())
    jobs = [j["job_name"] for f in ("docker/prometheus.yml", "deploy/ray/prometheus.yml")
            for j in yaml.safe_load((root / f).read_text())["scrape_configs"] if j["job_name"] != "prometheus"]
    assert sorted(jobs) == ["certserve", "ray"]
    for panel in dash["panels"]:
        units = {o["matcher"]["options"]: p["value"] for o in panel["fieldConfig"].get("overrides", [])
                 if o["matcher"]["id"] == "byFrameRefID" for p in o["properties"] if p["id"] == "unit"}
        for t in panel["targets"]:
            unit, expr = units.get(t["refId"], panel["fieldConfig"]["defaults"]["unit"]), t["expr"]
            for name in re.findall(r"certserve_\w+", expr):
                assert re.sub(r"_(bucket|total|count|sum)$", "", name) in traffic["families"], (panel["title"], name)
            if "certserve_" in expr:
                assert (unit == "s") == ("_seconds" in expr), (panel["title"], t["refId"], unit, expr)
            for selector in re.findall(r'up\{job=~?"([^"]*)"', expr):
                assert all(re.fullmatch(selector, job) for job in jobs), (panel["title"], expr)
