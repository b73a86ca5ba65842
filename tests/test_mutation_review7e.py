"""Mutation audit, round 7e: the command line and the client: the ``certserve`` root (cli.main: exit codes, the
one-line error), the ``keys`` and ``verify`` subcommands (certification.commands: exit codes, which stream each
line goes to, what is checked) and the Python client and ``certserve certify`` (server.client: retries, Retry-After
and back-off bounds, timeouts, what is sent, what is refused, exit codes). The round's tests of calibration.cli
(argument parsing and checks, what is forwarded, where outputs go) are in
tests/test_mutation_review7e_calibration_cli.py.

Each test names the mutant it guards against (injected by editing the code once, in a private clone, never
committed) and was run against it: it failed with the mutant and passes without it. No test starts a server
process: the client talks to an ``httpx.MockTransport``; every test takes well under a few seconds.
"""

from __future__ import annotations

import io
import json
import re
import time

import httpx
import pytest

import server.client as client_module
from certification.signing import Signer, generate_key_files
from certification.verify import VerificationError
from server.client import CertserveClient, CertserveError
from test_verify import IMAGE, sign_certificate

CERT = {"certified": True, "radius": 0.5, "class_index": 1}


def run_cli(*argv) -> int:
    from cli.main import main

    return main([str(a) for a in argv])


@pytest.fixture
def signer(tmp_path) -> Signer:
    generate_key_files(tmp_path / "keys")
    return Signer.from_paths(tmp_path / "keys")


# ---------------------------------------------------------------------------------------------- the command root
def test_an_error_message_of_several_lines_is_printed_on_one_line(monkeypatch, capsys, tmp_path):
    """Mutant: cli.main._one_line returns ``str(exc)`` (the newlines kept): a script reading the one error line got
    half of it."""
    import models.bundle
    from models.bundle import BundleError

    def broken(path, **kwargs):
        raise BundleError("manifest.json is not valid JSON:\nExpecting value: line 1 column 1")

    monkeypatch.setattr(models.bundle, "load_bundle", broken)
    assert run_cli("bundle", "verify", tmp_path) == 2
    err = capsys.readouterr().err
    assert err == "certserve: error: manifest.json is not valid JSON: Expecting value: line 1 column 1\n", err


# ---------------------------------------------------------------------------------------------- keys, verify
def test_keys_jwks_without_a_usable_key_exits_2_and_reads_the_variable(tmp_path, monkeypatch, capsys):
    """Mutants: ``keys jwks`` with no key returns 0 (a script publishing the key set published nothing and went on);
    a key file that does not load returns 1 instead of 2; ``--key``'s default ignores $CERTSERVE_SIGNING_KEY."""
    monkeypatch.delenv("CERTSERVE_SIGNING_KEY", raising=False)
    assert run_cli("keys", "jwks") == 2
    assert capsys.readouterr().err == "certserve keys jwks: no key given (--key or CERTSERVE_SIGNING_KEY)\n"
    (tmp_path / "garbage.pem").write_text("not a key\n")
    (tmp_path / "garbage.pem").chmod(0o600)
    assert run_cli("keys", "jwks", "--key", tmp_path / "garbage.pem") == 2
    assert capsys.readouterr().err.startswith("certserve keys jwks: ")
    _, _, kid = generate_key_files(tmp_path / "keys")
    monkeypatch.setenv("CERTSERVE_SIGNING_KEY", str(tmp_path / "keys"))
    assert run_cli("keys", "jwks") == 0
    assert [k["kid"] for k in json.loads(capsys.readouterr().out)["keys"]] == [kid]


def _jwks_file(tmp_path, signer) -> str:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(signer.jwks()))
    return str(path)


