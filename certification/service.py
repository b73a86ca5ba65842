"""The certification service: one decoded image + request parameters -> a certificate. No HTTP here.

One service per process (per replica) owns the bundle's clean-pass sessions and the batching engine. A request:
surrogate forward pass (when the mode can use it) -> :func:`certification.plan.make_plan` -> either the surrogate's
calibrated certificate, or a job for the engine whose tested class and Beta prior are computed from the CLEAN image
(:func:`models.priors.class_and_prior`) before it is submitted, i.e. before any noise sample exists. The engine owns
the deadline: it answers the job then with the certificate reached so far.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from certification.certificate import Certificate, ModelCard, ModelInfo, Timings, build_certificate
from certification.config import ServiceConfig
from certification.errors import ServiceError
from certification.plan import CertifyParams, Plan, make_plan, request_alpha, samples_every_image
from certification.seal import Sealer
from models.backends import ThreadPriority
from models.bundle import Bundle
from models.defaults import default_batch_size
from models.engine import EngineObserver, EngineStopped, JobResult, JobSpec, QueueFull, SequentialEngine
from models.priors import class_and_prior, softmax
from models.sampling import SamplingEngine
from models.surrogate import SurrogateAnswer, surrogate_answer
from smoothing import PER_INPUT_MIN_GAIN, planned_sample_size, proposal_radius
from smoothing.kernels import warm_up as warm_up_kernels


@dataclass(frozen=True)
class Routed:
    """One image's route, decided before any job starts (:meth:`CertificationService.route`): the surrogate's logits
    and answer (None where the mode does not use it), the plan, and when routing started (``time.perf_counter()``,
    the start of the certificate's ``total_ms``)."""

    logits: np.ndarray | None
    surrogate_ms: float | None
    answer: SurrogateAnswer | None
    plan: Plan
    started: float

    @property
    def needs_job(self) -> bool:
        """Whether this image becomes an engine job (sequential, fixed, cohen), i.e. takes one of max_live_jobs."""
        return self.plan.route != "surrogate"


class CertificationService:
    """Owns the bundle's sessions and the engine of this process; ``certify`` is safe to call concurrently."""

    def __init__(self, bundle: Bundle, config: ServiceConfig, *, observer: EngineObserver | None = None,
                 seed: int | None = None):
        self.bundle, self.config = bundle, config
        m = self.manifest = bundle.manifest
        self.classes = list(m.classes)
        self.shape = tuple(m.input.shape)
        # clean forward passes run on the request path: small, single-threaded CPU sessions
        self.base = bundle.backend("base", threads=1, device="cpu")
        self.surrogate = bundle.backend("surrogate", threads=1, device="cpu") if bundle.path("surrogate") else None
        self.meta = bundle.backend("meta", threads=1, device="cpu") if bundle.path("meta") else None
        # the sampler's threads yield the CPU to the request path (models.backends.ThreadPriority)
        priority = ThreadPriority(nice=config.sampler_nice, idle=config.sampler_idle)
        sampler = bundle.backend("base", threads=config.threads or None, device=config.device,
                                 priority=priority, spin=False)  # bookkeeping overlaps the model call
        sampling = SamplingEngine(sampler, sigma=m.sigma, num_classes=len(self.classes),
                                  batch_size=config.batch_size or default_batch_size(sampler.device),
                                  runner_priority=priority)
        self.engine = SequentialEngine(sampling, max_live_jobs=config.max_live_jobs, seed=seed, observer=observer)
        self.model_info = ModelInfo(name=m.name, version=m.version, sha256=bundle.model_sha256,
                                    manifest_sha256=bundle.manifest_sha256)
        # input hashes, signature, audit record of every certificate
        self.sealer = Sealer.from_config(bundle, config, observer=observer)

    def card(self) -> ModelCard:
        m = self.manifest
        return ModelCard(name=m.name, version=m.version, sha256=self.bundle.model_sha256,
                         manifest_sha256=self.bundle.manifest_sha256, sigma=m.sigma,
                         input_shape=self.shape, classes=self.classes, has_surrogate=self.surrogate is not None,
                         has_meta_prior=self.meta is not None,
                         alpha_cal=m.calibration.alpha_cal if m.calibration else None,
                         calibrated_levels=[lv.alpha for lv in m.calibration.levels] if m.calibration else [],
                         default_alpha=self.config.default_alpha, max_samples=self.config.max_samples)

    def start(self) -> None:
        """Start the engine and run every session once (one tiny job; on a device, one batch per batch shape), so
        the first request pays no setup."""
        x = np.full((1, *self.shape), 0.5, dtype=np.float32)
        warm_up_kernels()  # the sequential path's compiled bounds and rules (numba)
        class_and_prior(self.base, self.surrogate, self.meta, x)
        self.engine.sampler.warm_up(x[0], np.random.default_rng())  # before any job: its samples count for none
        self.engine.start()
        self.engine.submit(JobSpec(x[0], 0.5, 64, time.monotonic() + 60)).result(timeout=120)

    def stop(self, grace: float) -> None:
        """Stop taking jobs; live ones get up to ``grace`` seconds, then their certificate so far."""
        self.engine.stop(grace)
        self.sealer.close()

    def samples_every_image(self, params: CertifyParams) -> bool:
        """Whether every image of a request with ``params`` becomes an engine job (certification.plan)."""
        cal = self.manifest.calibration
        alpha_cal = cal.alpha_cal if cal is not None and self.surrogate is not None else None
        return samples_every_image(params, self.config, alpha_cal=alpha_cal)

    @property
    def alive(self) -> bool:
        return self.engine.alive

    async def certify(self, image: np.ndarray, params: CertifyParams, *, request_id: str, decode_ms: float = 0.0,
                      preprocessing: list[str] | None = None, received: float | None = None,
                      input_sha256: str | None = None, input_encoding: str | None = None,
                      on_route: Callable[[str], None] | None = None, routed: Routed | None = None) -> Certificate:
        """Certify one decoded (C, H, W) image (guarantee: see :meth:`_certify`), then seal the certificate: input
        hashes (``input_sha256`` of the image as received, computed where it was received), signature, audit record.
        Raises ``ServiceError("audit_unavailable")`` instead of answering a certificate that has no audit record.
        ``on_route(route)``: called with the certificate's route once it is built, before it waits on its audit record
        (a request cancelled meanwhile is counted under that route, e.g. an auto request's surrogate answer).
        ``routed``: this image's :meth:`route` for these ``params``, already decided by the caller (else here)."""
        cert = await self._certify(image, params, request_id=request_id, decode_ms=decode_ms,
                                   preprocessing=preprocessing, received=received, routed=routed)
        if on_route is not None:
            on_route(cert.method)
        return await self.sealer.seal_async(cert, image, input_sha256=input_sha256, input_encoding=input_encoding)

    def route(self, image: np.ndarray, params: CertifyParams, *, received: float | None = None) -> Routed:
        """Decide one decoded image's route from clean passes only (the surrogate's forward pass where the mode uses
        it, then :func:`certification.plan.make_plan`); ``received`` (time.monotonic() at arrival) anchors the
        deadline. Raises ServiceError for a mode=surrogate request that the surrogate cannot answer."""
        started = time.perf_counter()
        logits, surrogate_ms = self._surrogate_logits(image, params)
        cal = self.manifest.calibration
        answer = (surrogate_answer(logits, cal, self.manifest.sigma, request_alpha(params, self.config))
                  if logits is not None and params.mode in ("auto", "surrogate") else None)
        plan = make_plan(params, self.config, alpha_cal=cal.alpha_cal if cal else None,
                         surrogate_radius=answer.radius if answer else None, sigma=self.manifest.sigma,
                         arrival=received if received is not None else time.monotonic())
        return Routed(logits, surrogate_ms, answer, plan, started)

    async def _certify(self, image: np.ndarray, params: CertifyParams, *, request_id: str, decode_ms: float = 0.0,
                       preprocessing: list[str] | None = None, received: float | None = None,
                       routed: Routed | None = None) -> Certificate:
        """Certify one decoded (C, H, W) image; ``received`` (time.monotonic() at arrival) anchors the deadline.

        Guarantee of the result (stated in its ``guarantee`` field): surrogate route, marginal over inputs
        exchangeable with the calibration inputs of the same Mondrian bin and over the calibration draw, at the
        bundle's largest calibrated level <= the request's alpha (``guarantee.alpha``; models.surrogate); sequential
        route, per input at the request's alpha at whatever time sampling stopped; fixed route, per input at the
        request's alpha (Clopper-Pearson on n planned from the clean image, class from the clean image; a deadline
        cut depends on the clock only); cohen route, per input at the request's alpha (Clopper-Pearson with
        separate selection samples)."""
        routed = routed if routed is not None else self.route(image, params, received=received)
        logits, surrogate_ms, answer, plan, started = (routed.logits, routed.surrogate_ms, routed.answer, routed.plan,
                                                       routed.started)
        common = dict(classes=self.classes, model=self.model_info, request_id=request_id,
                      preprocessing=preprocessing or [], fallback_reason=plan.fallback_reason)
        if plan.route == "surrogate":
            certified = answer.radius > 0
            return build_certificate(
                route="surrogate", class_index=answer.class_index if certified else -1, radius=answer.radius,
                p_lower=answer.p_lower if certified else None,  # below 1/2 nothing was calibrated (labels clip there)
                samples=0, stopped_by="certified" if certified else "abstained",
                guarantee_alpha=answer.level, timings=Timings(decode_ms=decode_ms, surrogate_ms=surrogate_ms,
                                                              total_ms=decode_ms + (time.perf_counter() - started) * 1e3),
                **common)
        t0 = time.perf_counter()
        if plan.route == "fixed":  # planning n takes tens of ms: off the event loop (surrogate answers go on)
            spec = await asyncio.to_thread(self._job_spec, image, plan, logits, answer)
        else:
            spec = self._job_spec(image, plan, logits, answer)
        prior_ms = (time.perf_counter() - t0) * 1e3
        result = await self._run_job(spec)
        stopped_by = "planned" if plan.route == "fixed" and result.stopped_by == "budget" else result.stopped_by
        return build_certificate(
            route=plan.route, class_index=result.class_index, radius=result.radius, p_lower=result.p_lower,
            samples=result.samples, stopped_by=stopped_by, guarantee_alpha=plan.alpha,
            timings=Timings(decode_ms=decode_ms, surrogate_ms=surrogate_ms, prior_ms=prior_ms,
                            queue_ms=result.queue_seconds * 1e3, sampling_ms=result.sampling_seconds * 1e3,
                            total_ms=decode_ms + (time.perf_counter() - started) * 1e3), **common)

    def _surrogate_logits(self, image: np.ndarray, params: CertifyParams) -> tuple[np.ndarray | None, float | None]:
        """The surrogate's logits (1, K) of the clean image, where the mode uses them (routing, class, proposal)."""
        if self.surrogate is None or params.mode == "cohen":
            return None, None
        t0 = time.perf_counter()
        logits = self.surrogate.forward(image[None])
        return logits, (time.perf_counter() - t0) * 1e3

    def _job_spec(self, image: np.ndarray, plan: Plan, logits: np.ndarray | None,
                  answer: SurrogateAnswer | None) -> JobSpec:
        """The engine job; for sequential, class, prior and the proposed radius (an auto fallback's proposal: the
        surrogate's shrunk point estimate) come from clean forward passes only, before any noise sample exists.
        Auto fallbacks without a target (the per-input path) stop by the latency-oriented lambda PER_INPUT_MIN_GAIN,
        with or without a proposal."""
        if plan.route == "cohen":
            return JobSpec(image, plan.alpha, plan.budget, plan.deadline, kind="cohen", n0=self.config.cohen_n0)
        tested, priors = class_and_prior(self.base, self.surrogate, self.meta, image[None],
                                         None if logits is None else softmax(logits))
        c, prior = int(tested[0]), (float(priors[0, 0]), float(priors[0, 1]))
        if plan.route == "fixed":  # n from the clean-image prior only: fixed before any noise sample exists
            n = int(planned_sample_size(*prior, sigma=self.manifest.sigma, alpha=plan.alpha, budget=plan.budget))
            return JobSpec(image, plan.alpha, n, plan.deadline, kind="fixed", tested_class=c, prior=prior)
        proposal = (float(proposal_radius(answer.z_hat, sigma=self.manifest.sigma))
                    if plan.proposal and answer is not None else None)
        proposal = proposal if proposal else None  # radius 0 (z_hat <= 0) proposes nothing: it would stop the job
        # at its first L_t > 1/2, a tiny radius; without it the job keeps the best-radius rule (smoothing.stopping)
        return JobSpec(image, plan.alpha, plan.budget, plan.deadline, tested_class=c, prior=prior,
                       target_radius=plan.target_radius, proposal_radius=proposal,
                       min_gain=PER_INPUT_MIN_GAIN if plan.per_input_lambda else None)

    async def _run_job(self, spec: JobSpec) -> JobResult:
        try:
            fut = self.engine.submit(spec)
        except QueueFull as exc:
            raise ServiceError("queue_full", f"server busy: {exc}; retry later", retry_after=1) from None
        except EngineStopped as exc:  # stopping (a drain), or its thread died on a fault (as GET /readyz says)
            if self.engine.alive or self.engine.stopping:
                raise ServiceError("draining", str(exc), retry_after=5) from None
            raise ServiceError("engine_down", "the sampling engine's thread has stopped; route traffic to another "
                                              "replica", retry_after=5) from None
        try:
            return await asyncio.wrap_future(fut)  # the engine answers by the deadline at the latest
        except asyncio.CancelledError:
            fut.cancel()  # client gone: the engine drops the job at its next step
            raise

