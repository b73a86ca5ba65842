"""``certserve serve`` (server.serve.run_serve: uvicorn with the connection guard) in a thread around a stand-in ASGI
app, for the tests of connection-level behaviour (tests/test_long_running_review2.py, tests/test_network_review2.py)."""

from __future__ import annotations

import argparse
import threading
import time
from contextlib import contextmanager

import server.app
from bench.server_process import free_port
from server import serve
from server.settings import Settings


@contextmanager
def serving(monkeypatch, app, *, h11: bool = False, body_timeout: str = "0.5"):
    """Run ``certserve serve`` serving ``app`` with CERTSERVE_BODY_TIMEOUT_SECONDS=``body_timeout`` (h11: uvicorn's
    h11 protocol, its choice where httptools is not installed); yields (port, the uvicorn server)."""
    monkeypatch.setenv("CERTSERVE_BODY_TIMEOUT_SECONDS", body_timeout)
    if h11:
        from uvicorn.protocols.http import auto
        from uvicorn.protocols.http.h11_impl import H11Protocol
        monkeypatch.setattr(auto, "AutoHTTPProtocol", H11Protocol)
    servers: list = []
    made = serve._draining_server_class

    def recording():
        cls, uvicorn = made()

        class Recorded(cls):
            def __init__(self, config):
                super().__init__(config)
                servers.append(self)
        return Recorded, uvicorn

    monkeypatch.setattr(serve, "_draining_server_class", recording)
    monkeypatch.setattr(serve, "check_configuration", lambda *a, **k: None)
    monkeypatch.setattr(serve, "freeze_startup_heap", lambda: None)  # not the test process's heap
    monkeypatch.setattr(server.app, "create_app", lambda settings, **kwargs: app)
    port = free_port()
    args = argparse.Namespace(bundle=None, host="127.0.0.1", port=port, device=None, threads=None,
                              log_level="warning", replicas=1, ingress=None, ray_metrics_port=None)
    assert Settings().body_timeout_seconds == float(body_timeout)
    thread = threading.Thread(target=serve.run_serve, args=(args,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not (servers and servers[0].started):
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield port, servers[0]
    finally:
        servers[0].should_exit = True
        thread.join(timeout=10)
