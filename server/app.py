"""FastAPI app: thin routes over :class:`server.certifier.Certifier`; lifespan = verify bundle, warm up, then ready.

A request: body limit (ASGI middleware) -> API key -> parse form/JSON into :class:`CertifyParams` -> decode image
(:mod:`server.imaging`) -> :meth:`Certifier.certify` (surrogate, or a job for the engine of :mod:`server.worker`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from models.bundle import load_bundle
from server.certifier import Certifier, CertifyError
from server.imaging import ImageError, decode_image
from server.metrics import CONTENT_TYPE, Metrics
from server.schemas import (BatchResponse, Certificate, CertifyParams, ErrorResponse, JSONBatchRequest,
                            JSONCertifyRequest, ModelCard)
from server.settings import Settings, get_settings

log = logging.getLogger("certserve")
_ERRORS = {status: {"model": ErrorResponse} for status in (401, 413, 415, 422, 503)}
_BODY_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or .npy"},
        **{k: {"type": "string"} for k in CertifyParams.model_fields}}}},
    "application/json": {"schema": {"$ref": "#/components/schemas/JSONCertifyRequest"}}}}}
_BATCH_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        **{k: {"type": "string"} for k in CertifyParams.model_fields}}}},
    "application/json": {"schema": {"$ref": "#/components/schemas/JSONBatchRequest"}}}}}


def create_app(settings: Settings | None = None, *, seed: int | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        metrics = app.state.metrics
        bundle = load_bundle(settings.bundle)  # verifies hashes, shapes and schema; raises BundleError
        certifier = Certifier(bundle, settings, metrics, seed=seed)
        await asyncio.to_thread(certifier.warm_up)
        app.state.certifier = certifier
        app.state.ready = True
        metrics.ready.set(1)
        log.info("certserve ready: bundle %s (%s), sampler %s", bundle.manifest.name, bundle.root,
                 certifier.engine.sampler.backend.name)
        try:
            yield
        finally:
            app.state.ready = False
            metrics.ready.set(0)
            await asyncio.to_thread(certifier.engine.stop, settings.drain_seconds)

    app = FastAPI(title="certserve", version="0.1.0", lifespan=lifespan,
                  description="Certified robustness (randomized smoothing) for image classifiers: a calibrated "
                              "surrogate in one forward pass, an anytime-valid sequential test when needed.")
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.ready = False
    app.state.draining = False
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestId)
    _install_error_handlers(app)

    def require_key(request: Request) -> None:
        keys = settings.api_keys
        if not keys:
            return
        supplied = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            supplied = auth[7:].strip()
        if not any(hmac.compare_digest(supplied.encode(), k.encode()) for k in keys):
            raise CertifyError(401, "unauthorized", "a valid API key is required (header 'Authorization: Bearer "
                                                    "<key>' or 'X-API-Key')")

    inflight = {"n": 0}

    async def admit(request: Request):
        """Bound the certification requests in flight at the HTTP layer: beyond, 503 at once (not a slow queue)."""
        if inflight["n"] >= settings.max_inflight_requests:
            app.state.metrics.rejected.labels("inflight_limit").inc()
            raise CertifyError(503, "overloaded", f"{settings.max_inflight_requests} requests in flight; retry later",
                               retry_after=1)
        inflight["n"] += 1
        try:
            yield
        finally:
            inflight["n"] -= 1

    @app.post("/certify", response_model=Certificate, responses=_ERRORS, openapi_extra=_BODY_DOC,
              dependencies=[Depends(require_key), Depends(admit)], summary="Certify one image")
    async def certify(request: Request) -> Certificate:
        images, params = await _parse(request, batch=False)
        return await _certify_one(request, images[0], params)

    @app.post("/certify/batch", response_model=BatchResponse, responses=_ERRORS, openapi_extra=_BATCH_DOC,
              dependencies=[Depends(require_key), Depends(admit)],
              summary="Certify several images with the same parameters")
    async def certify_batch(request: Request) -> BatchResponse:
        images, params = await _parse(request, batch=True)
        if len(images) > settings.max_batch_images:
            raise CertifyError(422, "too_many_images", f"at most {settings.max_batch_images} images per batch "
                                                       f"request; got {len(images)}")
        results = await asyncio.gather(*(_certify_one(request, img, params) for img in images))
        return BatchResponse(results=list(results))

    async def _certify_one(request: Request, raw, params: CertifyParams) -> Certificate:
        certifier: Certifier = app.state.certifier
        request_id = request.state.request_id
        t0 = time.perf_counter()
        try:
            image, steps = decode_image(raw, shape=certifier.shape, max_pixels=settings.max_pixels,
                                        resize=params.resize, convert=params.convert)
        except ImageError as exc:
            app.state.metrics.rejected.labels("bad_image").inc()
            raise CertifyError(exc.status, "bad_image", str(exc)) from None
        decode_ms = (time.perf_counter() - t0) * 1e3
        work = asyncio.ensure_future(certifier.certify(image, params, request_id=request_id, decode_ms=decode_ms,
                                                       preprocessing=steps, received=request.state.received))
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, work))
        try:
            cert = await work
        except asyncio.CancelledError:
            app.state.metrics.requests.labels(params.mode, "cancelled").inc()
            if watcher.done() and not watcher.cancelled() and watcher.result():
                # the client went away: the job was dropped; nobody reads this answer
                raise CertifyError(499, "client_closed_request", "the client closed the connection") from None
            raise
        finally:
            watcher.cancel()
        m = app.state.metrics
        m.requests.labels(cert.method, "certified" if cert.certified else "abstained").inc()
        m.latency.labels(cert.method).observe(cert.timings.total_ms / 1e3)
        m.samples_per_certificate.labels(cert.method).observe(cert.samples)
        return cert

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: true after warm-up, false while draining",
             responses={503: {"model": ErrorResponse}})
    async def readyz() -> JSONResponse:
        certifier = getattr(app.state, "certifier", None)
        engine_ok = certifier is not None and certifier.engine.alive
        if app.state.ready and not app.state.draining and engine_ok:
            return JSONResponse({"status": "ready"})
        state = "draining" if app.state.draining else "engine_down" if app.state.ready else "starting"
        return JSONResponse({"error": {"code": state, "message": f"not ready: {state}"}}, status_code=503)

    @app.get("/v1/models", response_model=list[ModelCard], summary="The served bundle")
    async def models() -> list[ModelCard]:
        certifier = getattr(app.state, "certifier", None)
        if certifier is None:
            raise CertifyError(503, "starting", "the bundle is still loading")
        return [certifier.card()]

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(app.state.metrics.render(), media_type=CONTENT_TYPE)

    return app


async def _parse(request: Request, *, batch: bool):
    """(raw images, params) from multipart form data or JSON; CertifyError(422/415) otherwise."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    field = "images" if batch else "image"
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CertifyError(422, "bad_json", "the body is not valid JSON") from None
        try:
            req = (JSONBatchRequest if batch else JSONCertifyRequest).model_validate(body)
        except ValidationError as exc:
            raise CertifyError(422, "bad_request", _pydantic_message(exc)) from None
        params = CertifyParams.model_validate(req.model_dump(exclude={field}))
        return (req.images if batch else [req.image]), params
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=256, max_fields=64)
        except (StarletteHTTPException, MultiPartException) as exc:
            detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
            raise CertifyError(422, "bad_multipart", f"could not parse the multipart body: {detail}") from None
        files = form.getlist(field)
        if not files:
            raise CertifyError(422, "missing_image", f"multipart field '{field}' (the image file) is required")
        images = [await f.read() if isinstance(f, UploadFile) else f for f in files]
        extra = {k: v for k, v in form.multi_items() if k != field}
        try:
            params = CertifyParams.model_validate(extra)
        except ValidationError as exc:
            raise CertifyError(422, "bad_request", _pydantic_message(exc)) from None
        return images, params
    raise CertifyError(415, "unsupported_media_type", "send multipart/form-data (field 'image') or application/json")


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg += f" (accepted: image or images, {', '.join(CertifyParams.model_fields)})"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


