"""Review of certificate verification: plain fields the signature does not cover, wrapped certificates, malformed
documents and key sets, and the key set's fetch deadline.

Each test failed on the code before this review (commit fc13fc3):
- ``test_plain_fields_the_signature_does_not_cover_fail``: every edit verified VALID (an added top-level field,
  ``model.sigma`` contradicting the signed sigma, an added ``model.note``, ``input.tensor_layout`` contradicting the
  signed layout), although ``verify_document`` promises that "the plain JSON that passes can be trusted field by
  field".
- ``test_fields_next_to_a_wrapped_certificate_fail``: a document that reads as a certificate with radius 9.9 and class
  7, carrying a genuine certificate under ``certificate`` (audit-record shape) or ``results`` (batch shape), verified
  VALID; so did ``CertserveClient(verify=True)`` on such an answer, returning the forged plain fields to its caller.
- ``test_malformed_documents_are_one_line_and_not_valid``: ``{"results": [1]}`` and a deeply nested document or key
  set ended ``certserve verify`` with a traceback (AttributeError / RecursionError); a document giving ``radius``
  twice (the first 9.9, the last the signed value) verified VALID.
- ``test_key_set_fetch_has_a_total_deadline``: with ``timeout=1`` a server sending its key set a byte every 0.25 s
  held ``load_jwks`` for about 6 s (httpx's timeout bounds each read, not the fetch), and a deeply nested JSON answer
  raised RecursionError instead of ``bad_jwks``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from certification.signing import Signer, certificate_claims, generate_key_files, tensor_sha256
from certification.verify import VerificationError, load_jwks, verify_document
from test_verify import IMAGE, NOW, TENSOR, make_certificate, run_cli


@pytest.fixture
def signer(tmp_path) -> Signer:
    generate_key_files(tmp_path / "keys")
    return Signer.from_paths(tmp_path / "keys")


def server_like_document(signer: Signer, issued_at: int = NOW) -> dict:
    """A certificate as the server answers it: input block, model with sha256 and manifest_sha256, signature."""
    cert = make_certificate()
    cert["input"] = {"sha256": hashlib.sha256(IMAGE).hexdigest(), "encoding": "file",
                     "tensor_sha256": tensor_sha256(TENSOR), "tensor_shape": list(TENSOR.shape)}
    cert["model"] = {**cert["model"], "manifest_sha256": "c" * 64}
    claims = certificate_claims(cert, input_sha256=cert["input"]["sha256"], tensor_sha256=tensor_sha256(TENSOR),
                                tensor_shape=TENSOR.shape, preprocessing=cert["preprocessing"],
                                model_name="fmnist-sigma0.25", model_version="1", manifest_sha256="c" * 64,
                                sigma=0.25, kid=signer.kid, server_version="0.1.0", issued_at=issued_at,
                                model_sha256="f" * 64)
    return {**cert, "signature": signer.sign(claims)}


def reason(doc, signer) -> str:
    with pytest.raises(VerificationError) as info:
        verify_document(doc, signer.jwks(), now=NOW)
    return info.value.reason


def test_plain_fields_the_signature_does_not_cover_fail(signer):
    doc = server_like_document(signer)
    assert verify_document(doc, signer.jwks(), now=NOW)
    assert verify_document({**doc, "timings": {"total_ms": 1.0}}, signer.jwks(), now=NOW)  # timings: not a claim
    assert verify_document({**doc, "input": {**doc["input"], "sha256": None}}, signer.jwks(), now=NOW)  # says nothing
    edits = [{"radius_l2": 9.9}, {"alpha": 0.5}, {"model": {**doc["model"], "sigma": 0.01}},
             {"model": {**doc["model"], "note": "audited"}},
             {"input": {**doc["input"], "tensor_layout": {"dtype": "float64"}}}]
    for edit in edits:
        assert reason({**doc, **edit}, signer) == "claims_mismatch", edit


def test_fields_next_to_a_wrapped_certificate_fail(signer):
    doc = server_like_document(signer)
    assert verify_document({"certificate": doc, "logged_at": 1.0}, signer.jwks(), now=NOW)
    assert verify_document({"results": [doc]}, signer.jwks(), now=NOW)
    forged_plain = {**{k: v for k, v in doc.items() if k != "signature"}, "radius": 9.9, "class_index": 7}
    for wrapped in ({**forged_plain, "certificate": doc}, {**forged_plain, "results": [doc]},
                    {"certificate": doc, "logged_at": 1.0, "radius": 9.9}, {"results": [doc], "radius": 9.9}):
        assert reason(wrapped, signer) == "malformed", sorted(wrapped)


def test_malformed_documents_are_one_line_and_not_valid(signer, tmp_path, capsys):
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(signer.jwks()))
    text = json.dumps(server_like_document(signer, issued_at=int(time.time())))
    assert text.count('"radius": 0.6125') == 1
    cases = {"batch_of_int": '{"results": [1]}', "batch_of_text": '{"results": ["x"]}',
             "deep": "{" + '"a":' + "[" * 100_000 + "]" * 100_000 + "}",
             "deep_record": '{"certificate":' * 50_000 + "{}" + "}" * 50_000,
             "radius_twice": "{" + '"radius": 9.9, ' + text[1:]}
    for name, body in cases.items():
        (tmp_path / f"{name}.json").write_text(body)
        assert run_cli("verify", tmp_path / f"{name}.json", "--jwks", jwks_file) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("INVALID (malformed): ") and err.count("\n") == 1, (name, err[-300:])
    (tmp_path / "ok.json").write_text(text)
    assert run_cli("verify", tmp_path / "ok.json", "--jwks", jwks_file) == 0
    capsys.readouterr()
    (tmp_path / "deep_jwks.json").write_text("[" * 100_000)
    assert run_cli("verify", tmp_path / "ok.json", "--jwks", tmp_path / "deep_jwks.json") == 2
    err = capsys.readouterr().err
    assert err.startswith("INVALID (bad_jwks): ") and err.count("\n") == 1


class _Dribble(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b"[" * 100_000 if self.path == "/deep" else b'{"keys": []}' + b" " * 20
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.path == "/deep":
            self.wfile.write(body)
            return
        for byte in body:  # a byte every 0.25 s: each read is well within the timeout, the whole answer is not
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.25)

    def log_message(self, *args):
        pass


def test_key_set_fetch_has_a_total_deadline():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dribble)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        started = time.monotonic()
        with pytest.raises(VerificationError) as info:
            load_jwks(url + "/slow", timeout=1.0)
        assert info.value.reason == "jwks_unavailable" and time.monotonic() - started < 3.0
        with pytest.raises(VerificationError) as info:
            load_jwks(url + "/deep", timeout=5.0)
        assert info.value.reason == "bad_jwks"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
