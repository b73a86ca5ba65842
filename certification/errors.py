"""The service's errors: a stable machine-readable code and a message that says what was expected. No HTTP here.

The HTTP layer owns the one table from code to status (``server.errors.STATUS``); a client branches on ``code``.
"""

from __future__ import annotations

#: Every code the service (and the HTTP layer above it) may answer with, and what it means.
CODES = {
    "unauthorized": "a valid API key is required",
    "bad_request": "a parameter is missing, of the wrong type or out of range",
    "bad_json": "the body is not valid JSON",
    "bad_multipart": "the multipart body could not be parsed",
    "missing_image": "the image field is missing",
    "too_many_images": "more images than a batch request may carry (CERTSERVE_MAX_BATCH_IMAGES), or more sampling "
                       "jobs than the engine runs at once (CERTSERVE_MAX_LIVE_JOBS): not retryable, split the batch",
    "bad_image": "the image could not be decoded or does not fit the model's input",
    "image_too_large": "the image has more pixels than the server accepts",
    "body_too_large": "the request body exceeds the server's limit",
    "body_timeout": "the request body did not arrive within the server's time limit",
    "header_timeout": "the request line and headers did not arrive within the server's time limit",
    "headers_too_large": "the request line and headers exceed the server's limit",
    "unsupported_media_type": "the content type is none of multipart/form-data, application/json and "
                              "application/x-www-form-urlencoded",
    "no_surrogate": "mode=surrogate on a bundle without a surrogate",
    "per_input_unavailable": "mode=surrogate with per_input=true (the surrogate's guarantee is marginal)",
    "alpha_below_alpha_cal": "mode=surrogate with alpha below the lowest calibrated level",
    "queue_full": "the engine holds its limit of live jobs; retry later (a batch that fits an idle engine)",
    "inflight_limit": "the server holds its limit of requests in flight; retry later",
    "draining": "the server is shutting down; retry on another replica",
    "replica_unavailable": "the Ray Serve replica serving the request stopped before answering; retry",
    "audit_unavailable": "the audit log cannot be written, so no certificate is issued; retry later",
    "starting": "the bundle is still loading",
    "engine_down": "the sampling engine's thread has stopped (GET /readyz): route traffic to another replica",
    "client_closed_request": "the client closed the connection before the answer",
    "not_found": "no such route",
    "method_not_allowed": "the route does not take this method",
    "internal": "an unexpected error inside the server (logged with its request id)",
}


class ServiceError(Exception):
    """A request that cannot be served as asked: ``code`` is one of :data:`CODES`, ``message`` says what was expected,
    ``retry_after`` (seconds) is set where retrying later can succeed."""

    def __init__(self, code: str, message: str, *, retry_after: int | None = None):
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after
