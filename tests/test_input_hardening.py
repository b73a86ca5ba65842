"""Input hardening found by review B (2026-12), at the level of the request: each test here was a 500, a silent
change of the input, a stalled event loop or a misleading answer on the code before it (decoding and JSON parsing off
the event loop, a cap on the pixels of a batch, query strings, large base64 form fields, the OpenAPI document,
compressed bodies, content types, request ids, malformed multipart, a stopped decode pool). The app is the real one
(embedded default bundle, 1x28x28 input) through its lifespan; the images are made by Pillow in the test.
``raise_server_exceptions=False``: a server error shows up as a 500 response, not as an exception. Malformed image
files (Pillow's own errors, .npy headers, PNG chunks, frames, orientation) are in
tests/test_input_hardening_images.py; the shared fixture and builders in tests/input_hardening_helpers.py.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from urllib.parse import urlencode

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.app import create_app
from server.settings import Settings
from tests import input_hardening_helpers
from tests.input_hardening_helpers import SURROGATE, assert_error, encode, grey

client = input_hardening_helpers.client  # the module-scoped fixture: this module's own app


# ------------------------------------------------------------------------------------- 1. decoding off the loop
@pytest.mark.parametrize("path,count", [("/certify", 1), ("/certify/batch", 2)])
def test_big_decodes_leave_the_event_loop_free(client, path, count):
    """A 4096x4096 RGB PNG (49 kB on the wire) with convert + resize takes ~1 s of CPU to decode; meanwhile GET
    /healthz must still answer at once. Run against the old code: failed with '/healthz waited 1.02 s behind a
    decode' (/certify) and 0.90 s (batch of 2: the probe got in once, after the first decode had started)."""
    big = encode(Image.new("RGB", (4096, 4096)))
    field = "image" if path == "/certify" else "images"
    answer = {}

    def certify():
        answer["r"] = client.post(path, files=[(field, ("big.png", big, "image/png"))] * count,
                                  data={"resize": "true", "convert": "true", **SURROGATE})

    worker = threading.Thread(target=certify)
    worker.start()
    latencies = []
    while worker.is_alive():
        t0 = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.01)
    worker.join()
    assert max(latencies) < 0.4, f"/healthz waited {max(latencies):.2f} s behind a decode"
    assert answer["r"].status_code == 200, answer["r"].text[:300]
    assert len(latencies) >= 5, "the decode was too quick to probe"


def test_a_large_json_body_is_parsed_off_the_event_loop(client, monkeypatch):
    """A JSON body over 64 KiB (up to the 4 MiB limit: ~45 ms of json.loads for one of numbers) is parsed in a thread:
    a /healthz sent while its parse runs (made to take 0.5 s here) answers before the parse ends. Run against the
    code parsing on the loop (before 2026-12-06): the probe came after the parse; this test failed. The parse runs
    in the app's bounded decode pool (certserve-decode threads), not asyncio's default executor: run against
    asyncio.to_thread (the code of 74e42e4): the thread-name check failed."""
    import server.requests as requests_module

    events, parsing, threads = [], threading.Event(), []

    class SlowJson:
        @staticmethod
        def loads(*args, **kwargs):
            threads.append(threading.current_thread().name)
            parsing.set()
            time.sleep(0.5)
            events.append("parsed")
            return json.loads(*args, **kwargs)

    monkeypatch.setattr(requests_module, "json", SlowJson)
    image = (np.round(grey() / 255.0, 6)).tolist()
    body = {"image": image, "mode": "surrogate", "alpha": 0.1, "target_radius": None}
    payload = json.dumps(body, indent=40).encode()  # padded past the inline limit
    assert len(payload) > requests_module.INLINE_BYTES
    worker = threading.Thread(target=lambda: client.post("/certify", content=payload,
                                                         headers={"content-type": "application/json"}))
    worker.start()
    assert parsing.wait(10)
    assert client.get("/healthz").status_code == 200
    events.append("healthz")
    worker.join()
    assert events == ["healthz", "parsed"]
    assert threads and threads[0].startswith("certserve-decode"), threads


