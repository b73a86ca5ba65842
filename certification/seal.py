"""Sealing an issued certificate: input hashes, signature (when a key is configured), audit record (when a log is).

The certification service calls :meth:`Sealer.seal_async` (the audit append in the sealer's writer thread, off the
event loop) on every certificate it issues, single or batch, after the certificate is built and before it is
returned. The order is fixed: hash -> sign -> audit; if the audit record cannot be written, the certificate is NOT
returned (``ServiceError("audit_unavailable")``, 503): no certificate leaves the
server without its record. While the log is unhealthy (an append failed and no probe has found it writable since,
:meth:`certification.audit.AuditLog.healthy`), :meth:`Sealer.audit_available` is False: the server then reports not
ready and refuses certification requests up front (:func:`audit_unavailable`), before any sampling.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from certification.audit import AuditError, AuditLog
from certification.certificate import Certificate, InputInfo
from certification.config import ServiceConfig
from certification.errors import ServiceError
from certification.signing import Signer, SigningKeyError, certificate_claims, public_jwks, tensor_sha256
from models.bundle import Bundle

log = logging.getLogger("certserve.seal")
#: seconds between two reads of the configured key files for the published key set (:meth:`Sealer.jwks`)
KEYS_REFRESH_SECONDS = 10.0


def certserve_version() -> str:
    try:
        return importlib.metadata.version("certserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def audit_unavailable() -> ServiceError:
    """The refusal (503 + Retry-After) of a certificate that cannot get its audit record."""
    return ServiceError("audit_unavailable", "the audit log cannot be written, so no certificate is issued; retry "
                        "later", retry_after=5)


class Sealer:
    """Hashes, signs and records the certificates of one service (one bundle)."""

    def __init__(self, bundle: Bundle, *, signer: Signer | None = None, audit: AuditLog | None = None,
                 observer: object | None = None, key_spec: str | None = None):
        """``observer`` (the server's metrics) may have ``on_seal(seconds)`` and ``on_audit_failure()``;
        ``key_spec``: where ``signer``'s keys were read (see :meth:`jwks`)."""
        self.signer, self.audit = signer, audit
        self._key_spec, self._found_keys, self._found_at = key_spec, [], -float("inf")
        self._on_seal: Callable[[float], None] | None = getattr(observer, "on_seal", None)
        self._on_audit_failure: Callable[[], None] | None = getattr(observer, "on_audit_failure", None)
        m = bundle.manifest
        self.model = {"model_name": m.name, "model_version": m.version, "sigma": float(m.sigma),
                      "manifest_sha256": bundle.manifest_sha256, "model_sha256": bundle.model_sha256}
        self.version = certserve_version()
        # the one thread that writes audit records for the event loop (seal_async): appends serialize on the log's
        # lock anyway, and a slow append (fsync, another process's flock, a stalled disk) then never holds the loop
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="certserve-audit") if audit is not None else None

    @classmethod
    def from_config(cls, bundle: Bundle, config: ServiceConfig, *, observer: object | None = None) -> Sealer:
        """Keys from ``config.signing_key`` (see :mod:`certification.signing`), the log from ``config.audit_log``."""
        signer = Signer.from_paths(config.signing_key) if config.signing_key else None
        audit = AuditLog(config.audit_log, max_bytes=config.audit_max_bytes, backups=config.audit_backups,
                         fsync=config.audit_fsync) if config.audit_log else None
        if signer is not None:
            log.info("signing certificates with key %s (%d key(s) published)", signer.kid, len(signer.kids))
        return cls(bundle, signer=signer, audit=audit, observer=observer, key_spec=config.signing_key)

    def jwks(self) -> dict:
        """The public key set (empty when certificates are not signed): the signer's keys, active first, then any
        other key the configured files hold now (re-read at most every :data:`KEYS_REFRESH_SECONDS`). Several
        servers on one key directory (Ray Serve replicas, a rolling update) start at different times: one started
        after a key was added to it signs with that key, and every other one must publish it too, or its
        certificates fail verification (``unknown_kid``) against the key set of whichever one answers for it."""
        if self.signer is None:
            return {"keys": []}
        own = self.signer.jwks()
        now = time.monotonic()
        if self._key_spec and now - self._found_at >= KEYS_REFRESH_SECONDS:
            self._found_at = now
            try:
                found = public_jwks(self._key_spec, warn=False)["keys"]
            except (SigningKeyError, OSError) as exc:  # a file being written, or removed: keep the last set
                log.debug("re-reading the signing keys for the key set failed: %s", exc)
            else:
                kids = {k["kid"] for k in own["keys"]}
                self._found_keys = [k for k in found if k["kid"] not in kids]
        return {"keys": own["keys"] + [dict(k) for k in self._found_keys]}

    def seal(self, cert: Certificate, image: np.ndarray, *, input_sha256: str | None,
             input_encoding: str | None) -> Certificate:
        """Attach the input hashes and the signature to ``cert``, then write its audit record.

        Changes nothing the certificate claims (class, radius, guarantee): its guarantee is the one stated in its
        ``guarantee`` field. Raises ``ServiceError("audit_unavailable")`` when the record cannot be written."""
        started = time.perf_counter()
        self._stamp(cert, image, input_sha256, input_encoding)
        if self.audit is not None:
            self._record(cert)
        return self._sealed(cert, started)

    async def seal_async(self, cert: Certificate, image: np.ndarray, *, input_sha256: str | None,
                         input_encoding: str | None) -> Certificate:
        """:meth:`seal` for the event loop: hashes and signature here (~0.1 ms), the audit record in the writer
        thread (its flock, write and fsync can take milliseconds, or seconds on a stalled disk: on the loop they held
        every request, surrogate answers and /healthz included). Cancelled before its turn, nothing is written."""
        started = time.perf_counter()
        self._stamp(cert, image, input_sha256, input_encoding)
        if self.audit is not None:
            try:
                pending = self._writer.submit(self._record, cert)
            except RuntimeError:  # closed (the service stopped): written here, as before
                self._record(cert)
            else:
                await asyncio.wrap_future(pending)
        return self._sealed(cert, started)

    def _stamp(self, cert: Certificate, image: np.ndarray, input_sha256: str | None,
               input_encoding: str | None) -> None:
        cert.input = InputInfo(sha256=input_sha256, encoding=input_encoding, tensor_sha256=tensor_sha256(image),
                               tensor_shape=list(image.shape))
        if self.signer is not None:
            claims = certificate_claims(cert.model_dump(), input_sha256=input_sha256 or "",
                                        input_encoding=input_encoding or "", tensor_sha256=cert.input.tensor_sha256,
                                        tensor_shape=image.shape, preprocessing=cert.preprocessing,
                                        kid=self.signer.kid, server_version=self.version, **self.model)
            cert.signature = self.signer.sign(claims)

    def _record(self, cert: Certificate) -> None:
        try:
            self.audit.append_json(b'{"certificate":' + cert.model_dump_json().encode() + b"}")
        except AuditError as exc:
            log.error("certificate %s refused: %s", cert.request_id, exc)
            if self._on_audit_failure is not None:
                self._on_audit_failure()
            raise audit_unavailable() from None

    def _sealed(self, cert: Certificate, started: float) -> Certificate:
        if self._on_seal is not None:
            self._on_seal(time.perf_counter() - started)
        return cert

    def audit_available(self) -> bool:
        """False while the audit log is known to be unwritable (see :meth:`AuditLog.healthy`); True without a log."""
        return self.audit is None or self.audit.healthy()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)  # records already submitted are written first
        if self.audit is not None:
            self.audit.close()