def test_verify_reads_the_certificate_from_stdin(tmp_path, monkeypatch, capsys, signer):
    """Mutant: ``verify -`` opens a file named '-' (exit 2, cannot read) instead of reading stdin."""
    doc, _ = sign_certificate(signer, issued_at=int(time.time()))
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(doc)))
    assert run_cli("verify", "-", "--jwks", _jwks_file(tmp_path, signer)) == 0
    assert capsys.readouterr().err.startswith("VALID (signature): ")


def test_verify_checks_the_image_and_the_age_of_a_bare_jws(tmp_path, capsys, signer):
    """Mutants: the compact-JWS path of ``verify`` drops ``--image`` or ``--max-age`` (a certificate of another image,
    or an old one, reported VALID, exit 0)."""
    jwks = _jwks_file(tmp_path, signer)
    _, token = sign_certificate(signer, issued_at=int(time.time()) - 3600)
    (tmp_path / "cert.jws").write_text(token)
    (tmp_path / "other.png").write_bytes(IMAGE[::-1])
    assert run_cli("verify", tmp_path / "cert.jws", "--jwks", jwks, "--image", tmp_path / "other.png") == 1
    assert capsys.readouterr().err.startswith("INVALID (image_mismatch): ")
    assert run_cli("verify", tmp_path / "cert.jws", "--jwks", jwks, "--max-age", "60") == 1
    assert capsys.readouterr().err.startswith("INVALID (expired): ")


def test_verify_of_a_json_document_checks_its_age(tmp_path, capsys, signer):
    """Mutant: the JSON-document path of ``verify`` drops ``--max-age``."""
    doc, _ = sign_certificate(signer, issued_at=int(time.time()) - 3600)
    (tmp_path / "cert.json").write_text(json.dumps(doc))
    assert run_cli("verify", tmp_path / "cert.json", "--jwks", _jwks_file(tmp_path, signer), "--max-age", "60") == 1
    assert capsys.readouterr().err.startswith("INVALID (expired): ")


def test_verify_with_a_key_set_that_is_no_jwks_exits_2(tmp_path, capsys, signer):
    """Mutants: ``bad_jwks`` exits 1 (as if the certificate were forged) instead of 2 (the key set cannot be used)."""
    doc, _ = sign_certificate(signer)
    (tmp_path / "cert.json").write_text(json.dumps(doc))
    (tmp_path / "bad.json").write_text(json.dumps({"keys": "x"}))
    assert run_cli("verify", tmp_path / "cert.json", "--jwks", tmp_path / "bad.json") == 2
    assert capsys.readouterr().err.startswith("INVALID (bad_jwks): ")


def test_verify_takes_a_document_with_leading_whitespace_and_the_jwks_variable(tmp_path, monkeypatch, capsys,
                                                                               signer):
    """Mutants: the text is not stripped before its first character picks the JSON path (a pretty-printed or
    indented response is then read as a JWS: INVALID malformed); ``--jwks``'s default ignores $CERTSERVE_JWKS."""
    doc, _ = sign_certificate(signer, issued_at=int(time.time()))
    (tmp_path / "cert.json").write_text("\n  " + json.dumps(doc, indent=2) + "\n")
    monkeypatch.setenv("CERTSERVE_JWKS", _jwks_file(tmp_path, signer))
    assert run_cli("verify", tmp_path / "cert.json") == 0
    assert capsys.readouterr().err.startswith("VALID (signature): ")


def test_verify_prints_only_the_claims_on_stdout_and_names_only_what_it_checked(tmp_path, capsys, signer):
    """Mutants: the VALID summary goes to stdout (``verify ... | jq`` then fails to parse), the claims go to stderr,
    an INVALID line goes to stdout, or the summary says "image" checked when no --image was given."""
    doc, _ = sign_certificate(signer, issued_at=int(time.time()))
    (tmp_path / "cert.json").write_text(json.dumps(doc))
    jwks = _jwks_file(tmp_path, signer)
    assert run_cli("verify", tmp_path / "cert.json", "--jwks", jwks) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["certificate"]["radius"] == doc["radius"]
    assert captured.err.startswith("VALID (signature): class 1 ") and captured.err.count("\n") == 1, captured.err
    (tmp_path / "image.png").write_bytes(IMAGE)
    assert run_cli("verify", tmp_path / "cert.json", "--jwks", jwks, "--image", tmp_path / "image.png",
                   "--max-age", "600") == 0
    assert capsys.readouterr().err.startswith("VALID (signature, image, age): ")
    (tmp_path / "edited.json").write_text(json.dumps({**doc, "radius": 0.1}))
    assert run_cli("verify", tmp_path / "edited.json", "--jwks", jwks) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("INVALID (claims_mismatch): ")


