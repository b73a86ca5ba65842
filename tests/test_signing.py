"""Signing keys and signed certificates (:mod:`certification.signing`): real Ed25519 keys written by
``generate_key_files``, real JWS signatures, checked independently with ``cryptography`` (not with joserfc, the
library that made them) and against RFC 7638 computed by hand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc import jws

from certification.signing import (CERTIFICATE_TYP, CERTIFIED_FIELDS, REGISTRY, Signer, SigningKeyError,
                                   canonical_json, certificate_claims, generate_key_files, key_files, tensor_sha256)


def b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def rfc7638_thumbprint(public_pem: bytes) -> str:
    """RFC 7638 by hand: SHA-256 of the required members in lexicographic order, no whitespace, base64url."""
    key = serialization.load_pem_public_key(public_pem)
    x = base64.urlsafe_b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    member = '{"crv":"Ed25519","kty":"OKP","x":"%s"}' % x.decode().rstrip("=")
    return base64.urlsafe_b64encode(hashlib.sha256(member.encode()).digest()).decode().rstrip("=")


def sample_certificate(**changes) -> dict:
    cert = {"request_id": "req-1", "class_index": 1, "class_name": "Trouser", "certified": True, "radius": 0.61234,
            "method": "surrogate", "guarantee": {"kind": "conformal-marginal", "alpha": 0.001, "statement": "s"},
            "samples": 0, "p_lower": None, "fallback_reason": None, "stopped_by": "certified",
            "preprocessing": [], "timings": {"decode_ms": 0.1, "total_ms": 1.0},
            "model": {"name": "fmnist", "version": "1", "sha256": "0" * 64}}
    cert.update(changes)
    return cert


def sample_claims(kid: str, **changes) -> dict:
    return certificate_claims(sample_certificate(**changes), input_sha256="a" * 64, tensor_sha256="b" * 64,
                              tensor_shape=(1, 28, 28), preprocessing=[], model_name="fmnist", model_version="1",
                              manifest_sha256="c" * 64, sigma=0.25, kid=kid, server_version="0.1.0")


@pytest.fixture
def keydir(tmp_path):
    d = tmp_path / "keys"
    generate_key_files(d)
    return d


def test_generate_writes_private_0600_and_kid_is_the_rfc7638_thumbprint(keydir):
    (private,) = [p for p in keydir.iterdir() if not p.name.endswith(".pub.pem")]
    (public,) = keydir.glob("*.pub.pem")
    assert private.stat().st_mode & 0o777 == 0o600
    assert keydir.stat().st_mode & 0o077 == 0
    signer = Signer.from_paths(keydir)
    assert signer.kid == rfc7638_thumbprint(public.read_bytes())
    assert signer.kid[:8] in private.name
    assert signer.kids == [signer.kid]  # the .pub.pem of the same key is not published twice


def test_signature_verifies_with_cryptography_and_header_is_as_documented(keydir):
    """The JWS is checked without joserfc: header fields, canonical payload, Ed25519 over 'header.payload'."""
    signer = Signer.from_paths(keydir)
    claims = sample_claims(signer.kid)
    token = signer.sign(claims)
    h, p, s = token.split(".")
    assert json.loads(b64u_decode(h)) == {"alg": "EdDSA", "kid": signer.kid, "typ": CERTIFICATE_TYP}
    assert b64u_decode(p) == canonical_json(claims)
    (public,) = keydir.glob("*.pub.pem")
    key = serialization.load_pem_public_key(public.read_bytes())
    key.verify(b64u_decode(s), f"{h}.{p}".encode())  # raises InvalidSignature if wrong


def test_hand_written_jws_is_byte_for_byte_joserfc_serialize_compact(keydir):
    """Signer.sign writes the compact JWS itself (speed); Ed25519 is deterministic, so joserfc must agree exactly."""
    signer = Signer.from_paths(keydir)
    for radius in (0.0, 0.61234, 1e-300):
        claims = sample_claims(signer.kid, radius=radius, class_name="T-shirt/top \u00e9")
        header = {"alg": "EdDSA", "kid": signer.kid, "typ": CERTIFICATE_TYP}
        expected = jws.serialize_compact(header, canonical_json(claims), signer._active.private, registry=REGISTRY)
        assert signer.sign(claims) == expected


def test_jwks_publishes_every_key_public_part_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate_key_files(a)
    generate_key_files(b)
    signer = Signer.from_paths(f"{a},{b}")
    jwks = signer.jwks()
    assert [k["kid"] for k in jwks["keys"]] == signer.kids and len(signer.kids) == 2
    for k in jwks["keys"]:
        assert set(k) == {"kty", "crv", "x", "kid", "alg", "use"} and k["crv"] == "Ed25519" and "d" not in k


def test_active_key_is_first_listed_and_newest_name_in_a_directory(tmp_path):
    d = tmp_path / "ring"
    old_priv, _, old_kid = generate_key_files(d)
    new_priv, _, new_kid = generate_key_files(d)
    # the UTC-second names may coincide within one second: rename to force the order the rule is about
    old_priv.rename(d / "certserve-20200101T000000Z-old.pem")
    new_priv.rename(d / "certserve-20300101T000000Z-new.pem")
    signer = Signer.from_paths(d)
    assert signer.kid == new_kid and set(signer.kids) == {old_kid, new_kid}
    listed = Signer.from_paths(os.pathsep.join([str(d / "certserve-20200101T000000Z-old.pem"), str(d)]))
    assert listed.kid == old_kid
    assert key_files(d)[0].name == "certserve-20300101T000000Z-new.pem"


def test_public_only_keys_are_published_but_never_active(tmp_path):
    priv, pub, kid = generate_key_files(tmp_path / "k")
    with pytest.raises(SigningKeyError, match="no private Ed25519 key"):
        Signer.from_paths(pub)
    other_priv, _, other_kid = generate_key_files(tmp_path / "other")
    priv.unlink()  # retired: only its public half remains
    signer = Signer.from_paths([pub, other_priv])
    assert signer.kid == other_kid and signer.kids == [kid, other_kid]


def test_group_readable_private_key_warns_and_0600_does_not(keydir, caplog):
    (private,) = [p for p in keydir.iterdir() if not p.name.endswith(".pub.pem")]
    with caplog.at_level(logging.WARNING, logger="certserve.signing"):
        Signer.from_paths(keydir)
    assert not caplog.records
    private.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="certserve.signing"):
        Signer.from_paths(keydir)
    assert len(caplog.records) == 1 and "chmod 600" in caplog.text and "0o644" in caplog.text
    assert "PRIVATE" not in caplog.text


def _pem_body_lines(pem: bytes) -> list[str]:
    return [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]


def test_errors_and_reprs_never_contain_key_material(tmp_path, keydir, caplog):
    ec = generate_private_key(SECP256R1()).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption())
    enc = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.BestAvailableEncryption(b"pw"))
    good = next(p for p in keydir.iterdir() if not p.name.endswith(".pub.pem")).read_bytes()
    corrupt = good.replace(_pem_body_lines(good)[0].encode(), b"A" * 10)
    cases = {"ec.pem": (ec, "not Ed25519"), "enc.pem": (enc, "encrypted"), "bad.pem": (corrupt, "not a readable PEM")}
    for name, (data, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        path.chmod(0o600)
        with pytest.raises(SigningKeyError, match=expected) as info:
            Signer.from_paths(path)
        text = str(info.value) + repr(info.value) + "".join(map(str, info.traceback))
        assert not any(line in text for line in _pem_body_lines(data)) and "PRIVATE KEY" not in text
    signer = Signer.from_paths(keydir)
    for line in _pem_body_lines(good):
        assert line not in repr(signer) and line not in repr(signer._keys)
    assert all("d" not in k for k in signer.jwks()["keys"])
    with pytest.raises(SigningKeyError, match="does not exist"):
        Signer.from_paths(tmp_path / "missing.pem")


def test_tensor_hash_is_float32_little_endian_c_order_chw():
    """Canonical bytes, computed by hand: the same tensor in float64, big-endian or a transposed view hashes alike."""
    rng = np.random.default_rng(0)
    x = rng.random((3, 4, 5), dtype=np.float32)
    by_hand = b"".join(struct.pack("<f", float(v)) for v in x.ravel(order="C"))  # C order: (c, h, w) row-major
    expected = hashlib.sha256(by_hand).hexdigest()
    assert tensor_sha256(x) == expected
    assert tensor_sha256(x.astype(np.float64)) == expected
    assert tensor_sha256(x.astype(">f4")) == expected
    view = np.ascontiguousarray(np.transpose(x, (2, 1, 0))).transpose(2, 1, 0)  # Fortran-ordered, same values
    assert not view.flags.c_contiguous and tensor_sha256(view) == expected
    assert tensor_sha256(np.zeros((1, 2, 2), np.float32)) == hashlib.sha256(bytes(16)).hexdigest()
    y = x.copy()
    y[2, 3, 4] = np.nextafter(y[2, 3, 4], 2, dtype=np.float32)  # one ulp
    assert tensor_sha256(y) != expected
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        tensor_sha256(x[0])


def test_claims_bind_the_documented_fields_and_not_the_timings():
    claims = sample_claims("kid-1")
    assert set(claims) == {"v", "iat", "certificate", "input", "model", "server"}
    assert tuple(claims["certificate"]) == CERTIFIED_FIELDS and "timings" not in claims["certificate"]
    assert claims["input"] == {"sha256": "a" * 64, "encoding": "file", "tensor_sha256": "b" * 64,
                               "tensor_shape": [1, 28, 28],
                               "tensor_layout": {"dtype": "float32", "byteorder": "little", "order": "C",
                                                 "axes": "CHW"}, "preprocessing": []}
    assert claims["model"] == {"name": "fmnist", "version": "1", "manifest_sha256": "c" * 64, "sigma": 0.25}
    assert claims["server"] == {"kid": "kid-1", "version": "0.1.0"} and isinstance(claims["iat"], int)
    cert = sample_certificate()
    del cert["stopped_by"]
    with pytest.raises(ValueError, match="stopped_by"):
        certificate_claims(cert, input_sha256="", tensor_sha256="", tensor_shape=(1, 1, 1), preprocessing=[],
                           model_name="", model_version="", manifest_sha256="", sigma=1.0, kid="", server_version="")


def test_keys_made_in_the_same_instant_activate_in_creation_order(tmp_path, monkeypatch):
    """Each ``generate_key_files`` into a directory makes the new key the active one, even when the clock does not
    move between two of them (names had 1-second resolution, so same-second keys sorted by their kid). Run against
    the code before 2026-12-05: failed (with the clock frozen an older key stayed active after a later rotation)."""
    import time as time_module

    frozen = time_module.gmtime(1_790_000_000)
    monkeypatch.setattr(time_module, "gmtime", lambda *a: frozen)
    monkeypatch.setattr(time_module, "time_ns", lambda: 1_790_000_000 * 10**9)
    d = tmp_path / "ring"
    names = []
    for _ in range(8):
        private, _, kid = generate_key_files(d)
        names.append(private.name)
        assert Signer.from_paths(d).kid == kid
    assert names == sorted(names)


def test_generate_names_the_new_key_after_a_later_dated_one(tmp_path):
    """A key whose name sorts after now (clock set back, or renamed) is outranked by the next generated key: its
    name is bumped past the newest ``certserve-*`` name. Run against the code before 2026-12-05: failed (the
    2030-dated key stayed active)."""
    d = tmp_path / "ring"
    old_priv, _, _ = generate_key_files(d)
    old_priv.rename(d / "certserve-20300101T000000Z-old.pem")
    new_priv, _, new_kid = generate_key_files(d)
    assert Signer.from_paths(d).kid == new_kid and Signer.from_paths(d).active_path == new_priv
    newer_priv, _, newer_kid = generate_key_files(d)
    assert Signer.from_paths(d).kid == newer_kid and newer_priv.name > new_priv.name
