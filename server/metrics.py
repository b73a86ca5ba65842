"""Prometheus metrics (prefix ``certserve_``, base units, low-cardinality labels) and the engine observer.

One registry per app instance (tests build several apps in one process). certserve runs ONE worker process per
device by design: the engine owns the model and batches across all requests of that process, so several uvicorn
workers would split the batches and the GPU. Scale out with replicas behind a load balancer, each scraped on its own
(no prometheus multiprocess mode is needed or used).
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from certification.errors import CODES
from certification.plan import FallbackReason
from models.engine import EngineObserver

# sub-millisecond buckets: a surrogate answer takes well under 1 ms of service time; 15-45 s around the default 30 s
# deadline, so a deadline-cut request (answered a few ms after 30 s from its arrival) lands in (30, 32], not in
# (30, 60], of certserve_http_request_duration_seconds (from arrival); certserve_request_duration_seconds starts at
# the decode, so there it lands lower by the time before its decode began (a slow upload)
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   15.0, 20.0, 30.0, 32.0, 45.0, 60.0)
SAMPLE_BUCKETS = (0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BATCH_BUCKETS = (1, 16, 64, 256, 1024, 4096, 16384, 65536)
SEAL_BUCKETS = (25e-6, 50e-6, 100e-6, 150e-6, 200e-6, 300e-6, 500e-6, 1e-3, 2e-3, 5e-3, 0.01, 0.05)
FILL_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
HTTP_ROUTES = ("/certify", "/certify/batch")


class Metrics(EngineObserver):
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("certserve_requests", "Certificates by method (the route that answered) and "
                                "outcome (a batch of 3 images adds 3). outcome=cancelled: a job dropped before its "
                                "certificate because the client went away (also counted in certserve_rejected_"
                                "requests_total{reason=\"client_closed_request\"}) or the server cancelled the "
                                "request; labelled with the route that waits on the engine (mode=auto: sequential). "
                                "The other "
                                "images of a batch refused for another error (e.g. queue_full) are not counted",
                                ["method", "outcome"], registry=r)
        self.latency = Histogram("certserve_request_duration_seconds", "Service time of one certificate by method: "
                                 "from the start of the image's decode to the certificate (timings.total_ms), before "
                                 "sealing; not HTTP time (body read and parse, sealing and the response encoding are "
                                 "not in it: see certserve_http_request_duration_seconds)", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.http_latency = Histogram("certserve_http_request_duration_seconds", "HTTP time of answered (200) "
                                      "certification requests by route: from arrival (before the body is read) to the "
                                      "response object (sealed certificates, before JSON encoding); errors are not "
                                      "observed", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.samples_per_certificate = Histogram("certserve_samples_per_certificate",
                                                 "Base-model noise samples spent per certificate", ["method"],
                                                 buckets=SAMPLE_BUCKETS, registry=r)
        self.fallbacks = Counter("certserve_fallbacks", "Auto-mode requests not answered by the surrogate, by reason",
                                 ["reason"], registry=r)
        self.rejected = Counter("certserve_rejected_requests", "Requests answered with an error, by error code "
                                "(client_closed_request: its jobs are also certserve_requests_total{outcome="
                                "\"cancelled\"})",
                                ["reason"], registry=r)
        self.internal_errors = Counter("certserve_internal_errors", "Unexpected exceptions answered with a 500",
                                       registry=r)
        self.batch_size = Histogram("certserve_worker_batch_size", "Noise samples per worker model call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_fill = Histogram("certserve_worker_batch_fill_ratio", "Worker batch size / capacity",
                                    buckets=FILL_BUCKETS, registry=r)
        self.queue_depth = Gauge("certserve_queue_depth", "Engine jobs (sequential, fixed, cohen) admitted but not yet "
                                 "sampled (published by the engine thread each turn)", registry=r)
        self.live_jobs = Gauge("certserve_live_jobs", "Engine jobs (sequential, fixed, cohen) admitted and not yet "
                               "answered (published by the engine thread each turn)", registry=r)
        self.samples = Counter("certserve_samples_processed", "Noise samples run through the base model", registry=r)
        self.inference = Histogram("certserve_model_inference_seconds", "Model call duration by model",
                                   ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ready = Gauge("certserve_ready", "1 when the server is ready to take traffic: exactly when GET /readyz "
                           "answers 200 (warmed up, engine thread alive, not draining), evaluated at scrape time",
                           registry=r)
        self.audit_failures = Counter("certserve_audit_write_failures", "Certificates refused (503) because their "
                                      "audit record could not be written", registry=r)
        self.seal = Histogram("certserve_seal_duration_seconds", "Time to hash, sign and audit-log one certificate",
                              buckets=SEAL_BUCKETS, registry=r)
        # create the labelled series at 0, so rate()/increase() see the first requests too
        for method in ("surrogate", "sequential", "fixed", "cohen"):
            for outcome in ("certified", "abstained", "cancelled"):
                self.requests.labels(method, outcome)
            self.latency.labels(method)
            self.samples_per_certificate.labels(method)
        for route in HTTP_ROUTES:
            self.http_latency.labels(route)
        for reason in get_args(FallbackReason):
            self.fallbacks.labels(reason)
        for code in CODES:
            if code != "internal":  # counted by certserve_internal_errors_total
                self.rejected.labels(code)

    # EngineObserver (called from the engine thread; prometheus-client is thread-safe)
    def on_batch(self, samples: int, capacity: int, jobs: int, seconds: float) -> None:
        self.batch_size.observe(samples)
        self.batch_fill.observe(samples / capacity if capacity else 0.0)
        self.samples.inc(samples)
        self.inference.labels("base").observe(seconds)

    def on_queue(self, waiting: int, live: int) -> None:
        self.queue_depth.set(waiting)
        self.live_jobs.set(live)

    def observe_certificate(self, cert) -> None:
        """Count one answered certificate: outcome, latency, samples, and the auto-mode fallback reason if any."""
        self.requests.labels(cert.method, "certified" if cert.certified else "abstained").inc()
        self.latency.labels(cert.method).observe(cert.timings.total_ms / 1e3)
        self.samples_per_certificate.labels(cert.method).observe(cert.samples)
        if cert.fallback_reason is not None:
            self.fallbacks.labels(cert.fallback_reason).inc()

    def observe_rejected(self, code: str) -> None:
        """One error answer, under its code (certserve_rejected_requests_total)."""
        self.rejected.labels(code).inc()

    def observe_cancelled(self, mode: str, route: str | None = None) -> None:
        """One job dropped before its certificate (client gone, or the request cancelled by the server), under
        ``route`` where its certificate was built already (it waited on its audit record: an auto request's surrogate
        answer too), else under the route that waited on the engine: mode=auto's sequential fallback; every other
        mode is its own route."""
        self.requests.labels(route or ("sequential" if mode == "auto" else mode), "cancelled").inc()

    def on_seal(self, seconds: float) -> None:
        """One certificate sealed (input hashes, signature, audit line) in ``seconds`` (called by the service)."""
        self.seal.observe(seconds)

    def on_audit_failure(self) -> None:
        """One certificate refused because its audit record could not be written (called by the service)."""
        self.audit_failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