def test_a_settings_error_is_stated_without_pydantics_prefix(monkeypatch, capsys):
    """Mutant: cli.main._one_line keeps pydantic's "Value error, " before a validator's message."""
    import server.serve

    monkeypatch.setenv("CERTSERVE_API_KEY", "secret")
    monkeypatch.setattr(server.serve, "check_configuration", lambda *a, **k: pytest.fail("the server would start"))
    assert run_cli("serve", "--port", "0") == 2
    err = capsys.readouterr().err
    assert err.startswith("certserve: error: invalid settings: ") and "Value error" not in err, err
    assert "CERTSERVE_API_KEY" in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------- the client
class Server:
    """What a client sent (path, form fields, Authorization, read timeout), answered in the order of ``answers``
    (each an httpx.Response, an exception to raise, or a callable of the request)."""

    def __init__(self, *answers):
        self.answers, self.requests = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        fields = dict(re.findall(rb'name="([^"]+)"\r\n\r\n([^\r]*)\r\n', body))
        self.requests.append({"path": request.url.path, "auth": request.headers.get("authorization"),
                              "fields": {k.decode(): v.decode() for k, v in fields.items() if k != b"image"},
                              "read_timeout": request.extensions["timeout"]["read"]})
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) else answer


@pytest.fixture
def mock_http(monkeypatch):
    """Every httpx.Client made during the test (the client's) talks to the Server given: ``mock_http(server)``."""
    real = httpx.Client
    slept: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)

    def install(server: Server) -> list[float]:
        monkeypatch.setattr(httpx, "Client", lambda **kw: real(transport=httpx.MockTransport(server), **kw))
        return slept
    return install


def test_retry_after_and_back_off_are_bounded(mock_http):
    """Mutants: Retry-After no longer capped at 60 s (a proxy's ``Retry-After: 86400`` held the client for a day),
    a negative one or NaN not clamped (time.sleep raised ValueError instead of retrying), an unreadable one waited 0
    s instead of 1 (a hot loop against an overloaded server), and the back-off no longer capped at 2 s."""
    assert [client_module._retry_after(v) for v in ("86400", "-5", "nan", "inf", "soon", None, "2.5")] == \
        [60.0, 0.0, 1.0, 1.0, 1.0, 1.0, 2.5]
    assert [client_module._backoff(a) for a in (0, 1, 2, 5, 30)] == [0.1, 0.2, 0.4, 2.0, 2.0]
    busy = [httpx.Response(503, headers={"retry-after": v}, json={"error": {"code": "queue_full"}})
            for v in ("86400", "-5", "nan")]
    slept = mock_http(Server(*busy, httpx.Response(200, json=CERT)))
    with CertserveClient("http://certserve.test", retries=3) as client:
        assert client.certify(IMAGE) == CERT
    assert slept == [60.0, 0.0, 1.0]


def test_a_deadline_extends_the_timeout_never_shortens_it(mock_http):
    """Mutants: a request's timeout is ``deadline + margin`` even below ``timeout`` (deadline_ms=100 with timeout=120
    gave up after 30 s), deadline_ms read as seconds (a 60-minute-long wait for 3.6 s), and certify_batch not given
    the longer timeout at all."""
    server = Server(httpx.Response(200, json=CERT), httpx.Response(200, json=CERT),
                    httpx.Response(200, json={"results": [CERT]}))
    mock_http(server)
    with CertserveClient("http://certserve.test", timeout=120.0) as client:
        client.certify(IMAGE, deadline_ms=100)
        client.certify(IMAGE, deadline_ms=300_000)
        client.certify_batch([IMAGE], deadline_ms=300_000)
    assert [r["read_timeout"] for r in server.requests] == [120.0, 330.0, 330.0]


