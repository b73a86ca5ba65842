"""Verify a signed certificate offline: signature against a key set, input hashes, age, and the unsigned copy.

``verify_certificate(jws, jwks, image_bytes=..., max_age=...)`` returns the verified claims or raises
:class:`VerificationError` whose ``reason`` is a stable short code (listed in :data:`REASONS`) and whose message is
one line. ``verify_document(cert_dict, jwks, ...)`` also checks that the certificate's plain JSON fields say what the
signed claims say (a server response or an audit record whose ``radius`` was edited fails with ``claims_mismatch``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np
from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import KeySet, OKPKey

from certification.signing import (ACCEPTED_ALGS, CERTIFICATE_TYP, CERTIFIED_FIELDS, CLAIMS_VERSION, REGISTRY,
                                   tensor_sha256)
from models.strict_json import RepeatedKey, unique_keys

REASONS = {
    "malformed": "not a compact JWS certificate, or its payload lacks required claims",
    "wrong_alg": "the header's alg is not EdDSA/Ed25519, or the key is not an Ed25519 key",
    "wrong_typ": "the header's typ is not a certserve certificate",
    "unknown_kid": "no key with the header's kid in the key set",
    "bad_signature": "the signature does not match the header and payload under that key (or the key set's entry "
                     "with that kid is another key: its RFC 7638 thumbprint is not the kid)",
    "kid_mismatch": "the signed server.kid differs from the header's kid",
    "image_mismatch": "the SHA-256 of the given image differs from the certified input's",
    "tensor_mismatch": "the SHA-256 of the given tensor differs from the certified tensor's",
    "claims_mismatch": "the certificate's plain fields differ from its signed claims",
    "inconsistent": "the signed claims contradict each other (radius beyond what p_lower and sigma support, certified "
                    "vs class or radius, guarantee kind vs method): a server fault, not a certificate to rely on",
    "expired": "issued longer ago than the allowed maximum age",
    "not_yet_valid": "issued in the future (beyond the clock-skew leeway)",
    "jwks_unavailable": "the key set could not be read or fetched",
    "bad_jwks": "the key set is not a valid JWKS",
    "unsigned": "the certificate carries no signature",
    "not_requested": "a valid certificate, but not an answer to the request sent: its alpha exceeds the request's, or "
                     "its method is not the mode asked (CertserveClient(verify=True) checks this)",
}
CLOCK_SKEW_S = 60


class VerificationError(Exception):
    """A certificate failed verification: ``reason`` (a code of :data:`REASONS`) and a one-line message."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        self.reason = reason
        super().__init__(message.replace("\n", " "))


def load_jwks(source: str | Path | dict, *, timeout: float = 10.0, client=None) -> KeySet:
    """A public key set from a dict, a file path, or an http(s) URL. Private parameters are dropped. ``client``
    (optional, an ``httpx.Client``): fetch a URL through it (its transport, headers and base URL), with the same
    limits as without one (no redirects, :data:`MAX_JWKS_BYTES`, the whole answer within about ``timeout``).
    Every error names its source: "key set PATH ...", "key set URL ...", "key set (inline dict) ..."."""
    if isinstance(source, dict):
        raw, name = source, "(inline dict)"
    elif str(source).startswith(("http://", "https://")):
        raw, name = _fetch_jwks(str(source), timeout, client), str(source)
    else:
        name = str(source)
        try:
            raw = json.loads(Path(source).read_text())
        except OSError as exc:
            raise VerificationError("jwks_unavailable", f"cannot read key set {name}: {exc.strerror}") from None
        except (ValueError, RecursionError):  # RecursionError: nested too deep for the JSON decoder
            raise VerificationError("bad_jwks", f"key set {name} is not JSON") from None
    try:
        return _keyset(raw)
    except VerificationError as exc:  # name the set: the caller may not know which file or URL was read
        raise VerificationError(exc.reason, f"key set {name}: {exc}") from None


def parse_document(text: str) -> dict:
    """A certificate document (response, audit line or one-result batch) from JSON text, for :func:`verify_document`.

    Raises ``VerificationError("malformed")`` for text that is not JSON, nests too deep for the decoder, or gives a
    key twice in one object (``json.loads`` would keep the last one silently, while another reader may take the
    first: a plain ``radius`` stated twice is not one statement the signature can vouch for)."""
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except RepeatedKey as exc:
        raise VerificationError("malformed", f"the key {exc.args[0]!r} is given twice in one JSON object") from None
    except (ValueError, RecursionError):
        raise VerificationError("malformed", "the certificate file is not valid JSON") from None


