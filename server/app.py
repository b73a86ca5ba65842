"""The HTTP app: named stages per request (parse -> decode -> certify -> encode) over one certification service.

``create_app`` is the one place where things are wired: settings, metrics, middleware, the error contract, the
routes, and the lifespan (verify the bundle, build and warm up the service, then ready; on shutdown drain). Routes read
what they need from ``request.app.state``; the service (:mod:`certification.service`) knows no HTTP.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from certification.errors import ServiceError
from certification.seal import audit_unavailable, certserve_version
from certification.service import CertificationService, Routed
from models.bundle import Bundle, load_bundle
from server.errors import error_body, error_responses, install_error_handlers
from server.metrics import CONTENT_TYPE, Metrics
from server.middleware import BodyLimit, RequestContext
from server.requests import Decoded, decode_all, parse_request, request_pixel_limit
from server.schemas import BatchResponse, Certificate, CertifyParams, HealthResponse, JWKS, ModelCard, \
    ReadyResponse, request_body_doc, request_schemas
from server.settings import Settings, get_settings

log = logging.getLogger("certserve")
_ERRORS = error_responses(400, 401, 408, 413, 415, 422, 431, 499, 500, 503)  # every status a certify route answers
_STARTING = error_responses(503, only=("starting",))


def build_service(settings: Settings, *, observer=None, seed: int | None = None,
                  bundle: Bundle | None = None) -> CertificationService:
    """The certification service of ``settings`` (not started): the one constructor of the app's lifespan and of a
    Ray Serve replica (server/ray_serve.py). ``bundle``: ``settings.bundle`` already loaded and verified (by
    ``certserve serve``'s start-up check); else it is loaded here."""
    if bundle is None:
        bundle = load_bundle(settings.bundle)  # verifies hashes, shapes and schema; raises BundleError
    # The engine thread's bookkeeping (numpy on small arrays, which keeps the GIL) and the event loop share the GIL;
    # a waking loop waits for it up to the switch interval. 0.5 ms instead of Python's 5 helped the surrogate's p99
    # with 8 sequential requests in flight on one 2-core machine (10.2 -> 8.4 ms) but not on another (7.0 -> 7.6),
    # and cost surrogate-only bursts on both (43.6 -> 47.2, 40.6 -> 45.2 ms; docs/benchmarks.md (b)): the default
    # keeps 5. Process-wide: this process serves one app.
    sys.setswitchinterval(settings.gil_switch_ms / 1e3)
    return CertificationService(bundle, settings.service_config(), observer=observer, seed=seed)


def create_app(settings: Settings | None = None, *, service: CertificationService | None = None,
               metrics: Metrics | None = None, seed: int | None = None, bundle: Bundle | None = None) -> FastAPI:
    """The app. Without ``service`` the lifespan builds one from ``settings.bundle`` (or from ``bundle``, that bundle
    already verified) and stops it on shutdown; with one (e.g. built by a Ray Serve replica, with ``metrics`` as its
    engine observer), its owner starts and stops it."""
    settings = settings or get_settings()
    metrics = metrics if metrics is not None else Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = service is None  # the app builds its own service on every start-up and stops it on shutdown
        if owned:
            app.state.service = build_service(settings, observer=metrics, seed=seed, bundle=bundle)
            await asyncio.to_thread(app.state.service.start)
        # image decoding, off the event loop (server.requests); a few threads: decodes queue rather than
        # crowd out the event loop and the sampler
        app.state.decoder = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="certserve-decode")
        app.state.ready = True
        log.info("certserve ready: bundle %s, sampler %s", app.state.service.manifest.name,
                 app.state.service.engine.sampler.backend.name)
        try:
            yield
        finally:
            app.state.ready = False
            try:
                if owned:
                    await asyncio.to_thread(app.state.service.stop, settings.drain_seconds)
            finally:  # decodes already queued still run; a new one is refused (503 draining, server.requests)
                app.state.decoder.shutdown(wait=False)

    app = FastAPI(title="certserve", version=certserve_version(), lifespan=lifespan, redirect_slashes=False,
                  description="Certified robustness (randomized smoothing) for image classifiers: a calibrated "
                              "surrogate in one forward pass, an anytime-valid sequential test when needed.")
    app.state.settings, app.state.metrics, app.state.service = settings, metrics, service
    app.state.ready, app.state.draining, app.state.inflight = False, False, 0
    app.state.decoder = None  # the lifespan's decode executor (None: asyncio's default)
    metrics.ready.set_function(lambda: float(readiness(app.state) == "ready"))  # read at scrape time, as /readyz
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, on_reject=metrics.observe_rejected,
                       timeout=settings.body_timeout_seconds)
    app.add_middleware(RequestContext, on_internal_error=metrics.internal_errors.inc,
                       on_reject=metrics.observe_rejected)
    install_error_handlers(app, on_error=metrics.observe_rejected)
    app.include_router(router)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document plus the JSON request schemas that the request bodies reference."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        doc.setdefault("components", {}).setdefault("schemas", {}).update(request_schemas())
        app.openapi_schema = doc
    return app.openapi_schema