async def _cancel_on_disconnect(request: Request, work: asyncio.Future) -> bool:
    """Cancel ``work`` when the client disconnects; True when it did."""
    while not work.done():
        if await request.is_disconnected():
            work.cancel()
            return True
        await asyncio.sleep(0.05)
    return False


def _install_error_handlers(app: FastAPI) -> None:
    def body(code: str, message: str, request: Request) -> dict:
        return {"error": {"code": code, "message": message,
                          "request_id": getattr(request.state, "request_id", None)}}

    @app.exception_handler(CertifyError)
    async def certify_error(request: Request, exc: CertifyError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return JSONResponse(body(exc.code, exc.message, request), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(body(code, str(exc.detail), request), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(body("bad_request", str(exc.errors()[:5]), request), status_code=422)


class RequestId:
    """Pure ASGI middleware (a BaseHTTPMiddleware would hide client disconnects): X-Request-ID in and out."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        supplied = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")[:64]
        request_id = supplied if supplied.isprintable() and supplied else uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["received"] = time.monotonic()  # deadlines count from arrival, not from when the handler ran

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimit:
    """Pure ASGI middleware: 413 when Content-Length or the streamed body exceeds ``max_bytes``."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _too_large(send, self.max_bytes)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _too_large(send, self.max_bytes)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send, limit: int) -> None:
    payload = json.dumps({"error": {"code": "body_too_large",
                                    "message": f"request body exceeds {limit} bytes"}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
