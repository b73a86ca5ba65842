"""Review of the 2026-12-06 morning commits (1cd942b..383c562): what they broke or got wrong.

Each test failed on the code before this review (383c562):
- ``test_kubernetes_service_links_are_not_refused``: the new refusal of unknown CERTSERVE_ variables refused the
  variables Kubernetes injects into every pod for each Service of its namespace (``<NAME>_SERVICE_HOST``,
  ``<NAME>_PORT_8000_TCP``, ...). deploy/kuberay/rayservice.yaml's RayService ``certserve`` has the Services
  ``certserve-head-svc`` and ``certserve-serve-svc``, so every replica on a worker pod (Settings() in each) failed to
  start: CERTSERVE_HEAD_SVC_SERVICE_HOST etc. A misspelled real variable is still refused.
- ``test_client_checks_the_request_as_the_server_read_it``: CertserveClient(verify=True)'s not_requested check read
  the Python values passed, not what was sent: ``per_input="1"`` / ``"yes"`` / ``"True"`` (a per-input request to the
  server, which parses them as pydantic does) let a marginal certificate through, and ``alpha=np.float32(0.01)``
  (sent as "0.01") refused the genuine answer at 0.01 (float32 0.01 is 0.00999999977).
- ``test_a_malformed_pipelined_request_is_not_answered_for_the_earlier_one``: the JSON 400 for bytes uvicorn's
  (httptools) parser refuses was written while an earlier request of the connection was still being answered: its
  client read the 400 as the answer to its valid request (the 400's check looked at the newest request's cycle only).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

# --------------------------------------------------------------------------------------------- settings (1)

#: what Kubernetes injects for deploy/kuberay/rayservice.yaml's Services (KubeRay names them <RayService>-head-svc and
#: <RayService>-serve-svc; the ports: deploy/kuberay's containerPorts)
SERVICE_LINKS = {
    "CERTSERVE_SERVE_SVC_SERVICE_HOST": "10.96.12.7",
    "CERTSERVE_SERVE_SVC_SERVICE_PORT": "8000",
    "CERTSERVE_SERVE_SVC_SERVICE_PORT_SERVE": "8000",
    "CERTSERVE_SERVE_SVC_PORT": "tcp://10.96.12.7:8000",
    "CERTSERVE_SERVE_SVC_PORT_8000_TCP": "tcp://10.96.12.7:8000",
    "CERTSERVE_SERVE_SVC_PORT_8000_TCP_PROTO": "tcp",
    "CERTSERVE_SERVE_SVC_PORT_8000_TCP_PORT": "8000",
    "CERTSERVE_SERVE_SVC_PORT_8000_TCP_ADDR": "10.96.12.7",
    "CERTSERVE_HEAD_SVC_SERVICE_HOST": "fd00:10:96::5",
    "CERTSERVE_HEAD_SVC_SERVICE_PORT_GCS_SERVER": "6379",
    "CERTSERVE_HEAD_SVC_PORT_6379_TCP": "tcp://[fd00:10:96::5]:6379",
    "CERTSERVE_HEAD_SVC_PORT_6379_TCP_ADDR": "fd00:10:96::5",
    "CERTSERVE_HEAD_SVC_PORT_8265_UDP_PROTO": "udp",
}


def test_kubernetes_service_links_are_not_refused(monkeypatch):
    from pydantic import ValidationError

    from server.settings import Settings

    for name, value in SERVICE_LINKS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CERTSERVE_MAX_SAMPLES", "20000")
    assert Settings().max_samples == 20000  # the links are not settings: nothing else changes
    # still refused: a real variable misspelled, and a name shaped like a link whose value is not one
    for name, value in [("CERTSERVE_API_KEY", "secret"), ("CERTSERVE_METRICS_PORT", "9090"),
                        ("CERTSERVE_X_SERVICE_HOST", "not-an-address"), ("CERTSERVE_X_PORT_80_TCP_PROTO", "http")]:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError, match=name):
            Settings()
        monkeypatch.delenv(name)


# --------------------------------------------------------------------------------------------- client (3)

@pytest.fixture
def signer(tmp_path):
    from certification.signing import Signer, generate_key_files

    generate_key_files(tmp_path / "keys")
    return Signer.from_paths(tmp_path / "keys")


MARGINAL = {"method": "surrogate", "guarantee": {"kind": "conformal-marginal", "alpha": 0.01, "statement": "marginal"},
            "samples": 0, "stopped_by": "certified", "fallback_reason": None}


@pytest.mark.parametrize("per_input", ["1", "yes", "True", "on", 1])
def test_client_checks_the_request_as_the_server_read_it(signer, per_input):
    from certification.plan import CertifyParams
    from certification.verify import VerificationError
    from test_verify import IMAGE, sign_certificate
    from test_verify_review2 import _client

    assert CertifyParams.model_validate({"per_input": str(per_input)}).per_input is True  # the server's reading
    marginal, _ = sign_certificate(signer, issued_at=int(time.time()), **MARGINAL)
    with _client({"jwks": signer.jwks(), "cert": marginal}) as client:
        with pytest.raises(VerificationError) as info:
            client.certify(IMAGE, per_input=per_input)
        assert info.value.reason == "not_requested"
        assert client.certify(IMAGE, per_input="false")  # a marginal answer to a request that allows one
    genuine, _ = sign_certificate(signer, issued_at=int(time.time()),
                                  guarantee={"kind": "anytime-valid", "alpha": 0.01, "statement": "per input"})
    with _client({"jwks": signer.jwks(), "cert": genuine}) as client:  # sent as "0.01", certified at 0.01
        assert client.certify(IMAGE, alpha=np.float32(0.01), per_input=per_input)
        with pytest.raises(VerificationError, match="not_requested|request"):
            client.certify(IMAGE, alpha=np.float32(0.001))


# --------------------------------------------------------------------------------------------- 400 (6)

def _serve(app, protocol):
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=protocol, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, port


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_malformed_pipelined_request_is_not_answered_for_the_earlier_one(parser):
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from server.connections import guarded_protocol

    async def app(scope, receive, send):  # answers after 0.3 s, as a job would
        if scope["type"] != "http":
            return
        await asyncio.sleep(0.3)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    base = HttpToolsProtocol if parser == "httptools" else H11Protocol
    server, thread, port = _serve(app, guarded_protocol(base, timeout=5.0))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"POST /next HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nbad\r\n")
            data = b""
            while True:
                try:
                    chunk = sock.recv(65536)
                except (ConnectionResetError, socket.timeout):
                    break
                if not chunk:
                    break
                data += chunk
        # the first answer on the connection is the valid request's (or nothing: closed), never a 400 for it
        assert not data.startswith(b"HTTP/1.1 400"), data[:200]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # alone on its connection: the 400
            sock.sendall(b"POST /next HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nbad\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 400 Bad Request")
    finally:
        server.should_exit = True
        thread.join(5)


def test_a_service_named_certserve_gets_a_clear_refusal_not_a_type_error(monkeypatch):
    """A Kubernetes Service named ``certserve`` sets CERTSERVE_PORT=tcp://IP:PORT in every pod of its namespace: the
    server refused it as 'Input should be a valid integer', which does not say where the value came from or what to
    do. Now the message names the service link and the two fixes (2026-12-06; failed before: the integer message)."""
    from pydantic import ValidationError

    from server.settings import Settings

    monkeypatch.setenv("CERTSERVE_PORT", "tcp://10.96.0.7:8000")
    with pytest.raises(ValidationError, match="Kubernetes service link.*enableServiceLinks: false"):
        Settings()
    assert Settings(port=8001).port == 8001  # --port wins over the variable


def test_the_shipped_kuberay_pods_take_no_service_links():
    """deploy/kuberay's head and worker pods set enableServiceLinks: false, so no Service of their namespace (e.g. one
    named certserve) puts CERTSERVE_* variables into their environment."""
    import yaml

    spec = yaml.safe_load((Path(__file__).parents[1] / "deploy/kuberay/rayservice.yaml").read_text())["spec"]
    cluster = spec["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    assert pods and all(pod.get("enableServiceLinks") is False for pod in pods)