async def require_key(request: Request) -> None:
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    supplied = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        supplied = auth[7:].strip()
    if not any(hmac.compare_digest(supplied.encode(), k.encode()) for k in keys):
        raise ServiceError("unauthorized", "a valid API key is required (header 'Authorization: Bearer <key>' or "
                                           "'X-API-Key')")


async def admit(request: Request):
    """Bound the certification requests in flight at the HTTP layer: beyond, 503 at once (not a slow queue). While
    the audit log is unwritable, 503 audit_unavailable at once: no noise is sampled for a certificate it refuses."""
    state = request.app.state
    if state.service is not None and not state.service.sealer.audit_available():
        raise audit_unavailable()
    limit = state.settings.max_inflight_requests
    if state.inflight >= limit:
        raise ServiceError("inflight_limit", f"{limit} requests in flight; retry later", retry_after=1)
    state.inflight += 1
    try:
        yield
    finally:
        state.inflight -= 1


router = APIRouter()
_GUARDS = [Depends(require_key), Depends(admit)]


@router.post("/certify", response_model=Certificate, responses=_ERRORS, openapi_extra=request_body_doc(batch=False),
             dependencies=_GUARDS, summary="Certify one image",
             description="The image as a multipart file field `image`, as JSON (`image`: base64 or a nested array "
                         "in [0, 1]), or as an application/x-www-form-urlencoded form (`image`: base64 text); the "
                         "parameters as form fields or JSON keys, each at most once (a repeated field or JSON key is "
                         "422 bad_request). Needs an API key when the server has CERTSERVE_API_KEYS.")
async def certify(request: Request) -> Certificate:
    images, params = await parse_request(request, batch=False)
    (decoded,) = await _decode(request, images, params)
    try:
        cert = await _certify_one(request, decoded, params)
    finally:
        _stop_watching(request)
    _observe_http(request, "/certify")
    return cert


@router.post("/certify/batch", response_model=BatchResponse, responses=_ERRORS,
             openapi_extra=request_body_doc(batch=True), dependencies=_GUARDS,
             summary="Certify several images with the same parameters",
             description="`images`: a repeated form field or a JSON list, at most CERTSERVE_MAX_BATCH_IMAGES "
                         "(default 64; beyond, 422 too_many_images); the parameters and encodings of POST /certify. "
                         "One failed image refuses the whole batch. Needs an API key when the server has "
                         "CERTSERVE_API_KEYS.")
async def certify_batch(request: Request) -> BatchResponse:
    images, params = await parse_request(request, batch=True)
    limit = request.app.state.settings.max_batch_images
    if len(images) > limit:
        raise ServiceError("too_many_images", f"at most {limit} images per batch request; got {len(images)}")
    decoded = await _decode(request, images, params)  # every image, before any job starts
    routes = await _admit_batch(request, decoded, params)
    jobs = []
    try:
        for d, routed in zip(decoded, routes):  # one image's surrogate pass and seal per loop turn: started all at
            if jobs:  # once, a batch of 64 ran back to back (~40 ms) before any other request's step
                await asyncio.sleep(0)
            jobs.append(asyncio.ensure_future(_certify_one(request, d, params, count=False, routed=routed)))
        results = await asyncio.gather(*jobs)
    except asyncio.CancelledError:  # (also between two starts: no job is left running)
        for job in jobs:
            job.cancel()
        raise
    except Exception as exc:  # one image failed (e.g. queue_full): the batch is refused, its other jobs dropped now
        await _drop_batch(request, exc, jobs)  # (not left running after the answer)
        raise  # refused: no image of the batch is counted, not even one certified before the failure
    finally:
        _stop_watching(request)
    for cert in results:  # counted once the batch is answered
        request.app.state.metrics.observe_certificate(cert)
    _observe_http(request, "/certify/batch")
    return BatchResponse(results=list(results))


