"""A small Python client for certserve and the ``certserve certify`` command."""

from __future__ import annotations

import datetime
import email.utils
import json
import math
import numbers
import sys
import time
from pathlib import Path

import httpx


#: seconds a key set fetched for ``verify=True`` (the server's, or a ``jwks`` URL or file) is used before it is
#: fetched again: the server's JWKS answer says ``Cache-Control: max-age=300``, so a key removed from it (retired or
#: revoked) stops verifying within this time instead of for the client's whole life
JWKS_MAX_AGE = 300.0
#: seconds a request with ``deadline_ms`` may take beyond its deadline (upload, queueing, sealing, the answer)
DEADLINE_MARGIN = 30.0


class CertserveError(RuntimeError):
    """An answer that is not a certificate: ``status`` and ``body`` (the parsed JSON, else the text); ``code``: the
    error code of certserve's envelope (``invalid_parameter``, ``bad_image``, ``overloaded``, ...; README "API"),
    None for another server's body (an ingress, an auth proxy, a login page). The message is
    ``HTTP <status> (<code>): <message>``, or ``HTTP <status>: <body>`` without a code."""

    def __init__(self, status: int, body: dict | list | str | None):
        self.status, self.body, self.code = status, body, None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):  # certserve's envelope: {"error": {"code": ..., "message": ...}}
            message = error.get("message", error)
            self.code = error["code"] if isinstance(error.get("code"), str) else None
        else:  # {"error": "invalid_token"}, {"error": null, ...}, a list, text
            message = error if error is not None else body
        super().__init__(f"HTTP {status}{f' ({self.code})' if self.code else ''}: {message}")