#: a key set larger than this is refused (bad_jwks) without reading it all; a real one is well under 1 KiB per key
MAX_JWKS_BYTES = 1 << 20


def _fetch_jwks(url: str, timeout: float, client=None) -> dict:
    """GET ``url`` (no redirects), through ``client`` where given: the whole answer within about ``timeout`` seconds
    (httpx's ``timeout`` bounds each read, so a server sending a byte every few seconds would otherwise hold the
    verifier indefinitely) and at most :data:`MAX_JWKS_BYTES`."""
    import httpx

    deadline = time.monotonic() + timeout
    body = bytearray()
    stream = httpx.stream if client is None else client.stream
    try:
        with stream("GET", url, timeout=timeout, follow_redirects=False) as r:
            if r.status_code != 200:
                raise VerificationError("jwks_unavailable", f"key set {url} answered HTTP {r.status_code}")
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise VerificationError("bad_jwks", f"key set {url} is larger than {MAX_JWKS_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise VerificationError("jwks_unavailable", f"cannot fetch key set {url}: not complete "
                                                                f"within {timeout:g} s")
    except httpx.HTTPError as exc:
        raise VerificationError("jwks_unavailable", f"cannot fetch key set {url}: {type(exc).__name__}: {exc}"
                                ) from None
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise VerificationError("bad_jwks", f"key set {url} is not JSON") from None