def test_a_batch_may_not_decode_unbounded_pixels():
    """The pixels a request decodes in all are capped (4x CERTSERVE_MAX_PIXELS, at least a full batch of model-size
    images): 64 images of 4096x4096 each took ~30 s of event loop. Run against the old code: failed with 200 (six
    100x100 images at max_pixels=10000 were all decoded)."""
    settings = Settings(max_pixels=100 * 100, max_samples=200)
    with TestClient(create_app(settings, seed=0), raise_server_exceptions=False) as c:
        images = [("images", (f"{i}.png", encode(grey(100, 100, seed=i)), "image/png")) for i in range(6)]
        r = c.post("/certify/batch", files=images, data={"resize": "true", **SURROGATE})
        cap = max(4 * 100 * 100, settings.max_batch_images * 28 * 28)
        assert_error(r, 413, "image_too_large", "in all", str(cap))
        ok = c.post("/certify/batch", files=images[:5], data={"resize": "true", **SURROGATE})  # 50000 <= 50176
        assert ok.status_code == 200, ok.text[:300]


# ---------------------------------------------------------------------------------------------- 5. query strings
@pytest.mark.parametrize("path", ["/certify", "/certify/batch"])
def test_query_string_parameters_are_refused(client, path):
    """Run against the old code: failed with 200 (?mode=sequential&alpha=0.5 silently ignored)."""
    field = "image" if path == "/certify" else "images"
    r = client.post(path + "?mode=sequential&alpha=0.5", files={field: ("x.png", encode(grey()), "image/png")})
    assert_error(r, 422, "bad_request", "query string", "mode", "alpha", "body")


