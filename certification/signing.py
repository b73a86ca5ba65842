"""Signed certificates: Ed25519 keys (PEM), their public key set (JWKS), and compact JWS certificates.

A certificate's signature is a compact JWS (RFC 7515) with protected header ``{"alg": "EdDSA", "kid", "typ"}``
(EdDSA over Ed25519, RFC 8037). ``alg`` is ``EdDSA`` as the issue and most JOSE libraries expect; RFC 9864 names the
same signature ``Ed25519`` and the verifier accepts both. The payload is the JSON claims set built by
:func:`certificate_claims`: the certificate's guarantee-bearing fields bound to the hash of the uploaded bytes, the
hash of the tensor the model saw, the model bundle and the server (key id, version).

Keys (``CERTSERVE_SIGNING_KEY``): one PEM file, a directory of ``*.pem`` files, or a list of either separated by
commas or ``os.pathsep``. Every key found is published in the JWKS (so older certificates stay verifiable after a
rotation); files may hold a private key or, for retired keys, only the public key. **The active key** (the one that
signs) is the first private key in this order: the list in the order given, and inside a directory the files sorted
by name *descending* -- ``certserve keys generate`` names files by UTC creation time (nanoseconds, always after the
directory's newest ``certserve-*`` name), so the newest key signs.
``kid`` is the key's RFC 7638 JWK thumbprint (SHA-256, base64url).

Key material never appears in exceptions, logs or reprs: errors name the file and what is wrong with it, never its
content. A private key file readable by group or others is accepted with a warning (logged once per load).
"""

from __future__ import annotations

import base64
import calendar
import errno
import hashlib
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from joserfc import jws
from joserfc.jwk import OKPKey

log = logging.getLogger("certserve.signing")

SIGNING_ALG = "EdDSA"
ACCEPTED_ALGS = ("EdDSA", "Ed25519")  # the same Ed25519 signature: RFC 8037 name and RFC 9864 name
CERTIFICATE_TYP = "certserve-certificate+jwt"  # explicit typing (RFC 8725 3.11): not confusable with other JWTs
CLAIMS_VERSION = 1
TENSOR_LAYOUT = {"dtype": "float32", "byteorder": "little", "order": "C", "axes": "CHW"}
# The fields of a certificate that carry its meaning; the timings are not signed (they are not a claim).
CERTIFIED_FIELDS = ("request_id", "class_index", "class_name", "certified", "radius", "method", "guarantee", "samples",
                    "p_lower", "stopped_by", "fallback_reason")


class _EdDSAEd25519(type(jws.JWSRegistry.algorithms["EdDSA"])):  # joserfc's EdDSA class
    """joserfc's EdDSA without its per-call deprecation warning (RFC 9864 deprecates the polymorphic name "EdDSA"; we
    use it on purpose, see the module docstring, and only ever with Ed25519 keys: the verifier checks the curve)."""

    security_warning = None


def jws_registry() -> jws.JWSRegistry:
    """A joserfc registry allowing exactly the Ed25519 signature under its two names."""
    registry = jws.JWSRegistry(algorithms=list(ACCEPTED_ALGS))
    registry.algorithms = {**jws.JWSRegistry.algorithms, "EdDSA": _EdDSAEd25519()}
    return registry


REGISTRY = jws_registry()


class SigningKeyError(ValueError):
    """A signing key cannot be loaded; the message names the file, never its content."""


@dataclass(frozen=True, repr=False)
class _Key:
    kid: str
    path: Path
    public: OKPKey
    private: OKPKey | None

    def __repr__(self) -> str:
        return f"_Key(kid={self.kid!r}, path={str(self.path)!r}, private={self.private is not None})"


class Signer:
    """The server's key ring: the active private key signs; every key's public part is published.

    ``Signer.from_paths("keys/")`` or ``Signer.from_paths("new.pem,old.pem")``; ``signer.sign(claims)`` -> compact
    JWS; ``signer.jwks()`` -> ``{"keys": [...]}`` of public keys only.
    """

    def __init__(self, keys: list[_Key]):
        active = next((k for k in keys if k.private is not None), None)
        if active is None:
            raise SigningKeyError("no private Ed25519 key among the configured signing keys (only public keys found)")
        self._active = active
        self._keys = _dedupe(keys)
        header = {"alg": SIGNING_ALG, "kid": active.kid, "typ": CERTIFICATE_TYP}  # joserfc's header encoding
        self._header_b64 = _b64url(json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode())
        self._sign_raw = active.private.get_op_key("sign").sign  # the cryptography Ed25519PrivateKey's
        self._jwks = {"keys": [_public_jwk(k) for k in self._keys]}

    @classmethod
    def from_paths(cls, spec: str | os.PathLike | list) -> Signer:
        """Load keys from a file, a directory, or a comma/``os.pathsep`` separated list (see the module docstring)."""
        return cls([_load_key(p) for p in key_files(spec)])

    @property
    def kid(self) -> str:
        """Key id of the active key (RFC 7638 thumbprint)."""
        return self._active.kid

    @property
    def active_path(self) -> Path:
        """The file of the active key."""
        return self._active.path

    @property
    def kids(self) -> list[str]:
        return [k.kid for k in self._keys]

    def jwks(self) -> dict:
        """The public key set (RFC 7517): every configured key, active first; no private parameters."""
        return json.loads(json.dumps(self._jwks))

    def sign(self, claims: dict) -> str:
        """Compact JWS of ``claims`` (canonical JSON: sorted keys, no spaces) under the active key.

        Written out here (RFC 7515 section 7.1: three base64url parts, the signature over the first two) rather than
        with ``joserfc.jws.serialize_compact``: that call costs about as much again as the Ed25519 signature itself
        (measured: 87 vs 45 us), on every certificate's request path. Ed25519 is deterministic, so the token is
        byte for byte joserfc's (``tests/test_signing.py`` checks it); verification uses joserfc."""
        signing_input = self._header_b64 + b"." + _b64url(canonical_json(claims))
        return (signing_input + b"." + _b64url(self._sign_raw(signing_input))).decode("ascii")

    def __repr__(self) -> str:
        return f"Signer(active_kid={self.kid!r}, keys={len(self._keys)})"