def test_parameters_left_unset_are_not_sent(mock_http):
    """Mutant: a parameter given as None is sent as the text "None" (the server answers 422 for every request that
    leaves one unset, as ``certserve certify`` does for each flag not given)."""
    server = Server(httpx.Response(200, json=CERT))
    mock_http(server)
    with CertserveClient("http://certserve.test") as client:
        client.certify(IMAGE, alpha=0.01, mode=None, per_input=True)
    assert server.requests[0]["fields"] == {"alpha": "0.01", "per_input": "true"}


def test_a_batch_answer_with_fewer_results_than_images_is_refused(mock_http):
    """Mutant: certify_batch no longer checks the count of results: zip() dropped the images left over, and the
    caller got 1 certificate for 2 images with no error (which image it certifies is then a guess)."""
    mock_http(Server(httpx.Response(200, json={"results": [CERT]})))
    with CertserveClient("http://certserve.test") as client, pytest.raises(CertserveError) as info:
        client.certify_batch([IMAGE, IMAGE[::-1]])
    assert info.value.status == 200


def test_an_answer_without_a_radius_is_no_certificate(mock_http):
    """Mutant: a 200 JSON with ``certified`` but no ``radius`` (another service's status object) is returned as a
    certificate."""
    mock_http(Server(httpx.Response(200, json={"certified": True, "status": "ok"})))
    with CertserveClient("http://certserve.test") as client, pytest.raises(CertserveError):
        client.certify(IMAGE)


def test_the_error_message_is_certserves_own(mock_http):
    """Mutant: CertserveError's message is the whole body instead of certserve's one-line ``error.message``."""
    body = {"error": {"code": "invalid_parameter", "message": "alpha must lie in (0, 0.5)", "request_id": "r1"}}
    mock_http(Server(httpx.Response(422, json=body)))
    with CertserveClient("http://certserve.test") as client, pytest.raises(CertserveError) as info:
        client.certify(IMAGE, alpha=0.9)
    assert str(info.value) == "HTTP 422 (invalid_parameter): alpha must lie in (0, 0.5)" and info.value.body == body
    assert info.value.code == "invalid_parameter"


def test_get_refuses_an_error_and_ready_is_false_while_starting(mock_http):
    """Mutants: ``_get`` returns an error answer's body as if it were the answer (``model()`` then raised KeyError or
    returned the envelope), and ``ready()`` is true for an answer other than 200 (below 500: another service's 404)."""
    starting = httpx.Response(503, json={"error": {"code": "starting", "message": "starting"}})
    mock_http(Server(starting))
    with CertserveClient("http://certserve.test") as client:
        with pytest.raises(CertserveError) as info:
            client.jwks()
        assert info.value.status == 503
        assert client.ready() is False
    mock_http(Server(httpx.Response(404, text="Not Found")))  # another service at this address
    with CertserveClient("http://certserve.test") as client:
        assert client.ready() is False


def test_the_client_checks_the_age_it_was_given(mock_http, signer):
    """Mutant: CertserveClient(verify=True, max_age=...) does not forward ``max_age`` to the check: an old (replayed)
    certificate was returned as verified."""
    cert, _ = sign_certificate(signer, issued_at=int(time.time()) - 3600)
    mock_http(Server(httpx.Response(200, json=cert)))
    with CertserveClient("http://certserve.test", verify=True, jwks=signer.jwks(), max_age=60) as client:
        with pytest.raises(VerificationError) as info:
            client.certify(IMAGE)
    assert info.value.reason == "expired"


