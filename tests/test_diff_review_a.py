"""Review of the server-side changes of 8b8709e..f38cfd0 (HEAD answered as GET, the audit writer thread, the pooled
url-encoded parser, the held 431). Each test failed on the code before its fix.

- ``test_an_auto_request_cancelled_while_its_surrogate_certificate_awaits_its_audit_record_counts_as_surrogate``:
  since the audit record is written in the sealer's writer thread, a surrogate answer waits on it (where a log is
  configured) and its client can go away meanwhile; mode=auto's cancellation was then counted as
  ``certserve_requests_total{route="sequential",outcome="cancelled"}``, a route that never ran.
- ``test_an_oriented_image_of_the_shown_model_size_is_refused_for_its_orientation``: the new header size check
  (resize=false) ran before the EXIF orientation refusal: a JPEG or PNG shown at the model's size (stored transposed,
  EXIF orientation 6) was told it has another size and to send resize=true, which then only met the orientation
  refusal; before the header check it was refused for its orientation, with what to do.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import io

import numpy as np
import pytest
import uvicorn
from PIL import Image

from certification.seal import Sealer
from server.app import create_app
from server.imaging import ImageError, decode_image
from server.settings import Settings


def _serve(app):
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def _count(metrics, route: str, outcome: str) -> float:
    return metrics.requests.labels(route, outcome)._value.get()


def test_an_auto_request_cancelled_while_its_surrogate_certificate_awaits_its_audit_record_counts_as_surrogate(
        tmp_path, monkeypatch):
    app = create_app(Settings(max_samples=300, audit_log=str(tmp_path / "audit.jsonl")), seed=0)
    entered, release = threading.Event(), threading.Event()
    record = Sealer._record

    def slow_record(self, cert):  # a slow append (fsync, another writer's flock, a stalled disk)
        entered.set()
        release.wait(10)
        return record(self, cert)

    monkeypatch.setattr(Sealer, "_record", slow_record)
    server, thread, port = _serve(app)
    try:
        metrics = app.state.metrics
        body = json.dumps({"image": np.full((1, 28, 28), 1.0).tolist(), "mode": "auto"}).encode()  # surrogate route
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /certify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            assert entered.wait(20), "the certificate never reached its audit record"
        deadline = time.monotonic() + 10  # the client is gone: the request is cancelled while its record waits
        while _count(metrics, "surrogate", "cancelled") + _count(metrics, "sequential", "cancelled") == 0:
            assert time.monotonic() < deadline, "the cancellation was never counted"
            time.sleep(0.02)
        release.set()
        assert _count(metrics, "sequential", "cancelled") == 0  # the sequential route never ran
        assert _count(metrics, "surrogate", "cancelled") == 1
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_oriented_image_of_the_shown_model_size_is_refused_for_its_orientation(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 32 high x 28 wide, shown 28 high x 32 wide (the model's size)
    buf = io.BytesIO()
    Image.new("L", (28, 32), 128).save(buf, fmt, exif=exif.tobytes())
    with pytest.raises(ImageError, match="EXIF orientation 6") as refused:
        decode_image(buf.getvalue(), shape=(1, 28, 32), max_pixels=10**6)
    assert "resize" not in str(refused.value)
    buf = io.BytesIO()  # without an orientation, another stored size is still refused from the header
    Image.new("L", (28, 32), 128).save(buf, fmt)
    with pytest.raises(ImageError, match="image is 32x28 .*Send resize=true"):
        decode_image(buf.getvalue(), shape=(1, 28, 32), max_pixels=10**6)
