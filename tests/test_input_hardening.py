"""Input hardening found by review B (2026-12): each test here was a 500, a silent change of the input, a stalled event
loop or a misleading answer on the code before it. The app is the real one (embedded default bundle, 1x28x28 input)
through its lifespan; the images are made by Pillow in the test (malformed ones by editing a Pillow-made file's
chunks). ``raise_server_exceptions=False``: a server error shows up as a 500 response, not as an exception.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct
import threading
import time
import zlib
from urllib.parse import urlencode

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.app import create_app
from server.settings import Settings

SURROGATE = {"mode": "surrogate"}


# ---------------------------------------------------------------------------------------------------- builders
def grey(h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def encode(img: Image.Image | np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format=fmt, **options)
    return buf.getvalue()


def png_chunks(data: bytes) -> list[list]:
    """[tag, payload] of every chunk of a PNG."""
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        out.append([data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]])
        pos += 12 + length
    return out


def png_build(chunks: list) -> bytes:
    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(tag, payload) for tag, payload in chunks)


def with_idat(png: bytes, raw: bytes) -> bytes:
    """``png`` (one IDAT, as Pillow writes a small image) with its image data replaced by ``raw`` (recompressed)."""
    return png_build([[t, zlib.compress(raw) if t == b"IDAT" else p] for t, p in png_chunks(png)])


def idat_raw(png: bytes) -> bytes:
    return zlib.decompress(b"".join(p for t, p in png_chunks(png) if t == b"IDAT"))


def npy_with_header(header: str, payload: bytes = b"") -> bytes:
    """A version 1.0 ``.npy`` with ``header`` as its (padded) header text."""
    text = header.encode("latin-1")
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload


def post_file(client, data: bytes, name: str = "x.png", path: str = "/certify", **fields):
    return client.post(path, files={"image": (name, data, "application/octet-stream")},
                       data={k: str(v) for k, v in fields.items()})


def assert_error(r, status: int, code: str, *fragments: str) -> dict:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:300]}"
    err = r.json()["error"]
    assert err["code"] == code, err
    for fragment in fragments:
        assert fragment.lower() in err["message"].lower(), f"{fragment!r} not in {err['message']!r}"
    return err


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(max_samples=500), seed=0), raise_server_exceptions=False) as c:
        yield c


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


# ------------------------------------------------------------------------------------------ 2. Pillow's own errors
def _palette_png_with_late_plte() -> bytes:
    """A palette PNG whose PLTE and tRNS come after IDAT: Pillow's convert() asserted (AssertionError)."""
    chunks = png_chunks(encode(Image.fromarray(grey()).convert("P")))
    head = [c for c in chunks if c[0] not in (b"PLTE", b"tRNS")]
    late = [c for c in chunks if c[0] == b"PLTE"] + [[b"tRNS", b"\xff\xff\xff\x00"]]
    return png_build(head[:-1] + late + head[-1:])


def _iccp_after_idat() -> bytes:
    """An 8-bit grey PNG with a 2-byte iCCP chunk after IDAT: Pillow raised IndexError while loading."""
    chunks = png_chunks(encode(grey()))
    return png_build(chunks[:-1] + [[b"iCCP", b"x\x00"]] + chunks[-1:])


@pytest.mark.parametrize("make", [_palette_png_with_late_plte, _iccp_after_idat], ids=["late-plte", "late-iccp"])
def test_pillow_internal_errors_are_422(client, make):
    """Run against the old code: failed with 500 internal (AssertionError in Image.convert; IndexError in the
    iCCP handler). Now late-plte is refused by the PLTE-before-IDAT check (and, without it, by the broad except
    around Pillow's decoding), late-iccp by the broad except only (checked: with it narrowed back, 500)."""
    assert_error(post_file(client, make(), convert="true", **SURROGATE), 422, "bad_image")


# ------------------------------------------------------------------------------------------------- 3. .npy headers
@pytest.mark.parametrize("header", [
    "{'descr': '<f8', 'fortran_order': False, 'shape': (28, 28",  # unterminated: tokenize.TokenError
    "{'descr': '<f8', 'fortran_order': False, 'shape': (True, 28, 28), }",  # a bool dimension: TypeError
    "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",  # int64 product wraps to 0
], ids=["unterminated", "bool-dim", "wrapping-dims"])
def test_malformed_npy_headers_are_422(client, header):
    """Run against the old code: failed with 500 internal (tokenize.TokenError; TypeError 'an integer is required'
    for the bool dimension); the wrapping dims gave 422 'truncated or corrupt' instead of 413."""
    r = post_file(client, npy_with_header(header, (np.full((28, 28), 0.5)).tobytes()), "x.npy", **SURROGATE)
    if "4294967296" in header:
        assert_error(r, 413, "image_too_large", "limit")
    else:
        assert_error(r, 422, "bad_image", ".npy header")


def test_npy_with_bytes_after_its_array_is_refused(client):
    """The array must be exactly what the header declares: bytes after it are not silently dropped (np.load ignores
    them; the PNG check refuses extra rows alike). Run against the code before 2026-12-06: failed with 200."""
    buf = io.BytesIO()
    np.save(buf, np.full((28, 28), 0.5, np.float32))
    assert post_file(client, buf.getvalue(), "x.npy", **SURROGATE).status_code == 200
    assert_error(post_file(client, buf.getvalue() + b"\x00" * 4, "x.npy", **SURROGATE), 422, "bad_image",
                 "truncated or corrupt", "need 3136")


