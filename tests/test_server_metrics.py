"""Prometheus metrics of the real app after real traffic, parsed with prometheus_client's own text parser: every
documented series exists with its labels and buckets, and the numbers add up (requests by method and outcome,
fallbacks by reason, samples per certificate, samples processed = what the certificates report + the warm-up job,
worker batches); the Grafana dashboard queries only series the app exports. Optionally ``promtool check metrics``
(apt package ``prometheus``) lints the exposition. All of it reads one scrape of one app (the module-scoped
``traffic``); the metrics in particular server states (idle, busy, draining, cancelled and refused requests), each on
an app of its own, are in tests/test_server_metrics_states.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

from calibration.data import load_fashion_mnist
from server.app import create_app
from server.settings import Settings
from tests.metrics_helpers import EASY, buckets, families, samples, value

WARM_UP_SAMPLES = 64  # the lifespan's warm-up job (documented in CertificationService.start)
LATENCY_BUCKETS = [0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   15.0, 20.0, 30.0, 32.0, 45.0, 60.0]


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