async def _admit_batch(request: Request, decoded: list[Decoded], params: CertifyParams) -> list:
    """Refuse, before any job starts, a batch that needs more engine jobs than CERTSERVE_MAX_LIVE_JOBS: not even an
    idle engine could hold them at once, so 503 queue_full + Retry-After would be retried in vain; 422
    too_many_images says to split it. A batch within the limit may still get 503 queue_full from a busy engine.

    Only a batch of more images than the limit can need more jobs. Where the surrogate may answer some of its images
    (``auto`` with a surrogate that can route), each image is routed here (its surrogate pass, one per loop turn) and
    the routes are returned for the certification to reuse; else a list of None (routed as each image starts)."""
    service, live = request.app.state.service, request.app.state.settings.max_live_jobs
    routes: list = [None] * len(decoded)
    if len(decoded) <= live or params.mode == "surrogate":  # (mode=surrogate never samples)
        return routes
    if service.samples_every_image(params):
        needed = len(decoded)
    else:
        for i, d in enumerate(decoded):
            if i:
                await asyncio.sleep(0)
            routes[i] = service.route(d.image, params, received=request.state.received)
        needed = sum(routed.needs_job for routed in routes)
    if needed > live:
        raise ServiceError("too_many_images", f"this batch needs {needed} sampling jobs (one per image the surrogate "
                                              f"does not answer) but the server runs at most {live} at once "
                                              f"(CERTSERVE_MAX_LIVE_JOBS = {live}), so no retry can pass it; split it "
                                              f"into batches of at most {live} images")
    return routes


async def _drop_batch(request: Request, exc: Exception, jobs: list) -> None:
    """A batch is refused for one image's error: cancel its other jobs now. They count as cancelled only when the
    client went away; then the images certified before are counted, as /certify counts them."""
    refused = request.state.batch_refused = getattr(exc, "code", None) != "client_closed_request"
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)
    if not refused:
        for job in jobs:
            if not job.cancelled() and job.exception() is None:
                request.app.state.metrics.observe_certificate(job.result())


def _observe_http(request: Request, route: str) -> None:
    """certserve_http_request_duration_seconds: arrival (RequestContext) to the answered response object."""
    request.app.state.metrics.http_latency.labels(route).observe(time.monotonic() - request.state.received)


async def _decode(request: Request, images: list, params: CertifyParams) -> list[Decoded]:
    state, settings = request.app.state, request.app.state.settings
    shape = state.service.shape
    return await decode_all(images, params, shape=shape, max_pixels=settings.max_pixels, executor=state.decoder,
                            request_pixels=request_pixel_limit(settings.max_pixels, settings.max_batch_images, shape))


async def _certify_one(request: Request, d: Decoded, params: CertifyParams, *, count: bool = True,
                       routed: Routed | None = None) -> Certificate:
    """certify a decoded image (cancelled when the client goes away) -> count (``count=False``: the caller counts
    the certificate, a batch once it is answered); ``routed``: its route if already decided (:func:`_admit_batch`)."""
    state = request.app.state
    service: CertificationService = state.service
    routes: list[str] = []  # the certificate's route once built (it may then wait on its audit record)
    work = asyncio.ensure_future(service.certify(d.image, params, request_id=request.state.request_id,
                                                 decode_ms=d.decode_ms, preprocessing=d.steps,
                                                 received=request.state.received, input_sha256=d.input_sha256,
                                                 input_encoding=d.input_encoding, on_route=routes.append,
                                                 routed=routed))
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, work))
    try:
        cert = await work
    except asyncio.CancelledError:
        if not getattr(request.state, "batch_refused", False):  # a refused batch's other images: not cancellations
            state.metrics.observe_cancelled(params.mode, routes[0] if routes else None)
        if watcher.done() and not watcher.cancelled() and watcher.result():
            # the client went away: the job was dropped; nobody reads this answer
            raise ServiceError("client_closed_request", "the client closed the connection") from None
        raise
    finally:
        watcher.cancel()
    if count:
        state.metrics.observe_certificate(cert)
    return cert


