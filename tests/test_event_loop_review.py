"""Event-loop review: work that held the event loop thread (and so every surrogate answer, /healthz and /metrics)
behind other requests' work. Each test asserts structure (which thread ran the work, whether another request got in
meanwhile), not milliseconds.

Real components: the app through its lifespan (fastapi TestClient: its own event loop thread), onnxruntime, the
engine, a real audit log file.
"""

from __future__ import annotations

import asyncio
import fcntl
import threading

import numpy as np
from fastapi.testclient import TestClient

import certification.audit as audit_module
from certification.audit import read_records
from server.app import create_app
from server.settings import Settings

SURROGATE = {"mode": "surrogate", "alpha": 0.1}


def test_a_blocked_audit_append_does_not_hold_the_event_loop(tmp_path, monkeypatch):
    """The audit append (the log's flock, the write, the fsync when configured) ran on the event loop: while another
    process held the log's lock (its append or rotation; a slow fsync, a stalled volume), every request waited,
    /healthz and surrogate answers included. Here the test holds the flock; the certificate's append waits for it in
    the audit writer thread, and /healthz answers meanwhile; once released the certificate is answered with its
    record written. Run against the code before this review: /healthz answered only after the lock was released."""
    path = tmp_path / "audit.jsonl"
    settings = Settings(max_samples=2000, audit_log=str(path))
    image = np.full((1, 28, 28), 0.5).tolist()
    real_flock, locking = fcntl.flock, threading.Event()

    def spy(fd, op):
        if op == fcntl.LOCK_EX:
            locking.set()
        return real_flock(fd, op)

    with TestClient(create_app(settings, seed=0)) as client:
        assert client.post("/certify", json={"image": image, **SURROGATE}).status_code == 200
        monkeypatch.setattr(audit_module.fcntl, "flock", spy)
        released = threading.Event()
        with open(path, "ab") as holder:
            real_flock(holder.fileno(), fcntl.LOCK_EX)  # another writer of this log holds its lock

            def release():
                released.set()
                real_flock(holder.fileno(), fcntl.LOCK_UN)

            timer = threading.Timer(10.0, release)  # the old code waits here; never forever
            timer.start()
            answer = {}
            worker = threading.Thread(target=lambda: answer.setdefault(
                "r", client.post("/certify", json={"image": image, **SURROGATE})))
            worker.start()
            try:
                assert locking.wait(10), "the certificate never reached its audit append"
                assert client.get("/healthz").status_code == 200
                assert not released.is_set(), "/healthz waited for the audit log's lock: the append held the loop"
            finally:
                timer.cancel()
                if not released.is_set():
                    release()
            worker.join(30)
        assert answer["r"].status_code == 200, answer["r"].text[:300]
    assert len(read_records(path)) == 2


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((28, 28)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_a_mid_size_nested_array_is_decoded_off_the_event_loop(monkeypatch):
    """A nested-array image counted as "small" up to 128x128 numbers and was decoded on the event loop: ~0.6 us a
    number (lists -> array, and the compact JSON its input hash covers), ~6 ms for 100x100 and ~11 ms for 127x127,
    per request, while the module said <= ~0.2 ms. Now an array of more than INLINE_NUMBERS (4096) numbers goes to
    the decode pool; a 28x28 one stays inline. Run against the code before this review: the 100x100 array was
    decoded on the loop thread."""
    import server.requests as requests_module

    threads, real = [], requests_module.decode

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(requests_module, "decode", spy)
    rng = np.random.default_rng(0)
    with TestClient(create_app(Settings(max_samples=2000), seed=0)) as client:
        for size in (28, 100):
            image = np.round(rng.random((1, size, size)), 4).tolist()
            r = client.post("/certify", json={"image": image, "resize": True, **SURROGATE})
            assert r.status_code == 200, r.text[:300]
    assert not threads[0].startswith("certserve-decode"), threads  # 784 numbers: inline, as before
    assert threads[1].startswith("certserve-decode"), threads


def test_a_batch_lets_other_requests_in_between_its_images(monkeypatch):
    """A batch decoded its small images inline one after the other without yielding, then started every image's job
    at once, so their surrogate passes and seals ran back to back: a batch of 64 28x28 PNGs held the loop ~7 ms
    decoding and ~40 ms certifying (64 nested arrays: ~55 ms decoding) before any other request's step. Here a
    callback scheduled on the loop by the batch's first decode (first certification) must run before the third
    image's. Run against the code before this review: it ran after all 16 decodes (certifications)."""
    import server.requests as requests_module

    from certification.service import CertificationService

    events, real_decode, real_certify = [], requests_module.decode, CertificationService.certify

    def decode_spy(*args, **kwargs):
        if "decode" not in events:
            asyncio.get_running_loop().call_soon(events.append, "other-after-decode")
        events.append("decode")
        return real_decode(*args, **kwargs)

    async def certify_spy(self, *args, **kwargs):
        if "certify" not in events:
            asyncio.get_running_loop().call_soon(events.append, "other-after-certify")
        events.append("certify")
        return await real_certify(self, *args, **kwargs)

    monkeypatch.setattr(requests_module, "decode", decode_spy)
    monkeypatch.setattr(CertificationService, "certify", certify_spy)
    with TestClient(create_app(Settings(max_samples=2000), seed=0)) as client:
        files = [("images", (f"{i}.png", _png(i), "image/png")) for i in range(16)]
        r = client.post("/certify/batch", files=files, data=SURROGATE)
        assert r.status_code == 200 and len(r.json()["results"]) == 16, r.text[:300]
    decodes = [e for e in events if e in ("decode", "other-after-decode")]
    certifies = [e for e in events if e in ("certify", "other-after-certify")]
    assert decodes.index("other-after-decode") <= 2, decodes
    assert certifies.index("other-after-certify") <= 2, certifies


def test_a_large_urlencoded_form_is_parsed_off_the_event_loop(monkeypatch):
    """An application/x-www-form-urlencoded body (image: base64 text) was parsed on the event loop: its percent-
    decoding took ~75 ms for a 4 MiB body, every other request waiting. Now a body over INLINE_BYTES is parsed by the
    same Starlette parser in the decode pool (certserve-decode), as a large JSON body is; a small one stays inline.
    Run against the code before this review: the large form's fields were parsed on the loop thread."""
    import base64
    import io
    import urllib.parse

    from PIL import Image
    from starlette.formparsers import FormParser

    threads, real = [], FormParser.on_field_end

    def spy(self):
        threads.append(threading.current_thread().name)
        return real(self)

    monkeypatch.setattr(FormParser, "on_field_end", spy)
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((256, 256)) * 255).astype(np.uint8)).save(buf, "PNG")
    with TestClient(create_app(Settings(max_samples=2000), seed=0)) as client:
        for png in (_png(0), buf.getvalue()):
            body = urllib.parse.urlencode({"image": base64.b64encode(png).decode(), "resize": "true", **SURROGATE})
            r = client.post("/certify", content=body.encode(),
                            headers={"content-type": "application/x-www-form-urlencoded"})
            assert r.status_code == 200, r.text[:300]
    small, large = threads[:4], threads[4:]
    assert len(large) == 4 and not any(t.startswith("certserve-decode") for t in small), threads
    assert all(t.startswith("certserve-decode") for t in large), threads