# --------------------------------------------------------------------------------------- 4. 16-bit transparency
def test_sixteen_bit_grey_with_a_transparent_value_is_refused(client):
    """A 16-bit grey PNG whose tRNS grey value occurs among its pixels has transparent pixels (convert('RGBA')
    ignores 16-bit tRNS). Run against the old code: failed with 200 (certified)."""
    pixels = np.full((28, 28), 1000, np.uint16)
    pixels[3, 4] = 40000
    shown = encode(Image.fromarray(pixels), transparency=40000)
    assert_error(post_file(client, shown, **SURROGATE), 422, "bad_image", "transparent")
    absent = encode(Image.fromarray(pixels), transparency=123)  # the tRNS value occurs nowhere: nothing transparent
    assert post_file(client, absent, **SURROGATE).status_code == 200


# ---------------------------------------------------------------------------------------------- 5. query strings
@pytest.mark.parametrize("path", ["/certify", "/certify/batch"])
def test_query_string_parameters_are_refused(client, path):
    """Run against the old code: failed with 200 (?mode=sequential&alpha=0.5 silently ignored)."""
    field = "image" if path == "/certify" else "images"
    r = client.post(path + "?mode=sequential&alpha=0.5", files={field: ("x.png", encode(grey()), "image/png")})
    assert_error(r, 422, "bad_request", "query string", "mode", "alpha", "body")


# --------------------------------------------------------------------------------------------- 6. short PNG data
def test_png_with_fewer_rows_than_declared_is_refused(client):
    """A zlib stream that ends cleanly after 5 of 28 rows: Pillow zero-fills the rest. Valid PNGs of every colour
    type and bit depth still pass the new length check (interlaced ones: the next test). Run against the old code: failed with 200 (the
    zero-filled image certified)."""
    png = encode(grey())
    assert_error(post_file(client, with_idat(png, idat_raw(png)[:5 * 29]), **SURROGATE), 422, "bad_image",
                 "truncated")
    assert_error(post_file(client, with_idat(png, idat_raw(png) + b"\x00" * 29), **SURROGATE), 422, "bad_image",
                 "image data")
    rgba = np.dstack([np.stack([grey()] * 3, -1), np.full((28, 28), 255, np.uint8)])
    valid = [encode(grey()), encode(grey(), optimize=True),
             encode(Image.fromarray(grey()).convert("1")), encode(Image.fromarray(grey()).convert("P"), bits=2),
             encode(Image.fromarray(grey()).convert("P"), bits=4), encode(Image.fromarray(grey()).convert("P")),
             encode(Image.fromarray(grey().astype(np.uint16) * 257)), encode(np.stack([grey()] * 3, -1)),
             encode(rgba), encode(Image.fromarray(rgba).convert("LA"))]
    for i, data in enumerate(valid):
        r = post_file(client, data, convert="true", **SURROGATE)
        assert r.status_code == 200, f"valid PNG #{i}: {r.text[:200]}"


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def interlaced_png(pixels: np.ndarray, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """An Adam7-interlaced PNG of ``pixels`` (H, W[, C], 8- or 16-bit samples), built by hand: Pillow writes none."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2" if bit_depth == 16 else np.uint8).tobytes()
                   for x0, y0, dx, dy in ADAM7 for row in pixels[y0::dy, x0::dx] if row.size)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 1)
    return png_build([[b"IHDR", ihdr], [b"IDAT", zlib.compress(raw)], [b"IEND", b""]])


@pytest.mark.parametrize("shape, bit_depth, colour_type", [((28, 28), 8, 0), ((28, 28, 3), 8, 2),
                                                           ((28, 28), 16, 0), ((5, 3), 8, 0), ((1, 1), 8, 0)])
def test_interlaced_pngs_pass_the_length_check(client, shape, bit_depth, colour_type):
    """Adam7 images (a pass may be empty for small sizes) are accepted, not refused as truncated. Run once against the
    length check with a wrong pass table ((4, 0, 8, 8) -> (4, 0, 4, 8)): the three images wide enough for that pass
    were refused; Pillow's own interlace=1 option writes a non-interlaced file, so the earlier test never covered
    this."""
    pixels = np.random.default_rng(3).integers(0, 2**bit_depth, shape)
    r = post_file(client, interlaced_png(pixels, bit_depth, colour_type), convert="true", resize="true",
                  **SURROGATE)
    assert r.status_code == 200, r.text[:300]


def test_palette_png_without_its_palette_is_refused(client):
    """A palette PNG with no PLTE chunk: Pillow decodes it with a palette of its own making. Run against the old
    code: failed with 200 (certified through the invented palette)."""
    chunks = [c for c in png_chunks(encode(Image.fromarray(grey()).convert("P"))) if c[0] != b"PLTE"]
    assert_error(post_file(client, png_build(chunks), convert="true", **SURROGATE), 422, "bad_image", "PLTE")


# --------------------------------------------------------------------------------------- 7-8. frames, orientation
def test_animated_png_is_refused(client):
    """Run against the old code: failed with 200 (frame 0 certified, frame 1 dropped)."""
    frames = [Image.fromarray(grey(seed=1)), Image.fromarray(grey(seed=2))]
    anim = encode(frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert_error(post_file(client, anim, **SURROGATE), 422, "bad_image", "animated", "2 frames")


def test_exif_orientation_must_be_applied_by_the_client(client):
    """Run against the old code: failed with 200 (orientation 6 neither applied nor stated)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(grey(), "JPEG", exif=exif.tobytes(), quality=95)
    assert_error(post_file(client, rotated, "x.jpg", **SURROGATE), 422, "bad_image", "orientation 6",
                 "exif_transpose")
    exif[0x0112] = 1
    assert post_file(client, encode(grey(), "JPEG", exif=exif.tobytes()), "x.jpg", **SURROGATE).status_code == 200


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
