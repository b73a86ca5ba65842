"""Signed certificates and the audit log through the real app (lifespan, onnxruntime, engine): every certificate of
every route and encoding, single and batch, verifies against the served key set and binds the bytes sent and the
tensor the model saw; every answered certificate has its audit line; an unwritable audit log refuses with 503.

Run against the bugs they guard against: with ``Sealer.seal`` signing before the input hashes are attached (claims
with empty hashes), ``test_every_route_and_encoding_is_signed_and_binds_its_input`` fails with image_mismatch; with
the audit failure swallowed (``except AuditError: pass``), ``test_unwritable_audit_log_refuses_with_503_and_counts``
fails on the 200.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from calibration.data import load_fashion_mnist
from certification.audit import read_records
from certification.seal import certserve_version
from certification.signing import SigningKeyError, generate_key_files, tensor_sha256
from certification.verify import VerificationError, verify_document
from models.bundle import DEFAULT_BUNDLE_DIR, sha256_file
from server.app import create_app
from server.settings import Settings

EASY, HARD = 2, 0  # a trouser (surrogate certifies it), an ankle boot


def png(img: np.ndarray, size: int | None = None) -> bytes:
    pil = Image.fromarray(np.round(img[0] * 255).astype(np.uint8))
    if size:
        pil = pil.resize((size, size))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    """The tensor an 8-bit grey PNG decodes to, computed here with PIL (not with the server's decoder)."""
    return (np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def x():
    return load_fashion_mnist().x_test


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    root = tmp_path_factory.mktemp("signed")
    generate_key_files(root / "keys")
    settings = Settings(max_samples=2000, cohen_n0=100, signing_key=str(root / "keys"),
                        audit_log=str(root / "audit.jsonl"), audit_max_bytes=20_000, audit_backups=100)
    with TestClient(create_app(settings, seed=0)) as client:
        client.audit_path = root / "audit.jsonl"
        yield client


def test_every_route_and_encoding_is_signed_and_binds_its_input(signed, x):
    jwks = signed.get("/.well-known/jwks.json").json()
    assert len(jwks["keys"]) == 1 and "d" not in jwks["keys"][0]
    easy, hard, big = png(x[EASY]), png(x[HARD]), png(x[EASY], size=32)
    array = np.round(x[HARD] * 255).astype(np.float64) / 255
    cases = [  # (response, bytes the certificate must bind, tensor the model saw)
        (signed.post("/certify", files={"image": ("a.png", easy)}), easy, pixels(easy)),
        (signed.post("/certify", files={"image": ("a.png", hard)}, data={"mode": "sequential"}), hard, pixels(hard)),
        (signed.post("/certify", files={"image": ("a.png", easy)}, data={"mode": "cohen"}), easy, pixels(easy)),
        (signed.post("/certify", json={"image": base64.b64encode(easy).decode()}), easy, pixels(easy)),
        (signed.post("/certify", json={"image": "data:image/png;base64," + base64.b64encode(hard).decode()}), hard,
         pixels(hard)),
        (signed.post("/certify", json={"image": array.tolist()}),
         json.dumps(array.tolist(), separators=(",", ":")).encode(), array.astype(np.float32)),
        (signed.post("/certify", files={"image": ("b.png", big)}, data={"resize": "true"}), big, None),
    ]
    methods = set()
    for r, sent, tensor in cases:
        assert r.status_code == 200, r.text
        doc = r.json()
        claims = verify_document(doc, jwks, image_bytes=sent, image_tensor=tensor, max_age=600)
        methods.add(doc["method"])
        assert doc["input"]["sha256"] == hashlib.sha256(sent).hexdigest() == claims["input"]["sha256"]
        with pytest.raises(VerificationError) as info:  # another image does not verify
            verify_document(doc, jwks, image_bytes=sent + b"\0")
        assert info.value.reason == "image_mismatch"
    assert methods == {"surrogate", "sequential", "cohen"}
    resized = cases[-1][0].json()
    claims = verify_document(resized, jwks, image_bytes=big)
    assert claims["input"]["preprocessing"] == ["resized 32x32->28x28"]
    assert claims["input"]["tensor_shape"] == [1, 28, 28]
    with pytest.raises(VerificationError, match="tensor"):
        verify_document(resized, jwks, image_tensor=pixels(big))  # not the tensor the model saw
    encodings = [verify_document(r.json(), jwks)["input"]["encoding"] for r, _, _ in cases]
    assert encodings == ["file", "file", "file", "base64", "base64", "array", "file"]


def test_claims_bind_the_model_and_the_server(signed, x):
    jwks = signed.get("/.well-known/jwks.json").json()
    doc = signed.post("/certify", files={"image": ("a.png", png(x[EASY]))}).json()
    claims = verify_document(doc, jwks)
    assert claims["model"] == {"name": "fmnist-sigma0.25", "version": doc["model"]["version"], "sigma": 0.25,
                               "manifest_sha256": sha256_file(DEFAULT_BUNDLE_DIR / "manifest.json"),
                               "sha256": doc["model"]["sha256"]}
    assert claims["server"] == {"kid": jwks["keys"][0]["kid"], "version": certserve_version()}
    assert claims["certificate"]["radius"] == doc["radius"] and claims["certificate"]["guarantee"] == doc["guarantee"]
    assert claims["input"]["tensor_sha256"] == tensor_sha256(pixels(png(x[EASY])))


def test_batch_certificates_are_each_signed_and_logged(signed, x):
    jwks = signed.get("/.well-known/jwks.json").json()
    images = [png(x[i]) for i in (EASY, HARD, 5, 6)]
    r = signed.post("/certify/batch", files=[("images", (f"{i}.png", d)) for i, d in enumerate(images)])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for doc, sent in zip(results, images):
        verify_document(doc, jwks, image_bytes=sent)
    assert len({d["signature"] for d in results}) == 4
    logged = {rec["certificate"]["signature"] for rec in read_records(signed.audit_path)}
    assert {d["signature"] for d in results} <= logged


def test_every_answered_certificate_is_in_the_audit_log_and_verifies(signed, x):
    jwks = signed.get("/.well-known/jwks.json").json()
    answered = []
    for i in range(30):
        r = signed.post("/certify", files={"image": ("a.png", png(x[i]))}, headers={"x-request-id": f"audit-{i}"})
        assert r.status_code == 200
        answered.append(r.json())
    records = read_records(signed.audit_path)  # strict: every line of every rotated file parses
    assert len(list(signed.audit_path.parent.glob("audit.jsonl.*"))) >= 1  # rotation happened (20 kB files)
    by_id = {rec["certificate"]["request_id"]: rec["certificate"] for rec in records}
    for doc in answered:
        assert by_id[doc["request_id"]] == doc  # the record IS the answer (timings and all)
        verify_document({"certificate": by_id[doc["request_id"]]}, jwks)
    metrics = signed.get("/metrics").text
    sealed = next(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("certserve_seal_duration_seconds_count"))
    assert sealed == len(records)  # every sealed certificate was logged, and every logged one sealed


def test_unwritable_audit_log_refuses_with_503_and_counts(tmp_path, x, monkeypatch):
    """The disk-full policy: no certificate without its audit record (503 audit_unavailable, counted)."""
    import certification.audit as audit_module

    monkeypatch.setattr(audit_module, "HOLD_SECONDS", 0.0)  # recovery at once once the log can be written
    log = tmp_path / "audit.jsonl"
    with TestClient(create_app(Settings(max_samples=2000, audit_log=str(log)), seed=0)) as client:
        assert client.post("/certify", files={"image": ("a.png", png(x[EASY]))}).status_code == 200
        log.unlink()
        log.mkdir()  # the log can no longer be opened as a file (a stand-in for a full disk; works as root)
        for path, kwargs in [("/certify", {"files": {"image": ("a.png", png(x[EASY]))}}),
                             ("/certify/batch", {"files": [("images", ("a.png", png(x[EASY])))] * 2})]:
            r = client.post(path, **kwargs)
            assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable", r.text
            assert "radius" not in r.text and r.headers["retry-after"] == "5"
        metrics = client.get("/metrics").text
        # one failed append; the batch is then refused at admission, before any sampling (the log is unhealthy)
        assert "certserve_audit_write_failures_total 1.0" in metrics
        assert 'certserve_rejected_requests_total{reason="audit_unavailable"} 2.0' in metrics
        log.rmdir()
        r = client.post("/certify", files={"image": ("a.png", png(x[EASY]))})
        assert r.status_code == 200  # recovers once the log can be written
    assert [rec["certificate"]["request_id"] for rec in read_records(log)] == [r.json()["request_id"]]


def test_unsigned_server_has_hashes_no_signature_and_an_empty_key_set(tmp_path, x):
    with TestClient(create_app(Settings(max_samples=2000, audit_log=str(tmp_path / "a.jsonl")), seed=0)) as client:
        doc = client.post("/certify", files={"image": ("a.png", png(x[EASY]))}).json()
        assert client.get("/.well-known/jwks.json").json() == {"keys": []}
    assert doc["signature"] is None and doc["input"]["sha256"] == hashlib.sha256(png(x[EASY])).hexdigest()
    with pytest.raises(VerificationError) as info:
        verify_document(doc, {"keys": []})
    assert info.value.reason == "unsigned"
    assert read_records(tmp_path / "a.jsonl")[0]["certificate"] == doc


def test_require_signing_and_bad_keys_refuse_to_start(tmp_path, x):
    with pytest.raises(ValidationError, match="CERTSERVE_SIGNING_KEY"):
        Settings(require_signing=True)
    key = tmp_path / "k" / "bad.pem"
    key.parent.mkdir()
    secret = "MC4CAQAwBQYDK2VwBCIEI" + "A" * 20
    key.write_text(f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SigningKeyError, match="not a readable PEM private key") as info:
        with TestClient(create_app(Settings(signing_key=str(key), require_signing=True), seed=0)):
            pass
    assert secret not in str(info.value)