# ------------------------------------------------------------------------------------ 9. large base64 form fields
def test_base64_form_fields_over_1_mib_are_accepted(client):
    """1.5 MB of base64 in a form text field, under the 4 MiB body limit. Run against the old code: failed with 422
    bad_multipart 'Field exceeded maximum size of 1024KB.' (urlencoded; the multipart text field, sent alone, got
    'Part exceeded maximum size of 1024KB.')."""
    png = encode(grey(1100, 1000, seed=5))
    text = base64.b64encode(png).decode()
    assert len(text) > 2**20
    fields = {"resize": "true", **SURROGATE}
    r = client.post("/certify", content=urlencode({"image": text, **fields}).encode(),
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["preprocessing"] == ["resized 1100x1000->28x28"]
    r = client.post("/certify", files={"image": (None, text)}, data=fields)
    assert r.status_code == 200, r.text[:300]


# -------------------------------------------------------------------------------------------------- 10. OpenAPI
def test_openapi_documents_every_status_and_the_small_bodies(client):
    """Run against the old code: failed with 408 missing from /certify's responses (and 499; 503 missing from
    /v1/models and the JWKS; the 200 schemas of /healthz, /readyz and the JWKS empty)."""
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    for path in ("/certify", "/certify/batch"):
        assert {"408", "499"} <= set(paths[path]["post"]["responses"]), path
    for path in ("/v1/models", "/.well-known/jwks.json", "/readyz"):
        assert "503" in paths[path]["get"]["responses"], path
    schemas = doc["components"]["schemas"]
    for path, field in (("/healthz", "status"), ("/readyz", "status"), ("/.well-known/jwks.json", "keys")):
        schema = paths[path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        name = schema["$ref"].rsplit("/", 1)[1]
        assert field in schemas[name]["properties"], (path, schemas[name])
    assert client.get("/healthz").json() == {"status": "ok"}


# ------------------------------------------------------------------------------------------------ 11. the rest
def test_compressed_bodies_are_415(client):
    """Run against the old code: failed with 422 bad_json (the gzip bytes parsed as JSON)."""
    body = gzip.compress(json.dumps({"image": np.full((28, 28), 0.5).tolist()}).encode())
    r = client.post("/certify", content=body, headers={"content-type": "application/json",
                                                       "content-encoding": "gzip"})
    assert_error(r, 415, "unsupported_media_type", "content-encoding", "gzip", "uncompressed")


def test_415_names_all_three_content_types(client):
    """Run against the old code: failed with the message naming multipart/form-data and application/json only."""
    r = client.post("/certify", content=b"x", headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type", "multipart/form-data", "application/x-www-form-urlencoded",
                 "application/json")


def test_missing_image_in_a_urlencoded_form_does_not_say_multipart(client):
    """Run against the old code: failed with "multipart field 'image' (the image file) is required"."""
    r = client.post("/certify", content=b"mode=surrogate",
                    headers={"content-type": "application/x-www-form-urlencoded"})
    err = assert_error(r, 422, "missing_image", "'image'", "base64")
    assert "multipart" not in err["message"]


def test_out_of_range_values_are_printed_exactly(client):
    """Run against the old code: failed with 'found [0.25, 1]' for 1.0000000001 (printed with 6 digits)."""
    r = client.post("/certify", content=b'{"image": [[1.0000000001, 0.25]]}',
                    headers={"content-type": "application/json"})
    assert_error(r, 422, "bad_image", "1.0000000001", "0.25")


def test_base64_with_line_breaks_is_decoded(client):
    """MIME-style base64 (76-character lines). Run against the old code: failed with 422 'image must be base64'."""
    png = encode(grey())
    flat = base64.b64encode(png).decode()
    wrapped = "\r\n".join(flat[i:i + 76] for i in range(0, len(flat), 76)) + "\n"
    r = client.post("/certify", json={"image": wrapped, **SURROGATE})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["input"] == client.post("/certify", json={"image": flat, **SURROGATE}).json()["input"]


def test_request_id_is_echoed_byte_for_byte_or_replaced(client):
    """A non-ASCII X-Request-ID (latin-1 on the wire) is not echoed re-encoded. Run against the old code: failed
    with UnicodeEncodeError in the test client: the server echoed b'req-\\xc3\\xa9' (UTF-8) for b'req-\\xe9'."""
    r = client.get("/healthz", headers={"x-request-id": b"req-\xe9"})
    echoed = dict(r.headers.raw)[b"x-request-id"]
    assert echoed != b"req-\xc3\xa9"
    assert echoed == b"req-\xe9" or echoed.isascii() and echoed.decode().isprintable()
    r = client.post("/certify", json={"image": [[2.0]]}, headers={"x-request-id": b"caf\xe9"})
    assert r.json()["error"]["request_id"].encode("latin-1") == dict(r.headers.raw)[b"x-request-id"]
    ok = client.get("/healthz", headers={"x-request-id": "plain-ascii id 42"})
    assert ok.headers["x-request-id"] == "plain-ascii id 42"


def test_malformed_multipart_is_bad_multipart(client):
    """A multipart body cut before its closing boundary. Run against the old code: failed with 422 missing_image."""
    for body in (b"--b\r\nxxx", b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n"
                 + encode(grey())):
        r = client.post("/certify", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
        assert_error(r, 422, "bad_multipart", "multipart")


def test_a_large_json_body_after_the_decode_pool_stopped_is_a_503_draining(client):
    """A JSON body parsed in the decode pool once that pool has been shut down (the app stopping) got a 500 (the
    executor's RuntimeError), while an image decoded there got 503 draining (found by review). Run against the code
    before: 500; this test failed."""
    from concurrent.futures import ThreadPoolExecutor

    import server.requests as requests_module

    stopped = ThreadPoolExecutor(1)
    stopped.shutdown()
    pool, client.app.state.decoder = client.app.state.decoder, stopped
    try:
        payload = json.dumps({"image": (grey() / 255.0).tolist(), "mode": "surrogate"}, indent=40).encode()
        assert len(payload) > requests_module.INLINE_BYTES
        r = client.post("/certify", content=payload, headers={"content-type": "application/json"})
    finally:
        client.app.state.decoder = pool
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining", r.text