def test_the_client_checks_the_image_it_sent(mock_http, signer):
    """Mutant: CertserveClient(verify=True) passes no image bytes to the check: a genuine certificate of another image
    (a proxy's cache, a mixed-up batch) was returned as the certificate of the image sent."""
    cert, _ = sign_certificate(signer, issued_at=int(time.time()))
    mock_http(Server(httpx.Response(200, json=cert)))
    with CertserveClient("http://certserve.test", verify=True, jwks=signer.jwks()) as client:
        assert client.certify(IMAGE)["signature"] == cert["signature"]
        with pytest.raises(VerificationError) as info:
            client.certify(IMAGE[::-1])
    assert info.value.reason == "image_mismatch"


# ---------------------------------------------------------------------------------------------- certserve certify
def _answer_by_image(certs: dict[bytes, object]):
    """/certify answers by the image bytes sent; the JWKS route by ``certs[b"jwks"]``."""
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("jwks.json"):
            return httpx.Response(200, json=certs[b"jwks"])
        for image, result in certs.items():
            if image in request.content:
                if isinstance(result, Exception):
                    raise result
                return httpx.Response(200, json=result)
        return httpx.Response(422, json={"error": {"code": "bad_image", "message": "not an image"}})
    return answer


def test_certify_command_reports_each_failure_on_stderr_goes_on_and_exits_1(mock_http, tmp_path, capsys):
    """Mutants: ``certserve certify`` exits 0 when an image failed (a CI step passed), prints an error line on stdout
    (a script reading one certificate per stdout line took it for one), or lets an httpx error (a read timeout) end
    the command with a traceback before the other images."""
    good, bad, slow = (tmp_path / n for n in ("good.png", "bad.png", "slow.png"))
    good.write_bytes(b"GOOD" + IMAGE)
    bad.write_bytes(b"BAD")
    slow.write_bytes(b"SLOW")
    server = Server(_answer_by_image({b"GOOD": CERT, b"SLOW": httpx.ReadTimeout("read timed out")}))
    mock_http(server)
    assert run_cli("certify", slow, bad, good, "--url", "http://certserve.test", "--api-key", "k1",
                   "--per-input", "--alpha", "0.01") == 1
    captured = capsys.readouterr()
    assert [json.loads(line) for line in captured.out.splitlines()] == [{"image": str(good), **CERT}]
    errors = [json.loads(line) for line in captured.err.splitlines()]
    assert [e["image"] for e in errors] == [str(slow), str(bad)]
    assert errors[1]["error"] == "HTTP 422 (bad_image): not an image"
    assert {r["auth"] for r in server.requests} == {"Bearer k1"}
    assert {json.dumps(r["fields"], sort_keys=True) for r in server.requests} == \
        {json.dumps({"alpha": "0.01", "per_input": "true"}, sort_keys=True)}


def test_certify_command_verify_checks_each_certificate_with_the_key_set_given(mock_http, tmp_path, capsys, signer):
    """Mutants: ``certify --verify`` does not pass ``verify`` to the client (every answer printed unchecked), does
    not pass ``--jwks`` (the server's own key set used instead of the pinned one), or does not count a verification
    failure (exit 0)."""
    cert, _ = sign_certificate(signer, issued_at=int(time.time()))
    image = tmp_path / "image.png"
    image.write_bytes(IMAGE)
    mock_http(Server(_answer_by_image({IMAGE: cert, b"jwks": signer.jwks()})))
    assert run_cli("certify", image, "--url", "http://certserve.test", "--verify") == 0
    assert json.loads(capsys.readouterr().out)["signature"] == cert["signature"]
    generate_key_files(tmp_path / "other")
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps(Signer.from_paths(tmp_path / "other").jwks()))
    assert run_cli("certify", image, "--url", "http://certserve.test", "--verify", "--jwks", pinned) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and json.loads(captured.err)["error"].startswith("INVALID (unknown_kid): ")
    unsigned = {k: v for k, v in cert.items() if k != "signature"}
    mock_http(Server(_answer_by_image({IMAGE: unsigned, b"jwks": signer.jwks()})))
    assert run_cli("certify", image, "--url", "http://certserve.test", "--verify") == 1
    assert json.loads(capsys.readouterr().err)["error"].startswith("INVALID (unsigned): ")