def key_files(spec: str | os.PathLike | list) -> list[Path]:
    """The key files named by ``spec``, in activation order (directory entries newest name first)."""
    if isinstance(spec, (list, tuple)):
        parts = [str(p) for p in spec]
    else:
        parts = [p for chunk in str(spec).split(",") for p in chunk.split(os.pathsep)]
    parts = [p.strip() for p in parts if p.strip()]
    if not parts:
        raise SigningKeyError("no signing key path given")
    files: list[Path] = []
    for part in parts:
        path = Path(part).expanduser()
        if path.is_dir():
            # glob finds nothing in a directory it may not list (a 0700 `keys generate` directory mounted into the
            # image, whose user is not its owner): that is a permission error, not an empty key directory
            if not os.access(path, os.R_OK | os.X_OK):
                raise SigningKeyError(f"signing key directory {path} cannot be listed by this process (uid "
                                      f"{os.getuid()}): make it readable and searchable (r-x) by that user or its "
                                      "group, e.g. chown or chmod 750/755")
            found = sorted((p for p in path.glob("*.pem") if p.is_file()), key=lambda p: p.name, reverse=True)
            if not found:
                raise SigningKeyError(f"signing key directory {path} holds no *.pem file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise SigningKeyError(f"signing key {path} does not exist")
    return files


def public_jwks(spec: str | os.PathLike | list, *, warn: bool = True) -> dict:
    """The key set (RFC 7517) of the keys named by ``spec``, as :meth:`Signer.jwks` publishes it, but needing no
    private key: for ``certserve keys jwks`` over retired (public-only) keys. ``warn=False``: no warning for a key
    file readable by others (a server re-reading its keys already warned at start-up)."""
    return {"keys": [_public_jwk(k) for k in _dedupe([_load_key(p, warn=warn) for p in key_files(spec)])]}


def _load_key(path: Path, *, warn: bool = True) -> _Key:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        private = _parse_private(path, data)
        if warn:
            _warn_if_exposed(path)
        public_obj = private.public_key()
    else:
        private, public_obj = None, _parse_public(path, data)
    public_pem = public_obj.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    public = OKPKey.import_key(public_pem)
    private_jwk = None
    if private is not None:
        private_jwk = OKPKey.import_key(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return _Key(kid=public.thumbprint(), path=path, public=public, private=private_jwk)


def _parse_private(path: Path, data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningKeyError(f"signing key {path} is encrypted; certserve needs an unencrypted PEM file "
                              "(protect it with file permissions, 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError(f"signing key {path} is not a readable PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"signing key {path} is a {type(key).__name__.lstrip('_')}, not Ed25519") from None
    return key


def _parse_public(path: Path, data: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError(f"{path} is neither a PEM private key nor a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"public key {path} is a {type(key).__name__.lstrip('_')}, not Ed25519") from None
    return key


def _warn_if_exposed(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("signing key %s is accessible by group or others (mode %s); run: chmod 600 %s",
                    path, oct(stat.S_IMODE(mode)), path)


def _dedupe(keys: list[_Key]) -> list[_Key]:
    """One entry per kid, first occurrence wins (activation order)."""
    seen: dict[str, _Key] = {}
    for key in keys:
        seen.setdefault(key.kid, key)
    return list(seen.values())


def _public_jwk(key: _Key) -> dict:
    jwk = key.public.as_dict(private=False)
    return {"kty": jwk["kty"], "crv": jwk["crv"], "x": jwk["x"], "kid": key.kid, "alg": SIGNING_ALG, "use": "sig"}


def generate_key_files(out: str | os.PathLike) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key to ``out``: ``certserve-<UTC time, ns>-<kid[:8]>.pem`` (0600) and ``.pub.pem``.

    Returns (private path, public path, kid). The directory is created 0700 if missing; nothing is overwritten. The
    name sorts after every ``certserve-*`` name already in ``out`` (the time is bumped past a later-dated one), so the
    new key is the directory's newest; a hand-named file may still sort after it (the caller checks which key signs).
    Each file is written under a temporary name (not ``*.pem``) and linked into place (written in place, exclusively,
    where the filesystem has no hard links), so a failed write (disk full) leaves no partial key behind; raises
    ``OSError``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(out))
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    kid = OKPKey.import_key(public_pem).thumbprint()
    stem = _key_stem(_next_stamp_ns(out), kid)
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    priv_path, pub_path = out / f"{stem}.pem", out / f"{stem}.pub.pem"
    _write_new_files([(pub_path, public_pem, 0o644), (priv_path, private_pem, 0o600)])
    return priv_path, pub_path, kid


_STAMP = re.compile(r"certserve-(\d{8}T\d{6})(\d{9})?Z-")


def _key_stem(stamp_ns: int, kid: str) -> str:
    seconds, nanos = divmod(stamp_ns, 10**9)
    return f"certserve-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(seconds))}{nanos:09d}Z-{kid[:8]}"


def _next_stamp_ns(out: Path) -> int:
    """Now (ns), or later: just after the newest ``certserve-*`` name in ``out``. A name of the older 1-second form
    (``...T205211Z-``) sorts after every nanosecond name of its second, so the next one starts the next second."""
    floor = 0
    for path in out.glob("certserve-*.pem"):
        m = _STAMP.match(path.name)
        if m:
            seconds = calendar.timegm(time.strptime(m[1], "%Y%m%dT%H%M%S"))
            floor = max(floor, seconds * 10**9 + int(m[2]) + 1 if m[2] else (seconds + 1) * 10**9)
    return max(time.time_ns(), floor)


def _write_new_files(files: list[tuple[Path, bytes, int]]) -> None:
    """Write each (path, data, mode) to a temporary name, synced, then link it to ``path`` (never overwriting); where
    the filesystem has no hard links (vfat, many SMB/FUSE mounts) write ``path`` itself, created exclusively. On any
    error remove the final names written and re-raise; the temporary names are always removed."""
    created: list[Path] = []
    try:
        for path, data, mode in files:
            tmp = path.with_name(f".{path.name}.tmp")
            _write_synced(tmp, data, mode)  # removed in any case below
            try:
                os.link(tmp, path)  # fails if path exists
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK):
                    raise
                _write_synced(path, data, mode)  # O_EXCL: still never overwrites
            created.append(path)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise
    finally:
        for path, _, _ in files:
            path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively with ``mode`` from the start (never wider), write ``data`` and fsync it; a failed
    write removes the file it created (never one that existed: O_EXCL)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------- the claims

def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII: the bytes that are signed and the audit log's line format."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(image: np.ndarray) -> str:
    """SHA-256 of the tensor the model saw: float32, little-endian, C order, axes (C, H, W).

    The hash covers the raw element bytes only; the shape is signed next to it (``input.tensor_shape``).
    """
    if image.ndim != 3:
        raise ValueError(f"tensor_sha256 expects a (C, H, W) array; got shape {image.shape}")
    return sha256_hex(np.ascontiguousarray(image, dtype="<f4").tobytes())


def certificate_claims(certificate: dict, *, input_sha256: str, tensor_sha256: str, tensor_shape: tuple | list,
                       preprocessing: list[str], model_name: str, model_version: str, manifest_sha256: str,
                       sigma: float, kid: str, server_version: str, input_encoding: str = "file",
                       issued_at: int | None = None, model_sha256: str | None = None) -> dict:
    """The signed payload: the certificate's meaning bound to its input, model and server.

    ``certificate`` is the certificate as a dict (``Certificate.model_dump()``); only :data:`CERTIFIED_FIELDS` are
    taken (timings are not claims). ``input_encoding`` says what ``input_sha256`` hashes: ``file`` (the uploaded
    file's bytes), ``base64`` (the bytes the base64 string decodes to) or ``array`` (the nested array as compact JSON,
    see the README). ``iat`` is the issue time in whole UNIX seconds. ``model_sha256`` (the certificate's
    ``model.sha256``, the hash of the model files) is signed when given; the server always gives it.
    """
    missing = [f for f in CERTIFIED_FIELDS if f not in certificate]
    if missing:
        raise ValueError(f"certificate lacks the fields {missing}")
    return {
        "v": CLAIMS_VERSION,
        "iat": int(time.time()) if issued_at is None else int(issued_at),
        "certificate": {f: certificate[f] for f in CERTIFIED_FIELDS},
        "input": {"sha256": input_sha256, "encoding": input_encoding, "tensor_sha256": tensor_sha256,
                  "tensor_shape": [int(d) for d in tensor_shape], "tensor_layout": dict(TENSOR_LAYOUT),
                  "preprocessing": list(preprocessing)},
        "model": {"name": model_name, "version": model_version, "manifest_sha256": manifest_sha256,
                  "sigma": float(sigma), **({"sha256": model_sha256} if model_sha256 is not None else {})},
        "server": {"kid": kid, "version": server_version},
    }