class CertserveClient:
    """``CertserveClient("http://127.0.0.1:8000").certify("shoe.png", alpha=0.001)`` -> certificate dict.

    Retries, up to ``retries`` times: 503 answers (overload, draining) after their Retry-After; and, after a short
    back-off, what a replica dying under a request leaves behind in a scaled-out deployment (README "Scale out"): a
    connection the server closed without answering, a refused connection, or a 500/502/504 that is not certserve's
    JSON error (the ingress's own). A retry is safe: an unanswered request certified nothing the client saw, and the
    retry is a new certificate with fresh noise, not chosen by its outcome. certserve's own errors are not retried;
    ``retries`` that is no integer >= 0, or ``max_age`` that is no finite number >= 0, is a ValueError. Any other
    answer that is not a certificate (another server's error body, a login page answered with 200) raises
    :class:`CertserveError`. ``timeout`` (seconds; None: none) bounds each HTTP request; a request with
    ``deadline_ms`` waits at least ``deadline_ms / 1000 + DEADLINE_MARGIN`` seconds for its answer.
    ``verify=True`` checks every certificate's signature, its signed claims against its plain fields and the hash of
    the image sent (and its age, with ``max_age`` seconds), and that it answers the request (its alpha at most the one
    asked, the method of the mode asked, a per-input guarantee where asked); a failure raises
    :class:`certification.verify.VerificationError` (``reason``: a stable code), and so does a key set that cannot be
    fetched or read (``jwks_unavailable``: no connection, an answer other than 200) or is not a JWKS (``bad_jwks``).
    Keys come from ``jwks`` (a file, URL or dict: pin them for independence from the server) or else the server's
    ``/.well-known/jwks.json``; a set read from a URL or file (the server's included) is read again after
    :data:`JWKS_MAX_AGE` seconds, and at once (once) when a certificate names a key it lacks (a rotation).
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, verify: bool = False, jwks: str | Path | dict | None = None,
                 max_age: float | None = None):
        if isinstance(retries, bool) or not isinstance(retries, numbers.Integral) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if max_age is not None and (isinstance(max_age, bool) or not isinstance(max_age, numbers.Real)
                                    or not (math.isfinite(max_age) and max_age >= 0)):
            # refused here, not by the check after the server has issued (and logged) a certificate per call
            raise ValueError(f"max_age must be a finite number of seconds >= 0 or None, got {max_age!r}")
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ValueError(f"url must be an http(s) URL such as http://127.0.0.1:8000, got {url!r}: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:  # "localhost:8000": scheme "localhost"
            raise ValueError(f"url must be an http(s) URL such as http://127.0.0.1:8000, got {url!r}")
        if jwks is not None and (not isinstance(jwks, (str, Path, dict)) or isinstance(jwks, str) and not jwks.strip()):
            raise ValueError(f"jwks must be a key set file or URL (not empty) or a dict, got {jwks!r:.80}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries, self.timeout = retries, timeout
        self.verify, self.max_age, self._jwks_source, self._keyset = verify, max_age, jwks, None
        self._keyset_read = 0.0  # time.monotonic() when _keyset was read

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._http.close()

    def certify(self, image: str | Path | bytes, **params) -> dict:
        """Certify one image (a path or raw PNG/JPEG/.npy bytes); params: alpha, mode, target_radius, ..."""
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
        fields = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items() if v is not None}
        answer = self._post("/certify", files={"image": ("image", data)}, data=fields, timeout=self._timeout(params))
        return self._checked(_certificate(answer, answer), data, fields)

    def certify_batch(self, images: list[str | Path | bytes], **params) -> list[dict]:
        """Certify several images (paths or bytes, at least one) with the same params, in one request."""
        one = isinstance(images, (str, bytes, bytearray, Path))  # would be read as one image per character (byte)
        if one or not (images := list(images)):  # no image: no form sent at all, a puzzling 415
            raise ValueError(f"certify_batch takes a non-empty list of images (paths or bytes), got {images!r:.80}")
        files = [("images", ("image", Path(i).read_bytes() if isinstance(i, (str, Path)) else i)) for i in images]
        fields = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items() if v is not None}
        answer = self._post("/certify/batch", files=files, data=fields, timeout=self._timeout(params))
        if not isinstance(answer.get("results"), list) or len(answer["results"]) != len(files):
            raise CertserveError(200, answer)
        return [self._checked(_certificate(cert, answer), data, fields)
                for cert, (_, (_, data)) in zip(answer["results"], files)]

    def _timeout(self, params: dict) -> float:
        """``timeout``, or longer for a request whose ``deadline_ms`` the server may take (up to 600 s) to answer."""
        try:
            deadline = float(params.get("deadline_ms")) / 1000
        except (TypeError, ValueError):
            return self.timeout  # none (or not a number: the server answers 422 at once)
        if self.timeout is None or not math.isfinite(deadline):  # None: httpx's "no timeout", longer than any
            return self.timeout
        return max(self.timeout, deadline + DEADLINE_MARGIN)

    def jwks(self) -> dict:
        """The server's public key set."""
        return self._get("/.well-known/jwks.json")

    def _checked(self, cert: dict, image: bytes, fields: dict) -> dict:
        """``fields``: the parameters as sent (strings): the request is checked as the server read it."""
        if not self.verify:
            return cert
        from certification.verify import VerificationError, check_answers_request, load_jwks, verify_document

        pinned = isinstance(self._jwks_source, dict)  # a URL or a file is read again, as the server's set is
        for attempt in (0, 1):  # the set is read once into a local: another thread may drop or replace it meanwhile
            keyset, read = self._keyset, self._keyset_read
            if keyset is None or (not pinned and _monotonic() - read > JWKS_MAX_AGE):
                keyset = load_jwks(self._jwks_source) if self._jwks_source is not None else self._server_keyset()
                self._keyset, self._keyset_read = keyset, _monotonic()
            try:
                claims = verify_document(cert, keyset, image_bytes=image, max_age=self.max_age)
                check_answers_request(claims, alpha=fields.get("alpha"), mode=fields.get("mode"),
                                      per_input=fields.get("per_input"))
                return cert
            except VerificationError as exc:  # a key rotated since the set was fetched: fetch it once more
                if exc.reason != "unknown_kid" or pinned or attempt:
                    raise
                if self._keyset is keyset:  # not already replaced by another thread
                    self._keyset = None
        raise AssertionError("unreachable")

    def _server_keyset(self):
        """The server's key set for ``verify=True``, read as ``certserve verify`` reads one (:func:`load_jwks`, through
        this client's connection): a fetch that fails (no connection, a non-200 answer) is
        ``VerificationError("jwks_unavailable")``, an answer that is no JSON key set (or over 1 MiB) ``"bad_jwks"``."""
        from certification.verify import load_jwks

        timeout = self.timeout if self.timeout is not None else 10.0
        return load_jwks(f"{self._http.base_url}/.well-known/jwks.json", timeout=timeout, client=self._http)

    def model(self) -> dict:
        models = self._get("/v1/models")
        if not (isinstance(models, list) and models and isinstance(models[0], dict)):
            raise CertserveError(200, models)  # another server's JSON (an auth proxy's {"error": ...} with 200)
        return models[0]

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def _get(self, path: str):
        r = self._http.get(path)
        if r.status_code != 200:
            raise CertserveError(r.status_code, _body(r))
        return _json(r)

    def _post(self, path: str, **kwargs) -> dict:
        for attempt in range(self.retries + 1):  # retries >= 0: at least one attempt, ending in return or raise
            last = attempt == self.retries
            try:
                r = self._http.post(path, **kwargs)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                if last:  # refused, reset or closed without an answer: no certificate reached us
                    raise
                time.sleep(_backoff(attempt))
                continue
            if r.status_code == 503 and not last:
                time.sleep(_retry_after(r.headers.get("retry-after")))
                continue
            if r.status_code in (500, 502, 504) and not _is_certserve_error(r) and not last:
                time.sleep(_backoff(attempt))  # the ingress's bare error: no replica answered this request
                continue
            if r.status_code != 200:
                raise CertserveError(r.status_code, _body(r))
            body = _json(r)
            if not isinstance(body, dict):
                raise CertserveError(r.status_code, body)
            return body
        raise AssertionError("unreachable")