def test_an_array_input_is_hashed_one_row_at_a_time_with_the_same_bytes(monkeypatch):
    """Moving a nested array's decode to a pool thread freed nothing by itself: its input hash encodes the array as
    compact JSON, and ONE json.dumps call (C, ~10 ms for 128x128) held the GIL, so the event loop waited as long as
    inline. compact_json now encodes it one innermost list at a time (the loop gets the GIL back between rows) and
    must give exactly json.dumps's text (the signed input.sha256 of an "array" input). Run against the code before
    this review: server.imaging had no compact_json (ImportError); json.dumps took the whole array."""
    import json

    import server.imaging as imaging
    from server.imaging import compact_json, received_input

    rng = np.random.default_rng(3)
    deep: list = [0.5]
    for _ in range(600):  # nested deeper than any image: encoded as before, no deeper recursion here
        deep = [deep]
    cases = [rng.random((1, 31, 17)).tolist(), rng.random((3, 4, 5)).tolist(), rng.random((6, 2)).tolist(), [], [[]],
             [[1, 2], 3, "é", None, True, [float("nan"), -0.0, 1e300]], [[[[[0.25]]]]], 0.5, deep]
    for case in cases:
        assert compact_json(case) == json.dumps(case, separators=(",", ":"))
    calls, real = [], json.dumps

    class Spy:
        @staticmethod
        def dumps(obj, *args, **kwargs):
            calls.append(obj)
            return real(obj, *args, **kwargs)

    monkeypatch.setattr(imaging, "json", Spy)
    image = rng.random((1, 64, 64)).tolist()
    _, received, encoding = received_input(image)
    assert encoding == "array" and received == real(image, separators=(",", ":")).encode()
    assert len(calls) == 64 and all(not any(type(x) is list for x in c) for c in calls)