def _keyset(raw) -> KeySet:
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
        raise VerificationError("bad_jwks", 'must be a JSON object {"keys": [...]}')
    keys = []
    for entry in raw["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue  # other key types cannot verify a certserve certificate; skip, do not fail the set
        public = {k: entry[k] for k in ("kty", "crv", "x", "kid") if k in entry}  # never "d"
        try:
            key = OKPKey.import_key(public)
            if "kid" not in public:
                key = OKPKey.import_key({**public, "kid": key.thumbprint()})
        except (JoseError, ValueError, TypeError):
            raise VerificationError("bad_jwks", f"entry {entry.get('kid')!r} is not an Ed25519 JWK") from None
        keys.append(key)
    return KeySet(keys)


def verify_certificate(token: str, jwks: KeySet | dict | str | Path, *, image_bytes: bytes | None = None,
                       image_tensor: np.ndarray | None = None, max_age: float | None = None,
                       now: float | None = None) -> dict:
    """Verify a compact JWS certificate; return its claims or raise :class:`VerificationError`.

    Checks, in order: structure, header (alg, typ, kid), signature, payload shape, kid binding, the claims' internal
    consistency (:func:`_check_consistent`), the image's SHA-256
    (when ``image_bytes`` is given), the tensor's (``image_tensor``), and the age (``max_age`` seconds since ``iat``).
    """
    keyset = jwks if isinstance(jwks, KeySet) else load_jwks(jwks)
    header = _header(token)
    key = _find_key(keyset, header["kid"])
    try:
        obj = jws.deserialize_compact(token, key, registry=REGISTRY)
    except BadSignatureError:
        raise VerificationError("bad_signature", f"signature does not verify under key {header['kid']}") from None
    except (JoseError, ValueError):
        raise VerificationError("malformed", "the JWS could not be decoded") from None
    claims = _claims(obj.payload)
    if claims["server"]["kid"] != header["kid"]:
        raise VerificationError("kid_mismatch", f"payload names key {claims['server']['kid']}, header {header['kid']}")
    _check_consistent(claims)
    _check_input(claims, image_bytes, image_tensor)
    _check_age(claims["iat"], max_age, time.time() if now is None else now)
    return claims


def verify_document(doc: dict, jwks: KeySet | dict | str | Path, **kwargs) -> dict:
    """Verify a certificate JSON object (a response or an audit record) by its ``signature``; see above.

    Also fails with ``claims_mismatch`` when any plain field but ``timings`` says something its signature does not
    (or is not covered by it, e.g. ``model.sha256`` under an older signature), so the plain JSON that passes can be
    trusted field by field.
    """
    cert = certificate_of(doc)
    if not isinstance(cert.get("signature"), str):
        raise VerificationError("unsigned", "the certificate carries no signature (is a signing key configured?)")
    claims = verify_certificate(cert["signature"], jwks, **kwargs)
    for name, plain, signed in _plain_and_signed(cert, claims):
        if not _same_json(plain, signed):  # as JSON values: 1 is not true, 0 is 0.0
            raise VerificationError("claims_mismatch", f"{name} is {plain!r}; signed {signed!r}" if signed is not None
                                    else f"{name} is {plain!r}, which the signature does not cover")
    return claims


def check_answers_request(claims: dict, *, alpha=None, mode=None, per_input=None) -> None:
    """Raise ``not_requested`` unless the verified ``claims`` answer a request with these parameters (None: not sent,
    the server's default; best given as sent, the form fields' strings the server parsed): guarantee alpha at most
    the request's, the method of a mode other than auto, and no marginal (surrogate) guarantee where a per-input one
    was asked. A signature proves who issued a certificate, not
    that it answers this request: another certificate of the same image (a weaker alpha, a replay) also verifies."""
    cert = claims["certificate"]
    if alpha is not None and not cert["guarantee"]["alpha"] <= float(alpha):
        raise VerificationError("not_requested", f"the certificate holds at alpha {cert['guarantee']['alpha']!r}; "
                                                 f"the request asked for {float(alpha)!r}")
    if mode not in (None, "auto") and cert["method"] != mode:
        raise VerificationError("not_requested", f"the certificate's method is {cert['method']}; the request asked "
                                                 f"for mode {mode}")
    if per_input is not None and _as_sent_bool(per_input) and cert["guarantee"]["kind"] == "conformal-marginal":
        raise VerificationError("not_requested", "the certificate's guarantee is marginal (surrogate); the request "
                                                 "asked for a per-input guarantee")


def _as_sent_bool(value) -> bool:
    """A request's boolean parameter as the server reads it (pydantic's lax bool: "1", "yes", "True", "on", ... are
    true); one the server would refuse (422) counts as true here, the stricter reading."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        return True


def _plain_and_signed(cert: dict, claims: dict) -> list[tuple[str, object, object]]:
    """(name, plain value, signed value) of every plain field the certificate states, except ``timings`` (not a
    claim) and the ``input`` hashes it leaves null; a field the signature does not cover pairs with None."""
    pairs = [(f, cert[f], claims["certificate"][f]) for f in CERTIFIED_FIELDS if f in cert]
    pairs += [(f, cert[f], None) for f in cert if f not in _PLAIN_FIELDS]  # e.g. an added "radius_l2": never covered
    if "preprocessing" in cert:
        pairs.append(("preprocessing", cert["preprocessing"], claims["input"].get("preprocessing")))
    for part in ("input", "model"):
        plain = cert.get(part)
        if plain is None:
            continue
        if not isinstance(plain, dict):
            raise VerificationError("malformed", f"the certificate's {part} must be a JSON object")
        signed = claims[part] if isinstance(claims.get(part), dict) else {}
        # every field it states (model.sigma, an added model.note ...), not only those the server writes
        pairs += [(f"{part}.{f}", plain[f], signed.get(f)) for f in plain if plain[f] is not None]
    return pairs


#: the fields a certificate document may state: the signed ones, the unsigned timings, and the signature itself
_PLAIN_FIELDS = frozenset(CERTIFIED_FIELDS) | {"preprocessing", "timings", "model", "input", "signature"}


def _same_json(a, b) -> bool:
    """Whether two parsed JSON values state the same thing: numbers by value (JSON has one number type, and
    JavaScript, Go or jq 1.6 write a float 0.0 the server signed as ``0``), never a boolean for a number (``1`` is not
    ``true``), objects key by key, arrays item by item, anything else by type and value."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _number(a) and _number(b):
        return a == b  # exact: int == float compares the values, 2**53 + 1 is not 2.0**53
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # a tuple: a caller's Python dict
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def certificate_of(doc: dict) -> dict:
    """The certificate in a response (itself), an audit record (``certificate``), or a one-result batch response."""
    if not isinstance(doc, dict):
        raise VerificationError("malformed", "a certificate must be a JSON object")
    if isinstance(doc.get("results"), list):
        if len(doc["results"]) != 1:
            raise VerificationError("malformed", f"a batch of {len(doc['results'])} certificates: pass one")
        if set(doc) != {"results"}:  # fields next to the batch's certificate would pass unchecked
            raise VerificationError("malformed", f"a batch response holds only results; this one also has "
                                                 f"{sorted(set(doc) - {'results'})}")
        doc = doc["results"][0]
        if not isinstance(doc, dict):
            raise VerificationError("malformed", "the batch's certificate must be a JSON object")
    if isinstance(doc.get("certificate"), dict):  # an audit record: its signature is the certificate's own
        if "signature" in doc:
            raise VerificationError("malformed", "an audit record carries its signature inside its certificate, "
                                                 "not next to it")
        if not set(doc) <= {"certificate", "logged_at"}:  # fields next to it would pass unchecked
            raise VerificationError("malformed", f"an audit record holds only certificate and logged_at; this one "
                                                 f"also has {sorted(set(doc) - {'certificate', 'logged_at'})}")
        doc = doc["certificate"]
    return doc


def _header(token) -> dict:
    if not isinstance(token, str) or token.count(".") != 2:
        raise VerificationError("malformed", "not a compact JWS (expected three base64url parts separated by dots)")
    try:
        header = jws.extract_compact(token.encode()).headers()
    except (JoseError, ValueError, TypeError):
        raise VerificationError("malformed", "the JWS header or payload is not base64url JSON") from None
    unexpected = sorted(set(header) - {"alg", "kid", "typ"})
    if unexpected:  # jku, jwk, x5u, crit ...: keys are taken from the key set only, never from the token
        raise VerificationError("malformed", f"unexpected JWS header parameters {unexpected}")
    if header.get("alg") not in ACCEPTED_ALGS:
        raise VerificationError("wrong_alg", f"alg {header.get('alg')!r} is not accepted (EdDSA/Ed25519 only)")
    if header.get("typ") != CERTIFICATE_TYP:
        raise VerificationError("wrong_typ", f"typ {header.get('typ')!r} is not {CERTIFICATE_TYP}")
    if not isinstance(header.get("kid"), str) or not header["kid"]:
        raise VerificationError("malformed", "the JWS header has no kid")
    return header


def _find_key(keyset: KeySet, kid: str) -> OKPKey:
    """The key named ``kid`` whose RFC 7638 thumbprint is ``kid`` (as every certserve kid is): an entry merely
    labelled with it is another key (a key set merging sources, or one served over http, could carry an attacker's
    key under the server's kid, first or alone), so the kid a VALID verdict names is the key that signed."""
    mislabelled = 0
    for key in keyset.keys:
        if key.kid == kid:
            if not isinstance(key, OKPKey) or key.curve_name != "Ed25519":
                raise VerificationError("wrong_alg", f"key {kid} is not an Ed25519 key")
            if key.thumbprint() == kid:
                return key
            mislabelled += 1
    if mislabelled:  # as a wrong key under the right kid always failed: the signature is not that key's
        raise VerificationError("bad_signature", f"the key set's entry {kid} is another key (its RFC 7638 thumbprint "
                                                 f"differs), so nothing it verifies was signed by key {kid}")
    raise VerificationError("unknown_kid", f"key {kid} is not in the key set")


def _claims(payload: bytes) -> dict:
    try:
        claims = json.loads(payload)
    except ValueError:
        raise VerificationError("malformed", "the payload is not JSON") from None
    ok = (isinstance(claims, dict) and claims.get("v") == CLAIMS_VERSION
          and isinstance(claims.get("iat"), int) and not isinstance(claims.get("iat"), bool)
          and all(isinstance(claims.get(k), dict) for k in ("certificate", "input", "model", "server"))
          and all(f in claims["certificate"] for f in CERTIFIED_FIELDS)
          and isinstance(claims["input"].get("sha256"), str) and isinstance(claims["server"].get("kid"), str))
    if not ok:
        raise VerificationError("malformed", "the payload lacks required certificate claims (or has another version)")
    return claims


def _check_input(claims: dict, image_bytes: bytes | None, image_tensor: np.ndarray | None) -> None:
    if image_bytes is not None and hashlib.sha256(image_bytes).hexdigest() != claims["input"]["sha256"]:
        raise VerificationError("image_mismatch", "the image is not the certified input (SHA-256 differs)")
    if image_tensor is not None:
        same_shape = list(image_tensor.shape) == claims["input"].get("tensor_shape")
        if not same_shape or tensor_sha256(image_tensor) != claims["input"].get("tensor_sha256"):
            raise VerificationError("tensor_mismatch", "the tensor is not the certified one (shape or SHA-256 differs)")


def _check_age(iat: int, max_age: float | None, now: float) -> None:
    if max_age is not None and not (math.isfinite(max_age) and max_age >= 0):
        raise ValueError(f"max_age must be a finite number of seconds >= 0; got {max_age!r}")  # nan: no check at all
    if iat > now + CLOCK_SKEW_S:
        raise VerificationError("not_yet_valid", f"issued {iat - now:.0f} s in the future")
    if max_age is not None and now - iat > max_age:
        raise VerificationError("expired", f"issued {now - iat:.0f} s ago; the maximum age is {max_age:g} s")


def _check_consistent(claims: dict) -> None:
    """Fail (``inconsistent``) when the signed claims contradict each other, which only a server fault can sign: the
    radius above sigma * Phi^-1(p_lower) (with p_lower rounded up by a few ulp and 1e-9 relative slack, so the server's
    own rounding never fails: it rounds radii down), a radius without p_lower > 1/2, ``certified`` not saying
    ``class_index >= 0``, an uncertified radius or class name, alpha outside (0, 1), or a guarantee kind that is not
    the method's (certification.certificate.GUARANTEE_OF_ROUTE)."""
    from certification.certificate import GUARANTEE_OF_ROUTE

    c, sigma = claims["certificate"], claims["model"].get("sigma")
    radius, p, cls, guarantee = c["radius"], c["p_lower"], c["class_index"], c["guarantee"]
    problems = []
    if not _number(radius) or not math.isfinite(radius) or radius < 0:
        problems.append(f"radius {radius!r} is not a finite number >= 0")
    elif radius > 0:
        if not _number(p) or not 0.5 < p <= 1:
            problems.append(f"radius {radius!r} with p_lower {p!r} (a radius needs p_lower > 1/2)")
        elif _number(sigma) and sigma > 0 and p < 1 and radius > _radius_bound(p, sigma):
            problems.append(f"radius {radius!r} exceeds sigma * Phi^-1(p_lower) = {sigma * NormalDist().inv_cdf(p)!r}")
    if not isinstance(c["certified"], bool) or not isinstance(cls, int) or c["certified"] != (cls >= 0):
        problems.append(f"certified {c['certified']!r} with class_index {cls!r}")
    elif not c["certified"] and (radius != 0 or c["class_name"] is not None):
        problems.append(f"uncertified with radius {radius!r} and class_name {c['class_name']!r}")
    elif c["certified"] and (not _number(p) or not 0.5 < p <= 1):
        problems.append(f"certified with p_lower {p!r} (certified needs p_lower > 1/2)")
    expected = GUARANTEE_OF_ROUTE.get(c["method"]) if isinstance(c["method"], str) else None  # None: unknown
    if expected is None or not isinstance(guarantee, dict) or guarantee.get("kind") != expected:
        kind = guarantee.get("kind") if isinstance(guarantee, dict) else guarantee
        problems.append(f"guarantee kind {kind!r} is not method {c['method']!r}'s")
    elif not _number(guarantee.get("alpha")) or not 0 < guarantee["alpha"] < 1:
        problems.append(f"guarantee alpha {guarantee.get('alpha')!r} is not in (0, 1)")
    if problems:
        raise VerificationError("inconsistent", "; ".join(problems))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _radius_bound(p: float, sigma: float) -> float:
    """sigma * Phi^-1(p + 8 ulp) * (1 + 1e-9): the largest radius p_lower supports, with slack for p's rounding (the
    surrogate signs p = Phi(z) next to radius sigma * z, and near 1 or 1/2 one ulp of p moves Phi^-1 by far more than
    1e-9 relative) and for the inverse's own error; inf where p + 8 ulp reaches 1."""
    p_up = p + 8 * math.ulp(p)
    return math.inf if p_up >= 1 else sigma * NormalDist().inv_cdf(p_up) * (1 + 1e-9)