def _monotonic() -> float:  # a seam for the tests (the key set's age)
    return time.monotonic()


def _backoff(attempt: int) -> float:
    return min(0.1 * 2 ** attempt, 2.0)


def _retry_after(value: str | None) -> float:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), within [0, 60]; 1 if unreadable."""
    try:
        seconds = float(value) if value is not None else 1.0
    except ValueError:
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - datetime.datetime.now(datetime.timezone.utc)
                       ).total_seconds()
        except (TypeError, ValueError):
            seconds = 1.0
    return min(max(seconds, 0.0), 60.0) if math.isfinite(seconds) else 1.0


def _certificate(cert, answer):
    """``cert`` when it is a certificate (a JSON object with ``certified`` and ``radius``); otherwise the 200 answer
    ``answer`` came from another server (an auth proxy's ``{"error": "invalid_token"}``): :class:`CertserveError`."""
    if not (isinstance(cert, dict) and "certified" in cert and "radius" in cert):
        raise CertserveError(200, answer)
    return cert


def _is_certserve_error(r: httpx.Response) -> bool:
    """True for certserve's JSON error envelope ({"error": {"code": ...}}), False for anything else (an ingress's)."""
    body = _body(r)
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and "code" in body["error"]


def _json(r: httpx.Response):
    """The JSON of a 200 answer; an answer that is not JSON (an HTML login page) is a :class:`CertserveError`."""
    try:
        return r.json()
    except ValueError:
        raise CertserveError(r.status_code, r.text) from None


def _body(r: httpx.Response):
    try:
        return r.json()
    except ValueError:
        return r.text


def add_certify_command(sub) -> None:
    p = sub.add_parser("certify", help="certify image files against a running server (one JSON line each)")
    p.add_argument("images", nargs="+", help="PNG, JPEG or .npy files")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--mode", choices=["auto", "surrogate", "sequential", "fixed", "cohen"], default=None)
    p.add_argument("--target-radius", type=float, default=None)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--deadline-ms", type=int, default=None)
    p.add_argument("--per-input", action="store_true", default=None)
    p.add_argument("--resize", action="store_true", default=None)
    p.add_argument("--convert", action="store_true", default=None)
    p.add_argument("--verify", action="store_true", help="check each certificate's signature and image hash")
    p.add_argument("--jwks", default=None, help="key set (file or URL) for --verify (only with it); default: the "
                                                "server's")
    p.set_defaults(func=_run_certify)


def _run_certify(args) -> int:
    if args.jwks is not None and not args.verify:  # a pinned key set, and not one certificate checked against it
        raise ValueError("--jwks is the key set of --verify: add --verify to check the certificates against it")
    params = {k: getattr(args, k) for k in ("alpha", "mode", "target_radius", "max_samples", "deadline_ms",
                                            "per_input", "resize", "convert")}
    failed = 0
    from certification.verify import VerificationError

    with CertserveClient(args.url, api_key=args.api_key, verify=args.verify, jwks=args.jwks) as client:
        for path in args.images:
            try:
                print(json.dumps({"image": path, **client.certify(path, **params)}))
            except VerificationError as exc:
                failed += 1
                print(json.dumps({"image": path, "error": f"INVALID ({exc.reason}): {exc}"}), file=sys.stderr)
            except (CertserveError, OSError, httpx.HTTPError) as exc:
                failed += 1
                print(json.dumps({"image": path, "error": str(exc)}), file=sys.stderr)
    return 1 if failed else 0
