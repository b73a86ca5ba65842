"""The router: one decoded image + request parameters -> a certificate (surrogate, sequential or Cohen).

No HTTP here (the app maps :class:`CertifyError` to status codes). Routing of ``auto``: the surrogate's certificate
when the bundle has a surrogate, the caller did not ask for a per-input guarantee, the request's alpha >= alpha_cal,
and the calibrated radius is > 0 and >= ``target_radius``; otherwise a sequential job. The tested class and the
Beta prior of a sequential job are computed from the CLEAN image (surrogate arg-max, meta-learner on clean
features) before the job is submitted, i.e. before any noise sample exists.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from models.bundle import Bundle
from models.priors import meta_features, softmax
from models.sampling import SamplingEngine
from server.metrics import Metrics
from server.schemas import Certificate, CertifyParams, Guarantee, ModelCard, ModelInfo, Timings
from server.settings import Settings
from server.worker import EngineStopped, JobResult, JobSpec, QueueFull, SequentialEngine
from smoothing import rrise_lower, rrise_radius

STATEMENTS = {
    "conformal-marginal": "over inputs exchangeable with the calibration split, P(radius exceeds the smoothed "
                          "classifier's true radius for this class) <= alpha, unconditionally over all inputs (not "
                          "given that the surrogate answered); not a per-input guarantee",
    "anytime-valid": "for this input, P(certificate wrong) <= alpha, valid at whatever time sampling stopped",
    "clopper-pearson": "for this input, P(certificate wrong) <= alpha (Cohen et al. 2019, fixed n)",
}


class CertifyError(Exception):
    """A request that cannot be served as asked; ``status`` is the HTTP status, ``code`` a stable error code."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


