"""Bug hunt (the Python client, ``certserve certify``, ``certserve serve``): each test names the bug it guards and
failed on the code before its fix.

The server is the real app (a signing key, its lifespan: bundle, engine, warm-up) under Starlette's TestClient; the
client's HTTP goes to it through a transport that can make one route fail the way a network or another server does.
"""

from __future__ import annotations

import json
import warnings

import httpx
import pytest

from calibration.data import load_fashion_mnist
from certification.signing import generate_key_files
from certification.verify import VerificationError
from server.app import create_app
from server.client import CertserveClient, CertserveError
from server.settings import Settings
from server_api_helpers import png_bytes

with warnings.catch_warnings():  # Starlette's note on httpx (its TestClient still runs on it)
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

JWKS_PATH = "/.well-known/jwks.json"


@pytest.fixture(scope="module")
def image() -> bytes:
    return png_bytes(load_fashion_mnist().x_test[2])  # a trouser: the surrogate certifies it at once


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The real app with a signing key, through its lifespan."""
    keys = tmp_path_factory.mktemp("keys")
    generate_key_files(keys)
    settings = Settings(device="cpu", threads=1, max_samples=2000, signing_key=str(keys))
    with TestClient(create_app(settings, seed=0)) as client:
        yield client


def _client(app, jwks_answer=None, *, answers=None, **kwargs) -> CertserveClient:
    """A client of ``app``; ``jwks_answer(request)``, when given, answers the key set route instead of the app (an
    httpx.Response, or raises as a network failure does), as ``answers[path](request)`` answers ``path``."""
    answers = {**(answers or {}), **({JWKS_PATH: jwks_answer} if jwks_answer is not None else {})}

    def forward(request: httpx.Request) -> httpx.Response:
        if request.url.path in answers:
            return answers[request.url.path](request)
        r = app.request(request.method, request.url.path, content=request.read(), headers=request.headers)
        return httpx.Response(r.status_code, content=r.content, headers=r.headers)

    client = CertserveClient("http://certserve.test", **kwargs)
    client._http.close()
    client._http = httpx.Client(base_url="http://certserve.test", transport=httpx.MockTransport(forward))
    return client


def _refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


@pytest.mark.parametrize("jwks_answer, reason, says", [
    (_refused, "jwks_unavailable", "ConnectError"),
    (lambda r: httpx.Response(404, text="Not Found"), "jwks_unavailable", "HTTP 404"),
    (lambda r: httpx.Response(200, text="<html>Sign in</html>"), "bad_jwks", "not JSON"),
    (lambda r: httpx.Response(200, json=["not", "a", "key set"]), "bad_jwks", "JSON object"),
    (lambda r: httpx.Response(200, json={"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "!"}]}), "bad_jwks", "Ed25519"),
], ids=["refused", "404", "html", "list", "bad-key"])
def test_a_server_key_set_that_cannot_be_fetched_is_a_verification_error(app, image, jwks_answer, reason, says):
    """``CertserveClient(verify=True)`` without ``jwks`` reads the server's key set after the certificate arrives. When
    that failed, the client raised what the fetch raised, not the documented ``VerificationError``: httpx.ConnectError
    (server gone), ``CertserveError("HTTP 404: Not Found")`` (a route the ingress does not pass), ``CertserveError``
    with the login page (not JSON), ``TypeError: expected str, bytes or os.PathLike object, not list`` (a JSON list
    was taken for a file path). Now ``jwks_unavailable`` / ``bad_jwks`` as ``certserve verify`` says them, naming
    the URL. Run against the unfixed client: every case failed (the fifth said bad_jwks, but not which key set)."""
    with _client(app) as client:
        assert client.certify(image)["signature"]  # the app signs; the key set is the app's
    with _client(app, jwks_answer, verify=True, retries=0) as client, pytest.raises(VerificationError) as info:
        client.certify(image)
    assert info.value.reason == reason and says in str(info.value), str(info.value)
    assert "http://certserve.test/.well-known/jwks.json" in str(info.value)
    with _client(app, verify=True, retries=0) as client:  # the app's own key set verifies the same certificate
        assert client.certify(image)["certified"]


def test_certify_command_reports_an_unavailable_key_set_as_its_reason(app, image, tmp_path, monkeypatch, capsys):
    """``certserve certify --verify`` printed ``{"error": "HTTP 404: Not Found"}`` for a key set it could not fetch
    (a CertserveError from the fetch) and a traceback-free but reason-less line for a refused connection; now the
    line says ``INVALID (jwks_unavailable): ...`` as for any verification failure. Failed on the unfixed client."""
    import server.client as client_module
    from cli.main import main

    (tmp_path / "a.png").write_bytes(image)
    monkeypatch.setattr(client_module, "CertserveClient",
                        lambda url, **kw: _client(app, lambda r: httpx.Response(404, text="Not Found"), **kw))
    assert main(["certify", str(tmp_path / "a.png"), "--verify", "--url", "http://certserve.test"]) == 1
    line = json.loads(capsys.readouterr().err.strip())
    assert line["error"].startswith("INVALID (jwks_unavailable): key set http://certserve.test"), line


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_metrics_port_that_is_no_port_before_ray_starts(port, monkeypatch, capsys):
    """``certserve serve --replicas 2 --ray-metrics-port 99999`` started a local Ray cluster whose node then timed out
    ("Exception: The current node timed out during startup"): a traceback and exit 1 after a long wait, for a
    configuration error that is one line and exit 2 everywhere else (``--port 99999``). Now refused before Ray
    starts. Failed on the unfixed command (it reached run_local, stubbed here to fail fast instead of starting Ray)."""
    import server.ray_serve
    from cli.main import main

    def ray_started(*args, **kwargs):
        raise AssertionError("Ray was started with an invalid --ray-metrics-port")

    monkeypatch.setattr(server.ray_serve, "run_local", ray_started)
    assert main(["serve", "--replicas", "2", "--device", "cpu", "--ray-metrics-port", port]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("certserve: error: --ray-metrics-port must be a port"), err


@pytest.mark.parametrize("flags", [["--ingress", "proxy"], ["--ray-metrics-port", "8080"]])
def test_serve_refuses_ray_flags_without_replicas(flags, monkeypatch, capsys):
    """``certserve serve --ingress proxy`` (or ``--ray-metrics-port``) without ``--replicas N`` started one plain
    process and ignored the flag: the operator believed a Ray ingress or metrics port was set. Now one line, exit 2,
    before the server starts. Failed on the old code: yes (it went on to start the server, stubbed here)."""
    from cli.main import main
    from server import serve

    def started(*args, **kwargs):
        raise AssertionError("the server was started")

    monkeypatch.setattr(serve, "check_configuration", started)
    assert main(["serve", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("certserve: error: --ingress and --ray-metrics-port apply"), err


def test_arguments_the_client_cannot_use_are_refused_when_it_is_made(app, image):
    """Refused only after the server had issued (and logged) a certificate, on every call: ``max_age=-1`` (ValueError
    from the check), ``max_age="600"`` (TypeError "must be real number, not str"); ``retries=1.5`` passed the ``< 0``
    check and raised TypeError at the first request; ``jwks=""`` read the current directory as the key set
    (jwks_unavailable, "Is a directory") and a list of keys raised TypeError, both after the certificate;
    ``timeout=None`` (httpx's "no timeout") raised TypeError for any request with ``deadline_ms``. Now all but the last
    are a ValueError when the client is made, and None waits for the answer however long it takes. Failed on the
    unfixed client."""
    issued = []
    record = lambda r: issued.append(r) or httpx.Response(500, text="must not be reached")  # noqa: E731
    for bad in ({"max_age": -1}, {"max_age": float("nan")}, {"max_age": "600"}, {"retries": 1.5},
                {"retries": True}, {"jwks": ""}, {"jwks": [{"kty": "OKP"}]}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _client(app, answers={"/certify": record}, verify=True, **bad).certify(image)
    assert issued == []
    with _client(app, timeout=None) as client:
        assert client.certify(image, deadline_ms=1000)["certified"]
        assert client._timeout({"deadline_ms": 1000}) is None
    with _client(app, verify=True, max_age=600, retries=0) as client:
        assert client.certify(image)["certified"]


def test_model_refuses_an_answer_that_is_no_list_of_models(app):
    """``model()`` indexed whatever JSON answered 200: an auth proxy's ``{"error": "invalid_token"}`` raised
    ``KeyError: 0`` and an empty list ``IndexError``, where every other call raises CertserveError with the answer
    (README: an answer that is not what was asked). Failed on the unfixed client."""
    with _client(app) as client:
        assert client.model()["name"] == "fmnist-sigma0.25"
    for body in ({"error": "invalid_token"}, []):
        with _client(app, answers={"/v1/models": lambda r: httpx.Response(200, json=body)}) as client:
            with pytest.raises(CertserveError) as info:
                client.model()
        assert info.value.status == 200 and info.value.body == body


def test_certify_batch_refuses_no_images_and_a_single_path(app, image, tmp_path):
    """``certify_batch([])`` sent a request with no form at all, and the server's answer named another route's field:
    ``CertserveError: HTTP 415: send multipart/form-data (field 'image': the file) ...``; ``certify_batch("a.png")``
    read each character as a file (``FileNotFoundError: 'a'``). Both are a ValueError now, before any request; a
    list (or tuple) of paths and bytes still works. Failed on the unfixed client."""
    (tmp_path / "a.png").write_bytes(image)
    with _client(app) as client:
        for bad in ([], str(tmp_path / "a.png"), tmp_path / "a.png", image):
            with pytest.raises(ValueError, match="non-empty list of images"):
                client.certify_batch(bad)
        assert [c["certified"] for c in client.certify_batch((str(tmp_path / "a.png"), image))] == [True, True]


def test_certify_command_refuses_a_key_set_without_verify(app, image, tmp_path, monkeypatch, capsys):
    """``certserve certify a.png --jwks pinned.json`` (without ``--verify``) printed the certificates and exited 0
    without checking any of them against the pinned key set, which the command ignored: a user pinning keys believed
    the answers verified. Now one line ``certserve: error: --jwks ...`` and exit 2, before any request; with
    ``--verify`` the pinned set is used. Failed on the unfixed command (exit 0, the certificate printed)."""
    import server.client as client_module
    from cli.main import main

    (tmp_path / "a.png").write_bytes(image)
    (tmp_path / "pinned.json").write_text(json.dumps({"keys": []}))
    monkeypatch.setattr(client_module, "CertserveClient", lambda url, **kw: _client(app, **kw))
    argv = ["certify", str(tmp_path / "a.png"), "--url", "http://certserve.test",
            "--jwks", str(tmp_path / "pinned.json")]
    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == "certserve: error: --jwks is the key set of --verify: add --verify to check " \
                                        "the certificates against it\n"
    assert main([*argv, "--verify"]) == 1  # the pinned (empty) set knows no key of the server
    assert json.loads(capsys.readouterr().err)["error"].startswith("INVALID (unknown_kid)")


@pytest.mark.parametrize("url", ["localhost:8000", "127.0.0.1:8000", "ftp://127.0.0.1", "http://[::1", "http://"])
def test_a_url_the_client_cannot_use_is_refused_when_it_is_made(url, tmp_path, capsys):
    """``CertserveClient("localhost:8000")`` (no scheme) was made, and each request then raised httpx's
    UnsupportedProtocol ("Request URL has an unsupported protocol 'localhost://'"); ``certserve certify a.png --url
    'http://[::1'`` ended in a traceback (httpx.InvalidURL, neither an OSError nor a ValueError), and the other URLs
    printed one error line per image and exited 1. Now a ValueError when the client is made: ``certserve:
    error: url must be an http(s) URL ...``, exit 2, no request. Failed on the unfixed client."""
    from cli.main import main

    with pytest.raises(ValueError, match="url must be an http"):
        CertserveClient(url)
    (tmp_path / "a.png").write_bytes(b"png")
    assert main(["certify", str(tmp_path / "a.png"), str(tmp_path / "a.png"), "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("certserve: error: url must be an http(s) URL") and err.count("\n") == 1, err


def test_the_proxys_503_for_no_answer_ignores_the_requests_own_retry_after():
    """server.ray_proxy.ProxyErrors answers 503 replica_unavailable where Ray's proxy started no answer or failed
    before one; it built that 503's headers from the REQUEST's headers, so a client's own ``Retry-After: 86400`` came
    back as the server's advice (and any header value a client chose). Failed on the old code: yes (retry-after
    86400); now the default 1 s, with the request id still echoed."""
    import asyncio

    pytest.importorskip("ray.serve")
    from server.ray_proxy import ProxyErrors

    scope = {"type": "http", "method": "POST", "path": "/certify",
             "headers": [(b"x-request-id", b"req-7"), (b"retry-after", b"86400")]}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def silent(scope, receive, send):  # the proxy returns without starting an answer
        return None

    asyncio.run(ProxyErrors(silent)(scope, receive, send))
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 503 and headers[b"retry-after"] == b"1" and headers[b"x-request-id"] == b"req-7"