async def _cancel_on_disconnect(request: Request, work: asyncio.Future) -> bool:
    """Cancel ``work`` when the client disconnects; True when it did."""
    if work.done():  # the surrogate's answer: no wait, nothing to watch
        return False
    gone = _disconnect_watch(request)
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    if work.done() or gone.cancelled() or gone.exception() is not None:
        return False
    work.cancel()
    return True


def _disconnect_watch(request: Request) -> asyncio.Task:
    """The request's one watch for its client going away (shared by a batch's images; the route stops it): ONE
    ``receive()`` kept pending until ``http.disconnect``, never a poll. Each receive() call resumes reading the
    connection (uvicorn's flow control), so polling it every 50 ms let a client pipeline its next request's body
    into the server's memory without limit while this one sampled, past the body limit and the admission limit."""
    watch = getattr(request.state, "disconnect_watch", None)
    if watch is None:
        watch = request.state.disconnect_watch = asyncio.ensure_future(_until_disconnect(request.receive))
    return watch


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":  # the body was read whole: uvicorn sends nothing else
        await asyncio.sleep(0.05)  # (an ASGI server that answers at once with empty bodies is not spun on)


def _stop_watching(request: Request) -> None:
    watch = getattr(request.state, "disconnect_watch", None)
    if watch is not None:
        watch.cancel()


@router.get("/healthz", response_model=HealthResponse, summary="Liveness",
            description="200 `{\"status\": \"ok\"}` while the process can serve, also while it starts, drains or "
                        "its audit log is unwritable (those pass). 503 `engine_down` once the sampling engine's thread "
                        "has died after start-up: it never comes back, so the process must be restarted.",
            responses=error_responses(503, only=("engine_down",)))
async def healthz(request: Request):
    if readiness(request.app.state) == "engine_down":
        return _probe_refusal(request, "engine_down", "the sampling engine's thread has stopped: restart this process")
    return {"status": "ok"}


def _probe_refusal(request: Request, code: str, message: str) -> JSONResponse:
    """A probe's 503 + Retry-After with the error envelope, counted as every other error answer."""
    request.app.state.metrics.observe_rejected(code)
    return JSONResponse(error_body(code, message, request.state.request_id), status_code=503,
                        headers={"Retry-After": "1"})


def readiness(state) -> str:
    """ready, or why not (starting, draining, engine_down, audit_unavailable): GET /readyz and the certserve_ready
    gauge."""
    if state.draining:
        return "draining"
    if not state.ready:
        return "starting"
    if state.service is None or not state.service.alive:
        return "engine_down"
    return "ready" if state.service.sealer.audit_available() else "audit_unavailable"


@router.get("/readyz", summary="Readiness: 200 {\"status\": \"ready\"} or 503 with the error envelope",
            description="200 `{\"status\": \"ready\"}` once the bundle is verified and the engine is warm. Otherwise "
                        "503 + Retry-After with the error envelope, code `engine_down` (the sampling engine's thread "
                        "has died), `audit_unavailable` (an audit record could not be written and the log is not "
                        "writable yet; certification requests are refused up front meanwhile) or, behind Ray Serve "
                        "only, `starting` / `draining`: a single `certserve serve` "
                        "process accepts no connection before it is ready and stops accepting new ones on SIGTERM.",
            responses={200: {"model": ReadyResponse},
                       **error_responses(503, only=("engine_down", "audit_unavailable", "starting", "draining"))})
async def readyz(request: Request) -> JSONResponse:
    status = readiness(request.app.state)
    if status == "ready":
        return JSONResponse({"status": "ready"})
    return _probe_refusal(request, status, f"not ready: {status}")


@router.get("/.well-known/jwks.json", summary="Public keys that verify signed certificates (JWKS, RFC 7517)",
            responses={200: {"model": JWKS}, **_STARTING})
async def jwks(request: Request) -> JSONResponse:
    service = request.app.state.service
    if service is None or not request.app.state.ready:
        raise ServiceError("starting", "the bundle is still loading", retry_after=1)
    return JSONResponse(service.sealer.jwks(), headers={"Cache-Control": "public, max-age=300"})


@router.get("/v1/models", response_model=list[ModelCard], summary="The served bundle", responses=_STARTING)
async def models(request: Request) -> list[ModelCard]:
    service = request.app.state.service
    if service is None or not request.app.state.ready:
        raise ServiceError("starting", "the bundle is still loading", retry_after=1)
    return [service.card()]


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
