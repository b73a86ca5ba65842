"""The HTTP error contract: one table from the service's stable error codes to HTTP statuses, one JSON envelope.

Every error answer is ``{"error": {"code", "message", "request_id"}}`` with the ``X-Request-ID`` header; 503s carry
``Retry-After``. Unexpected exceptions are turned into ``500 internal`` by :class:`server.middleware.RequestContext`.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from certification.errors import CODES, ServiceError
from server.schemas import ErrorResponse

STATUS = {
    "unauthorized": 401, "bad_request": 422, "bad_json": 422, "bad_multipart": 422, "missing_image": 422,
    "too_many_images": 422, "bad_image": 422, "image_too_large": 413, "body_too_large": 413,
    "body_timeout": 408, "header_timeout": 408, "headers_too_large": 431,
    "unsupported_media_type": 415, "no_surrogate": 422, "per_input_unavailable": 422, "alpha_below_alpha_cal": 422,
    "queue_full": 503, "inflight_limit": 503, "draining": 503, "replica_unavailable": 503, "starting": 503,
    "engine_down": 503,
    "client_closed_request": 499,
    "audit_unavailable": 503, "not_found": 404, "method_not_allowed": 405, "internal": 500,
}
assert set(STATUS) == set(CODES), "every service error code needs exactly one HTTP status"


#: codes of the statuses the connection answers (server.connections) before a request exists, and their meaning there
CONNECTION_CODES = {400: {"bad_request": "malformed HTTP/1.1: request line, header or chunked body; request_id null"}}
#: request state key (scope["state"]) set by the connection layer (server.connections) when it answers a request
#: whose app runs (400 for its malformed chunked body, 431 for its trailer) and closes the connection: the app then
#: sees a disconnect, but its client did not go away and the answer is counted already: the app's error is not
ANSWERED_BY_CONNECTION = "answered_by_connection"


def error_responses(*statuses: int, only: tuple[str, ...] = ()) -> dict:
    """OpenAPI ``responses`` of these error statuses: the envelope, each code the status is answered with (STATUS, and
    the connection's 400; ``only`` these where given) with its meaning, and Retry-After on a 503: what a client
    generated from the document needs."""
    docs = {}
    for status in statuses:
        meaning = CONNECTION_CODES.get(status) or {c: CODES[c] for c, s in STATUS.items()
                                                   if s == status and (not only or c in only)}
        doc = {"model": ErrorResponse,
               "description": "error.code: " + "; ".join(f"`{c}` ({meaning[c]})" for c in sorted(meaning))}
        if status == 503:
            doc["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                              "schema": {"type": "integer"}}}
        docs[status] = doc
    return docs


def error_body(code: str, message: str, request_id: str | None) -> dict:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def error_bytes(code: str, message: str, request_id: str | None) -> bytes:
    return json.dumps(error_body(code, message, request_id)).encode()


def error_response(exc: ServiceError, request_id: str | None) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
    if exc.code == "unauthorized":  # RFC 9110 15.5.2: a 401 MUST say which scheme it takes
        headers["WWW-Authenticate"] = 'Bearer realm="certserve"'
    return JSONResponse(error_body(exc.code, exc.message, request_id), status_code=STATUS[exc.code],
                        headers=headers or None)


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """ServiceError -> its status; Starlette's 404/405/400 and FastAPI's validation errors -> the same envelope.
    ``on_error(code)`` is called for every error answered here (metrics)."""

    def request_id(request: Request) -> str | None:
        return getattr(request.state, "request_id", None)

    def count(request: Request, code: str) -> None:  # once per request: not where the connection answered it
        if on_error is not None and getattr(request.state, ANSWERED_BY_CONNECTION, None) is None:
            on_error(code)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        count(request, exc.code)
        return error_response(exc, request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        count(request, code)
        headers = dict(getattr(exc, "headers", None) or {})
        allow = [m.strip() for m in headers.get("Allow", "").split(",") if m.strip()]
        if "GET" in allow and "HEAD" not in allow:  # a GET route takes HEAD too (server.middleware)
            headers["Allow"] = ", ".join([*allow, "HEAD"])
        return JSONResponse(error_body(code, _routing_message(request, exc, headers), request_id(request)),
                            status_code=exc.status_code, headers=headers or None)

    def _routing_message(request: Request, exc: StarletteHTTPException, headers: dict) -> str:
        """Starlette's bare "Not Found" / "Method Not Allowed", made to say what the API expects."""
        target = f"{request.method} {request.url.path}"
        if exc.status_code == 404 and exc.detail == "Not Found":
            paths = app.openapi()["paths"]
            routes = ", ".join(f"{m.upper()} {path}" for path, ops in paths.items() for m in ops)
            bare = request.url.path.rstrip("/")
            hint = f"; did you mean {bare} (no trailing slash)?" if bare != request.url.path and bare in paths else ""
            return f"no such route: {target}{hint}; the routes are {routes} (and /docs, /openapi.json)"
        if exc.status_code == 405 and exc.detail == "Method Not Allowed":
            allowed = headers.get("Allow", "")
            return f"{target}: method not allowed; {request.url.path} takes {allowed or 'another method'}"
        return str(exc.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        count(request, "bad_request")
        return JSONResponse(error_body("bad_request", str(exc.errors()[:5]), request_id(request)), status_code=422)
