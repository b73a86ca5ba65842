"""Verification of signed certificates (:mod:`certification.verify`) and the ``keys`` / ``verify`` commands.

Real keys, real signatures, a real HTTP server for the URL key set. Every tampering test edits the JWS the way an
attacker would (re-encoding a changed header or payload next to the original signature) and expects the specific
reason code. Run against the bug it guards against: with the signature check removed from ``verify_certificate``
(``jws.extract_compact`` in place of ``jws.deserialize_compact``), every ``test_tampering_*`` and
``test_wrong_key_*`` test fails; with the field comparison removed from ``verify_document``, the
``claims_mismatch`` test fails.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from joserfc import jws
from joserfc.jwk import OKPKey

from certification.commands import add_keys_command, add_verify_command
from certification.signing import (REGISTRY, Signer, canonical_json, certificate_claims, generate_key_files,
                                   tensor_sha256)
from certification.verify import REASONS, VerificationError, load_jwks, verify_certificate, verify_document

IMAGE = b"\x89PNG pretend these are the uploaded bytes"
TENSOR = np.random.default_rng(13).random((1, 28, 28), dtype=np.float32)
NOW = 1_760_000_000


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_certificate(**changes) -> dict:
    cert = {"request_id": "req-7", "class_index": 1, "class_name": "Trouser", "certified": True, "radius": 0.6125,
            "method": "sequential", "guarantee": {"kind": "anytime-valid", "alpha": 0.001, "statement": "per input"},
            "samples": 1200, "p_lower": 0.9931, "fallback_reason": "per_input_requested", "stopped_by": "certified",
            "preprocessing": ["resized 32x32->28x28"], "timings": {"decode_ms": 0.2, "total_ms": 40.0},
            "model": {"name": "fmnist-sigma0.25", "version": "1", "sha256": "f" * 64}}
    cert.update(changes)
    return cert


def sign_certificate(signer: Signer, issued_at: int = NOW, model_sha256: str | None = "f" * 64,
                     **changes) -> tuple[dict, str]:
    cert = make_certificate(**changes)
    claims = certificate_claims(cert, input_sha256=hashlib.sha256(IMAGE).hexdigest(),
                                tensor_sha256=tensor_sha256(TENSOR), tensor_shape=TENSOR.shape,
                                preprocessing=cert["preprocessing"], model_name="fmnist-sigma0.25", model_version="1",
                                manifest_sha256="c" * 64, sigma=0.25, kid=signer.kid, server_version="0.1.0",
                                issued_at=issued_at, model_sha256=model_sha256)
    token = signer.sign(claims)
    return {**cert, "signature": token}, token


@pytest.fixture
def signer(tmp_path) -> Signer:
    generate_key_files(tmp_path / "keys")
    return Signer.from_paths(tmp_path / "keys")


def reason_of(token, jwks, **kwargs) -> str:
    with pytest.raises(VerificationError) as info:
        verify_certificate(token, jwks, now=NOW, **kwargs)
    assert "\n" not in str(info.value) and str(info.value)
    return info.value.reason


def test_valid_certificate_returns_its_claims(signer):
    _, token = sign_certificate(signer)
    claims = verify_certificate(token, signer.jwks(), image_bytes=IMAGE, image_tensor=TENSOR, max_age=60, now=NOW + 5)
    assert claims["certificate"]["radius"] == 0.6125 and claims["server"]["kid"] == signer.kid
    assert claims["input"]["sha256"] == hashlib.sha256(IMAGE).hexdigest() and claims["iat"] == NOW


def leaf_paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaf_paths(v, prefix + (k,))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            yield from leaf_paths(v, prefix + (i,))
    else:
        yield prefix


def altered(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return float(np.nextafter(value, np.inf))  # the smallest possible change
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1")
    if value is None:
        return 0
    return value + ["x"]  # an empty list


def test_tampering_with_any_claim_breaks_the_signature(signer):
    _, token = sign_certificate(signer)
    header, payload, sig = token.split(".")
    claims = json.loads(b64u_decode(payload))
    paths = list(leaf_paths(claims))
    assert len(paths) > 25 and ("certificate", "radius") in paths and ("input", "sha256") in paths
    for path in paths:
        forged = json.loads(b64u_decode(payload))
        node = forged
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = altered(node[path[-1]])
        if path == ("server", "kid"):
            continue  # covered below: would also be a kid_mismatch
        assert reason_of(f"{header}.{b64u(canonical_json(forged))}.{sig}", signer.jwks()) == "bad_signature", path
    # the same claims, re-serialized differently (spaces): still not the signed bytes
    assert reason_of(f"{header}.{b64u(json.dumps(claims).encode())}.{sig}", signer.jwks()) == "bad_signature"
    forged = {**claims, "extra": 1}
    assert reason_of(f"{header}.{b64u(canonical_json(forged))}.{sig}", signer.jwks()) == "bad_signature"


def test_tampering_with_the_header_or_signature_fails(signer):
    _, token = sign_certificate(signer)
    header, payload, sig = token.split(".")
    h = json.loads(b64u_decode(header))

    def with_header(**changes):
        return f"{b64u(canonical_json({**h, **changes}))}.{payload}.{sig}"

    assert reason_of(with_header(alg="Ed25519"), signer.jwks()) == "bad_signature"  # accepted name, but signed bytes
    assert reason_of(with_header(extra="x"), signer.jwks()) == "malformed"  # only alg, kid, typ are accepted
    assert reason_of(with_header(jwk=signer.jwks()["keys"][0]), signer.jwks()) == "malformed"
    assert reason_of(with_header(alg="none"), signer.jwks()) == "wrong_alg"
    assert reason_of(f"{b64u(canonical_json({**h, 'alg': 'none'}))}.{payload}.", signer.jwks()) == "wrong_alg"
    assert reason_of(with_header(alg="HS256"), signer.jwks()) == "wrong_alg"
    assert reason_of(with_header(typ="JWT"), signer.jwks()) == "wrong_typ"
    assert reason_of(with_header(kid="someone-else"), signer.jwks()) == "unknown_kid"
    flipped = bytearray(b64u_decode(sig))
    flipped[0] ^= 1
    assert reason_of(f"{header}.{payload}.{b64u(bytes(flipped))}", signer.jwks()) == "bad_signature"
    junks = ("", "abc", "a.b", "a.b.c", f"{header}.{payload}", f"{header}.!!!.{sig}", f"{b64u(b'[1]')}.{payload}.{sig}")
    for junk in junks:
        assert reason_of(junk, signer.jwks()) in ("malformed", "wrong_alg"), junk


def test_wrong_key_with_the_right_kid_fails_and_unknown_kid_fails(signer, tmp_path):
    generate_key_files(tmp_path / "attacker")
    attacker = Signer.from_paths(tmp_path / "attacker")
    _, token = sign_certificate(signer)
    claims = json.loads(b64u_decode(token.split(".")[1]))
    private = attacker._active.private
    forged = jws.serialize_compact({"alg": "EdDSA", "kid": signer.kid, "typ": "certserve-certificate+jwt"},
                                   canonical_json(claims), private, registry=REGISTRY)
    assert reason_of(forged, signer.jwks()) == "bad_signature"
    assert reason_of(token, attacker.jwks()) == "unknown_kid"
    # a key set that maps the right kid to the wrong public key
    swapped = {"keys": [{**attacker.jwks()["keys"][0], "kid": signer.kid}]}
    assert reason_of(token, swapped) == "bad_signature"


def test_image_tensor_and_age_each_fail_with_their_own_reason(signer):
    _, token = sign_certificate(signer)
    assert reason_of(token, signer.jwks(), image_bytes=IMAGE + b"\x00") == "image_mismatch"
    assert reason_of(token, signer.jwks(), image_tensor=TENSOR[:, ::-1]) == "tensor_mismatch"
    assert reason_of(token, signer.jwks(), image_tensor=TENSOR.reshape(1, 14, 56)) == "tensor_mismatch"
    old = sign_certificate(signer, issued_at=NOW - 3601)[1]
    assert reason_of(old, signer.jwks(), max_age=3600) == "expired"
    assert verify_certificate(old, signer.jwks(), max_age=3602, now=NOW)["iat"] == NOW - 3601
    assert verify_certificate(old, signer.jwks(), now=NOW)  # no max_age: age is not checked
    future = sign_certificate(signer, issued_at=NOW + 3600)[1]
    assert reason_of(future, signer.jwks()) == "not_yet_valid"


def test_rotation_keeps_old_certificates_verifiable(tmp_path):
    ring = tmp_path / "ring"
    old_priv, old_pub, old_kid = generate_key_files(ring)
    old_priv = old_priv.rename(ring / "certserve-20240101T000000Z-old.pem")
    before = Signer.from_paths(ring)
    _, old_token = sign_certificate(before)
    new_priv, _, new_kid = generate_key_files(ring)
    new_priv.rename(ring / "certserve-20250101T000000Z-new.pem")
    after = Signer.from_paths(ring)
    assert after.kid == new_kid and before.kid == old_kid
    _, new_token = sign_certificate(after)
    for token in (old_token, new_token):
        verify_certificate(token, after.jwks(), image_bytes=IMAGE, now=NOW)
    old_priv.unlink()  # the old private key destroyed; its public half stays published
    retired = Signer.from_paths(ring)
    verify_certificate(old_token, retired.jwks(), now=NOW)
    old_pub.unlink()  # and once the old key is no longer published, its certificates fail by name
    assert reason_of(old_token, Signer.from_paths(ring).jwks()) == "unknown_kid"


def test_document_fields_must_match_the_signed_claims(signer):
    doc, _ = sign_certificate(signer)
    assert verify_document(doc, signer.jwks(), now=NOW)["certificate"]["radius"] == doc["radius"]
    audit_record = {"certificate": doc, "logged_at": 1.0}
    assert verify_document(audit_record, signer.jwks(), now=NOW)
    assert verify_document({"results": [doc]}, signer.jwks(), now=NOW)
    for field, value in [("radius", 0.9), ("class_index", 3), ("certified", False), ("guarantee", {}),
                         ("model", {**doc["model"], "version": "2"})]:
        with pytest.raises(VerificationError) as info:
            verify_document({**doc, field: value}, signer.jwks(), now=NOW)
        assert info.value.reason == "claims_mismatch", field
    unsigned = {k: v for k, v in doc.items() if k != "signature"}
    with pytest.raises(VerificationError, match="no signature"):
        verify_document(unsigned, signer.jwks())


def test_every_plain_field_is_bound_to_the_signature(signer):
    """Beyond the certificate's own fields: preprocessing, the input block and model.sha256 are compared too, values
    compare as JSON (1 is not true), and an audit record cannot carry a second signature next to its certificate.
    Run against the comparison before 2026-12-05: every edit below verified as VALID (an audit record whose nested
    radius was edited passed once its signature was copied to the top level); this test failed."""
    cert = make_certificate()
    cert["input"] = {"sha256": hashlib.sha256(IMAGE).hexdigest(), "encoding": "file",
                     "tensor_sha256": tensor_sha256(TENSOR), "tensor_shape": list(TENSOR.shape)}
    claims = certificate_claims(cert, input_sha256=cert["input"]["sha256"], tensor_sha256=tensor_sha256(TENSOR),
                                tensor_shape=TENSOR.shape, preprocessing=cert["preprocessing"],
                                model_name="fmnist-sigma0.25", model_version="1", manifest_sha256="c" * 64, sigma=0.25,
                                kid=signer.kid, server_version="0.1.0", issued_at=NOW, model_sha256="f" * 64)
    doc = {**cert, "signature": signer.sign(claims)}
    assert verify_document(doc, signer.jwks(), now=NOW)
    edits = {"preprocessing": [], "certified": 1, "class_index": True,
             "input": {**doc["input"], "encoding": "base64"}, "model": {**doc["model"], "sha256": "e" * 64}}
    edits_input = {"input": {**doc["input"], "tensor_shape": [1, 14, 56]}}
    for field, value in [*edits.items(), *edits_input.items()]:
        with pytest.raises(VerificationError) as info:
            verify_document({**doc, field: value}, signer.jwks(), now=NOW)
        assert info.value.reason == "claims_mismatch", field
    with pytest.raises(VerificationError) as info:
        verify_document({**doc, "input": [1, 2]}, signer.jwks(), now=NOW)
    assert info.value.reason == "malformed"
    record = {"certificate": {**doc, "radius": 5.0}, "signature": doc["signature"]}
    with pytest.raises(VerificationError) as info:
        verify_document(record, signer.jwks(), now=NOW)
    assert info.value.reason == "malformed"
    older, _ = sign_certificate(signer, model_sha256=None)  # as an older server signed: model.sha256 not covered
    with pytest.raises(VerificationError, match="model.sha256 .* which the signature does not cover"):
        verify_document(older, signer.jwks(), now=NOW)


class _JWKSHandler(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802
        status = 200 if self.path == "/.well-known/jwks.json" else 404
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(self.body if status == 200 else b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def jwks_server(signer):
    _JWKSHandler.body = json.dumps(signer.jwks()).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JWKSHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_key_set_from_url_file_and_bad_sources(signer, jwks_server, tmp_path):
    _, token = sign_certificate(signer)
    verify_certificate(token, load_jwks(jwks_server + "/.well-known/jwks.json"), now=NOW)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(signer.jwks()))
    verify_certificate(token, path, now=NOW)
    for source, reason in [(jwks_server + "/missing", "jwks_unavailable"), (tmp_path / "none.json", "jwks_unavailable"),
                           ({"keys": "x"}, "bad_jwks"), ({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "!"}]},
                                                         "bad_jwks")]:
        with pytest.raises(VerificationError) as info:
            load_jwks(source)
        assert info.value.reason == reason, source
    private_jwk = OKPKey.generate_key("Ed25519").as_dict(private=True)
    assert "d" in private_jwk and "d" not in load_jwks({"keys": [private_jwk]}).keys[0].as_dict(private=False)
    assert set(REASONS) >= {"bad_signature", "unknown_kid", "malformed", "image_mismatch", "expired", "wrong_alg"}


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="certserve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_keys_command(sub)
    add_verify_command(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_cli_keys_generate_and_verify(tmp_path, capsys, signer, jwks_server):
    assert run_cli("keys", "generate", "--out", tmp_path / "k") == 0
    out = capsys.readouterr().out
    cli_signer = Signer.from_paths(tmp_path / "k")
    assert cli_signer.kid in out and "PRIVATE" not in out
    assert run_cli("keys", "jwks", "--key", tmp_path / "k") == 0
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(capsys.readouterr().out)
    doc, token = sign_certificate(cli_signer, issued_at=NOW)
    (tmp_path / "cert.json").write_text(json.dumps(doc))
    (tmp_path / "cert.jws").write_text(token + "\n")
    (tmp_path / "image.png").write_bytes(IMAGE)
    (tmp_path / "other.png").write_bytes(IMAGE[::-1])
    assert run_cli("verify", tmp_path / "cert.json", "--jwks", jwks_file, "--image", tmp_path / "image.png") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["certificate"]["radius"] == 0.6125 and captured.err.startswith("VALID")
    assert " model fmnist-sigma0.25 1 key " in captured.err  # the summary names the model it vouches for
    assert run_cli("verify", tmp_path / "cert.jws", "--jwks", jwks_file) == 0
    capsys.readouterr()
    cases = [(["--image", tmp_path / "other.png"], "image_mismatch"), (["--max-age", "60"], "expired")]
    for extra, reason in cases:
        assert run_cli("verify", tmp_path / "cert.json", "--jwks", jwks_file, *extra) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"INVALID ({reason}): ") and err.count("\n") == 1, err
    (tmp_path / "edited.json").write_text(json.dumps({**doc, "radius": 2.0}))
    assert run_cli("verify", tmp_path / "edited.json", "--jwks", jwks_file) == 1
    assert capsys.readouterr().err.startswith("INVALID (claims_mismatch)")
    generate_key_files(tmp_path / "other")
    (tmp_path / "other.json").write_text(json.dumps(Signer.from_paths(tmp_path / "other").jwks()))
    assert run_cli("verify", tmp_path / "cert.json", "--jwks", tmp_path / "other.json") == 1
    assert capsys.readouterr().err.startswith("INVALID (unknown_kid)")
    (tmp_path / "served.json").write_text(json.dumps(sign_certificate(signer)[0]))  # jwks_server publishes signer's
    assert run_cli("verify", tmp_path / "served.json", "--jwks", jwks_server + "/.well-known/jwks.json") == 0
    capsys.readouterr()
    assert run_cli("verify", tmp_path / "missing.json", "--jwks", jwks_file) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("age", ["nan", "inf", "-1", "0", "soon"])
def test_cli_max_age_must_be_a_finite_positive_number(tmp_path, capsys, signer, age):
    """``--max-age nan`` skipped the age check yet reported "VALID (signature, age)"; ``-1`` was accepted. Run
    against the code before 2026-12-05: nan, inf, -1 and 0 failed (the 2014 certificate verified, exit 0)."""
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(signer.jwks()))
    (tmp_path / "cert.jws").write_text(sign_certificate(signer, issued_at=1_400_000_000)[1])
    with pytest.raises(SystemExit) as exit_info:
        run_cli("verify", tmp_path / "cert.jws", "--jwks", jwks_file, "--max-age", age)
    assert exit_info.value.code == 2 and "--max-age" in capsys.readouterr().err


@pytest.mark.parametrize("max_age", [float("nan"), float("inf"), -float("inf"), -1.0])
def test_library_max_age_rejects_non_finite_or_negative(signer, max_age):
    """``verify_certificate(..., max_age=nan)`` compared ``age > nan`` (always false): no age check at all. Run
    against the code before 2026-12-05: failed (a 2014 certificate verified with max_age nan)."""
    _, token = sign_certificate(signer, issued_at=1_400_000_000)
    with pytest.raises(ValueError, match="max_age"):
        verify_certificate(token, signer.jwks(), max_age=max_age, now=NOW)