class Certifier:
    """Owns the bundle's sessions and the sequential engine of this process."""

    def __init__(self, bundle: Bundle, settings: Settings, metrics: Metrics, *, seed: int | None = None):
        self.bundle, self.settings, self.metrics = bundle, settings, metrics
        m = self.manifest = bundle.manifest
        self.classes = list(m.classes)
        self.shape = tuple(m.input.shape)
        # clean forward passes run on the request path: small, single-threaded CPU sessions
        self.base = bundle.backend("base", threads=1, device="cpu")
        self.surrogate = bundle.backend("surrogate", threads=1, device="cpu") if bundle.path("surrogate") else None
        self.meta = bundle.backend("meta", threads=1, device="cpu") if bundle.path("meta") else None
        sampler = bundle.backend("base", threads=settings.threads or None, device=settings.device)
        batch = settings.batch_size or (16384 if sampler.device == "cuda" else 1024)
        self.engine = SequentialEngine(SamplingEngine(sampler, sigma=m.sigma, num_classes=len(self.classes),
                                                      batch_size=batch),
                                       max_live_jobs=settings.max_live_jobs, seed=seed, observer=metrics)
        self.model_info = ModelInfo(name=m.name, version=m.version, sha256=bundle.model_sha256)

    def card(self) -> ModelCard:
        m = self.manifest
        return ModelCard(name=m.name, version=m.version, sha256=self.bundle.model_sha256, sigma=m.sigma,
                         input_shape=self.shape, classes=self.classes, has_surrogate=self.surrogate is not None,
                         has_meta_prior=self.meta is not None,
                         alpha_cal=m.calibration.alpha_cal if m.calibration else None,
                         default_alpha=self.settings.default_alpha, max_samples=self.settings.max_samples)

    def warm_up(self) -> None:
        """Run every session once and one tiny engine job, so the first request pays no initialization."""
        x = np.full((1, *self.shape), 0.5, dtype=np.float32)
        self._class_and_prior(x[0], None)
        self.engine.start()
        fut = self.engine.submit(JobSpec(x[0], 0.5, 64, time.monotonic() + 60))
        fut.result(timeout=120)

    async def certify(self, image: np.ndarray, params: CertifyParams, *, request_id: str, decode_ms: float,
                      preprocessing: list[str], received: float | None = None) -> Certificate:
        """Certify one decoded image. ``received`` (time.monotonic() at arrival) anchors the deadline."""
        started = time.perf_counter()
        arrival = received if received is not None else time.monotonic()
        s = self.settings
        alpha = params.alpha if params.alpha is not None else s.default_alpha
        cal = self.manifest.calibration
        mode = params.mode
        if mode == "surrogate":
            self._check_surrogate_mode(alpha, params)
        need_surrogate = self.surrogate is not None and mode in ("auto", "surrogate", "sequential")
        t0 = time.perf_counter()
        probs = softmax(self.surrogate.forward(image[None]))[0] if need_surrogate else None
        surrogate_ms = (time.perf_counter() - t0) * 1e3 if need_surrogate else None

        common = dict(request_id=request_id, preprocessing=preprocessing, model=self.model_info)
        fallback = None
        if mode in ("auto", "surrogate") and probs is not None:
            c_sur = int(np.argmax(probs))
            p_hat = float(probs[c_sur])
            radius = float(rrise_radius(p_hat, cal.q_hat, self.manifest.sigma, cal.score_epsilon))
            fallback = self._fallback_reason(alpha, params, radius) if mode == "auto" else None
            if fallback is None:
                certified = radius > 0
                return Certificate(
                    class_index=c_sur if certified else -1, class_name=self.classes[c_sur] if certified else None,
                    certified=certified, radius=radius, method="surrogate",
                    guarantee=Guarantee(kind="conformal-marginal", alpha=cal.alpha_cal,
                                        statement=STATEMENTS["conformal-marginal"]),
                    samples=0, p_lower=float(rrise_lower(p_hat, cal.q_hat, cal.score_epsilon)),
                    stopped_by="certified" if certified else "abstained",
                    timings=Timings(decode_ms=decode_ms, surrogate_ms=surrogate_ms,
                                    total_ms=decode_ms + (time.perf_counter() - started) * 1e3), **common)
        elif mode == "auto":
            fallback = "no_surrogate"
        if fallback is not None:
            self.metrics.fallbacks.labels(fallback).inc()
        # auto is the latency-oriented path: a fallback without its own budget gets auto_max_samples (on held-out
        # images: ~40% fewer samples than the full budget for -0.001 mean radius); explicit modes get max_samples
        default_budget = s.auto_max_samples if mode == "auto" else s.max_samples
        budget = min(params.max_samples or default_budget, s.max_samples)

        # sequential or cohen: class and prior fixed from the clean image, then the job goes to the engine
        t0 = time.perf_counter()
        deadline = arrival + (params.deadline_ms or s.default_deadline_ms) / 1e3
        if mode == "cohen":
            spec = JobSpec(image, alpha, budget, deadline, kind="cohen", n0=s.cohen_n0)
        else:
            tested, prior = self._class_and_prior(image, probs)
            spec = JobSpec(image, alpha, budget, deadline, tested_class=tested, prior=prior,
                           target_radius=params.target_radius)
        prior_ms = (time.perf_counter() - t0) * 1e3
        result = await self._run_job(spec)
        method = "cohen" if mode == "cohen" else "sequential"
        kind = "clopper-pearson" if mode == "cohen" else "anytime-valid"
        certified = result.class_index >= 0
        return Certificate(
            class_index=result.class_index, class_name=self.classes[result.class_index] if certified else None,
            certified=certified, radius=result.radius, method=method,
            guarantee=Guarantee(kind=kind, alpha=alpha, statement=STATEMENTS[kind]),
            samples=result.samples, p_lower=result.p_lower, fallback_reason=fallback,
            stopped_by=result.stopped_by,
            timings=Timings(decode_ms=decode_ms, surrogate_ms=surrogate_ms, prior_ms=prior_ms,
                            queue_ms=result.queue_seconds * 1e3, sampling_ms=result.sampling_seconds * 1e3,
                            total_ms=decode_ms + (time.perf_counter() - started) * 1e3), **common)

    def _check_surrogate_mode(self, alpha: float, params: CertifyParams) -> None:
        cal = self.manifest.calibration
        if self.surrogate is None:
            raise CertifyError(422, "no_surrogate", "this bundle has no surrogate; use mode=sequential or cohen")
        if params.per_input:
            raise CertifyError(422, "per_input_unavailable", "the surrogate's guarantee is marginal, not per input; "
                               "use mode=auto or sequential")
        if alpha < cal.alpha_cal:
            raise CertifyError(422, "alpha_below_alpha_cal", f"the surrogate is calibrated at alpha_cal = "
                               f"{cal.alpha_cal}; alpha = {alpha} needs mode=auto or sequential")

    def _fallback_reason(self, alpha: float, params: CertifyParams, radius: float) -> str | None:
        if params.per_input:
            return "per_input_requested"
        if alpha < self.manifest.calibration.alpha_cal:
            return "alpha_below_alpha_cal"
        if radius <= 0:
            return "surrogate_abstained"
        if params.target_radius is not None and radius < params.target_radius:
            return "below_target_radius"
        return None

    def _class_and_prior(self, image: np.ndarray, probs: np.ndarray | None) -> tuple[int, tuple[float, float]]:
        """Tested class and Beta prior from clean forward passes only (before any noise sample is drawn)."""
        logits = self.base.forward(image[None])
        if probs is None and self.surrogate is not None:
            probs = softmax(self.surrogate.forward(image[None]))[0]
        feats, tested = meta_features(logits, None if probs is None else probs[None])
        prior = self.meta.forward(feats)[0] if self.meta is not None else np.array([0.5, 0.5])
        return int(tested[0]), (float(prior[0]), float(prior[1]))

    async def _run_job(self, spec: JobSpec) -> JobResult:
        try:
            fut = self.engine.submit(spec)
        except QueueFull as exc:
            self.metrics.rejected.labels("queue_full").inc()
            raise CertifyError(503, "overloaded", f"server busy: {exc}; retry later", retry_after=1) from None
        except EngineStopped as exc:
            self.metrics.rejected.labels("draining").inc()
            raise CertifyError(503, "draining", str(exc), retry_after=5) from None
        waiter = asyncio.wrap_future(fut)
        try:
            remaining = spec.deadline - time.monotonic()
            try:
                return await asyncio.wait_for(asyncio.shield(waiter), timeout=max(0.0, remaining))
            except TimeoutError:
                # deadline: answer now with the (valid) certificate reached so far, not after the running batch
                self.engine.finish_now(fut, "deadline")
                return await waiter
        except asyncio.CancelledError:
            fut.cancel()  # client gone: the engine drops the job at its next step
            raise