def test_keys_generate_into_a_directory_that_does_not_load_exits_1(tmp_path, capsys):
    """Mutant: when --out does not load as a key directory after the new key is written (a broken key file beside
    it), ``keys generate`` reports success (exit 0) though a server pointed at the directory refuses to start."""
    d = tmp_path / "keys"
    d.mkdir(mode=0o700)
    (d / "zz-broken.pem").write_text("not a key\n")
    (d / "zz-broken.pem").chmod(0o600)
    assert run_cli("keys", "generate", "--out", d) == 1
    captured = capsys.readouterr()
    assert "active key" not in captured.out and f"but {d} does not load: " in captured.err, captured


def test_verify_of_a_file_that_is_not_text_is_invalid(tmp_path, capsys, signer):
    """Mutant: a certificate file that is not UTF-8 text exits 0 (after printing INVALID) instead of 1."""
    (tmp_path / "cert.json").write_bytes(b"\xff\xfe{\x00")
    assert run_cli("verify", tmp_path / "cert.json", "--jwks", _jwks_file(tmp_path, signer)) == 1
    assert capsys.readouterr().err == "INVALID (malformed): the certificate file is not text (UTF-8)\n"


def test_what_a_dying_replica_leaves_is_retried_with_back_off(mock_http):
    """Mutants: a refused connection (ConnectError), a reset (ReadError) or a failed upload (WriteError) is no longer
    retried; a bare 504, or an ingress's JSON error without certserve's ``code``, is no longer retried."""
    server = Server(httpx.ConnectError("refused"), httpx.ReadError("reset"), httpx.WriteError("broken pipe"),
                    httpx.RemoteProtocolError("closed"), httpx.Response(504, text="Gateway Timeout"),
                    httpx.Response(502, json={"error": {"message": "upstream unavailable"}}),
                    httpx.Response(200, json=CERT))
    slept = mock_http(server)
    with CertserveClient("http://certserve.test", retries=6) as client:
        assert client.certify(IMAGE) == CERT
    assert len(server.requests) == 7 and slept == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]


def test_the_last_503_is_raised_not_waited_on(mock_http):
    """Mutant: a 503 on the last attempt is waited on like the others; the loop then ends without an answer
    (AssertionError "unreachable") instead of raising the server's 503 as a CertserveError."""
    busy = httpx.Response(503, headers={"retry-after": "1"}, json={"error": {"code": "queue_full", "message": "busy"}})
    server = Server(busy)
    slept = mock_http(server)
    with CertserveClient("http://certserve.test", retries=1) as client, pytest.raises(CertserveError) as info:
        client.certify(IMAGE)
    assert info.value.status == 503 and len(server.requests) == 2 and slept == [1.0]


@pytest.mark.parametrize("form", ["json", "jws"])
def test_verify_takes_a_certificate_saved_with_a_byte_order_mark(tmp_path, capsys, signer, form):
    """A certificate saved by an editor or shell that writes a UTF-8 byte-order mark (Windows Notepad, PowerShell's
    Out-File) verifies as the same bytes without it. Failed on the code before: INVALID (malformed), exit 1."""
    doc, token = sign_certificate(signer, issued_at=int(time.time()))
    text = json.dumps(doc, indent=2) if form == "json" else token
    (tmp_path / "cert.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert run_cli("verify", tmp_path / "cert.txt", "--jwks", _jwks_file(tmp_path, signer)) == 0
    assert capsys.readouterr().err.startswith("VALID (signature): ")
