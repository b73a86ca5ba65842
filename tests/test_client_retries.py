"""server.client.CertserveClient's retries against a real HTTP server (a local socket) that plays what a replica
dying under a request leaves behind in a scaled-out deployment: a connection closed without an answer and the
ingress's bare 500. Checked against the bug: with the client's old loop (503 only) the first two tests fail."""

from __future__ import annotations

import email.utils
import http.server
import json
import socket
import struct
import threading
import time

import httpx
import pytest

from server.client import CertserveClient, CertserveError

CERT = {"certified": True, "radius": 0.5}


class Script(http.server.BaseHTTPRequestHandler):
    """Answers POSTs in the order of ``server.script``: "drop" (close without an answer), "bare500" (an ingress's
    plain-text 500), "json500" (certserve's own error envelope), "ok" (a certificate), "slow" (one after 1.5 s), and
    other servers' answers: "token401" ({"error": "invalid_token"}), "null403" ({"error": null}), "html200" (a login
    page answered with 200), "token200" / "results200" (JSON that is no certificate, or no batch of them, with 200)."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        step = self.server.script[min(self.server.calls, len(self.server.script) - 1)]
        self.server.calls += 1
        if step == "drop":
            self.close_connection = True
            return
        if step == "reset":  # a reset (RST) instead of an orderly close
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if step == "503date":  # back-pressure whose Retry-After is an HTTP date (RFC 9110 allows it)
            body = json.dumps({"error": {"code": "queue_full", "message": "busy"}}).encode()
            self.send_response(503)
            self.send_header("retry-after", email.utils.formatdate(time.time() + 0.2, usegmt=True))
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if step == "slow":  # the answer comes after 1.5 s (a long deadline_ms)
            time.sleep(1.5)
            step = "ok"
        status, body, kind = {"bare500": (500, b"Internal Server Error", "text/plain"),
                              "token401": (401, json.dumps({"error": "invalid_token"}).encode(), "application/json"),
                              "null403": (403, json.dumps({"error": None, "detail": "x"}).encode(),
                                          "application/json"),
                              "html200": (200, b"<html>Sign in</html>", "text/html"),
                              "token200": (200, json.dumps({"error": "invalid_token"}).encode(), "application/json"),
                              "results200": (200, json.dumps({"results": [{"error": "invalid_token"}]}).encode(),
                                             "application/json"),
                              "json500": (500, json.dumps({"error": {"code": "internal", "message": "boom"}}).encode(),
                                          "application/json"),
                              "ok": (200, json.dumps(CERT).encode(), "application/json")}[step]
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Script)
    server.calls, server.script = 0, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _client(server, retries=3, **kwargs):
    return CertserveClient(f"http://127.0.0.1:{server.server_address[1]}", retries=retries, **kwargs)


def test_a_connection_closed_without_an_answer_and_a_bare_500_are_retried(scripted):
    scripted.script = ["drop", "bare500", "ok"]
    with _client(scripted) as client:
        assert client.certify(b"png bytes", alpha=0.001) == CERT
    assert scripted.calls == 3


def test_retries_end_with_the_last_error(scripted):
    scripted.script = ["drop"]
    with _client(scripted, retries=2) as client, pytest.raises(httpx.RemoteProtocolError):
        client.certify(b"png bytes")
    assert scripted.calls == 3


def test_certserve_own_error_is_not_retried(scripted):
    scripted.script = ["json500", "ok"]
    with _client(scripted) as client, pytest.raises(CertserveError) as info:
        client.certify(b"png bytes")
    assert info.value.status == 500 and scripted.calls == 1


def test_a_reset_connection_and_a_retry_after_date_are_retried(scripted):
    """A connection reset (httpx.ReadError) is retried like a closed one, and a 503 whose Retry-After is an HTTP
    date waits that long instead of failing to parse it. Against the client before 2026-12-05: the reset was raised
    at once and the date raised ValueError; this test failed."""
    scripted.script = ["reset", "503date", "ok"]
    with _client(scripted) as client:
        assert client.certify(b"png bytes") == CERT
    assert scripted.calls == 3


@pytest.mark.parametrize("step, status, message", [("token401", 401, "invalid_token"), ("null403", 403, "detail"),
                                                   ("html200", 200, "Sign in")])
def test_another_servers_answer_is_a_certserve_error(scripted, step, status, message):
    """An auth proxy's or ingress's answer (an error that is a string or null, an HTML page with 200) raises
    CertserveError with its status and body. Run against the client before 2026-12-05: failed (AttributeError
    from CertserveError itself on the first two, JSONDecodeError on the HTML page)."""
    scripted.script = [step]
    with _client(scripted) as client, pytest.raises(CertserveError) as info:
        client.certify(b"png bytes")
    assert info.value.status == status and message in str(info.value) and scripted.calls == 1


def test_a_long_deadline_extends_the_timeout_and_negative_retries_are_refused(scripted):
    """A request with deadline_ms waits for the server up to its deadline (plus a margin), whatever ``timeout``;
    retries=-1 is a ValueError when the client is made. Run against the client before 2026-12-05: failed (ReadTimeout
    after the fixed timeout while the server was still within the deadline asked for)."""
    scripted.script = ["slow", "slow"]
    with _client(scripted, timeout=0.5) as client:
        assert client.certify(b"png bytes", deadline_ms=2000) == CERT
        with pytest.raises(httpx.ReadTimeout):  # no deadline: the client's own timeout still holds
            client.certify(b"png bytes")
    with pytest.raises(ValueError, match="retries"):
        CertserveClient("http://127.0.0.1:1", retries=-1)


def test_a_json_answer_with_200_that_is_no_certificate_is_a_certserve_error(scripted):
    """A 200 whose JSON is not a certificate (an auth proxy's {"error": "invalid_token"} answered with 200), for one
    image or as a batch's result, raises CertserveError (README: any answer that is not a certificate). Run against
    the client before this test: failed (certify returned {"error": "invalid_token"} as the certificate, and
    certify_batch returned it as the batch's one certificate)."""
    scripted.script = ["token200", "results200"]
    with _client(scripted) as client:
        with pytest.raises(CertserveError) as info:
            client.certify(b"png bytes")
        assert info.value.status == 200 and "invalid_token" in str(info.value)
        with pytest.raises(CertserveError) as info:
            client.certify_batch([b"png bytes"])
        assert info.value.status == 200 and info.value.body == {"results": [{"error": "invalid_token"}]}
    assert scripted.calls == 2
