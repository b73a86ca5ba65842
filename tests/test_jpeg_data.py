"""JPEG data the decoder would invent is refused (server.jpeg_data), not certified.

Each refusal test was run against the code before server.jpeg_data (Pillow's decode alone) and failed there: libjpeg
fills a scan that ends early (grey rows), or a progressive image's missing scans (a blurred image), reports a
warning that Pillow does not pass on, and the image was certified. Ordinary encoders' JPEGs still decode to exactly
the pixels Pillow gives. Deterministic (seeded pixels, fixed cuts).
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.app import create_app
from server.imaging import ImageError, decode_image
from server.jpeg_data import jpeg_problem
from server.settings import Settings

SHAPE = (1, 28, 28)  # the embedded bundle's input


def jpeg(mode="L", size=28, seed=0, **options) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    pixels = np.cumsum(rng.integers(0, 40, shape), axis=0).astype(np.uint8)  # smooth-ish: several scans' worth
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, **options)
    return buf.getvalue()


def scan_starts(data: bytes) -> list[int]:
    return [m.start() for m in re.finditer(b"\xff\xda", data)]


def cut_mid_scan(data: bytes) -> bytes:
    """The first half of the (last) scan's data, then an end-of-image marker: what an interrupted write leaves."""
    start = scan_starts(data)[-1]
    return data[:start + (len(data) - start) // 2] + b"\xff\xd9"


def decode(data: bytes):
    return decode_image(data, shape=SHAPE, max_pixels=4096 * 4096, convert=True)


def test_a_jpeg_cut_mid_scan_is_refused():
    """Old code: decoded without an error; rows 16-27 of the 28 came out grey (128), invented by libjpeg."""
    data = cut_mid_scan(jpeg())
    pixels = np.asarray(Image.open(io.BytesIO(data)))  # what Pillow alone makes of it
    assert (pixels[-4:] == 128).all()
    with pytest.raises(ImageError, match="premature end of data segment") as err:
        decode(data)
    assert err.value.code == "bad_image"


def test_a_progressive_jpeg_cut_between_scans_is_refused():
    """A well-formed stream with its later scans missing: libjpeg warns nothing, so the strict decode alone would let
    it pass; the scans' coverage refuses it. Old code: decoded, pixels off by up to ~80 levels from the whole file."""
    data = jpeg("RGB", progressive=True)
    for k in range(1, len(scan_starts(data))):
        cut = data[:scan_starts(data)[k]] + b"\xff\xd9"
        assert "never coded to full precision" in jpeg_problem(cut)
        with pytest.raises(ImageError, match="truncated or corrupt: the JPEG's coefficient"):
            decode(cut)


def test_a_jpeg_without_its_scan_is_refused():
    """The frame and tables, no scan: no component is coded (Pillow alone: "image file is truncated")."""
    data = jpeg()
    with pytest.raises(ImageError) as err:
        decode(data[:scan_starts(data)[0]] + b"\xff\xd9")
    assert str(err.value) == ("the image data is truncated or corrupt: no scan of the JPEG codes its component 1 of 1; "
                              "send the whole file")


def test_damaged_entropy_coded_data_is_refused_with_libjpegs_message():
    """A marker inside a scan's data (two bytes of a transmission error): libjpeg takes it for the scan's end and
    fills the rest. Old code: decoded, pixels off by up to 210 levels from the whole file's, on every row."""
    data = jpeg("RGB", size=64)
    at = scan_starts(data)[0] + 44
    with pytest.raises(ImageError) as err:
        decode_image(data[:at] + b"\xff\xd3" + data[at:], shape=(3, 64, 64), max_pixels=1 << 20)
    assert str(err.value) == ("the image data is truncated or corrupt: libjpeg reports 'Corrupt JPEG data: premature "
                              "end of data segment'; send the whole, intact file")


def test_a_wrong_restart_marker_is_refused():
    """Restart markers numbered out of order: libjpeg resynchronizes with a warning (whatever it skipped is filled)."""
    data = jpeg("RGB", size=64, restart_marker_blocks=2)
    at = data.index(b"\xff\xd2", scan_starts(data)[0])
    with pytest.raises(ImageError, match="found marker 0xd6 instead of RST2"):
        decode_image(data[:at] + b"\xff\xd6" + data[at + 2:], shape=(3, 64, 64), max_pixels=1 << 20)


@pytest.mark.parametrize("mode,options", [
    ("L", {}), ("RGB", {}), ("RGB", {"subsampling": 0}), ("RGB", {"subsampling": 1}), ("RGB", {"progressive": True}),
    ("L", {"progressive": True, "restart_marker_rows": 1}), ("RGB", {"optimize": True, "restart_marker_blocks": 3}),
    ("RGB", {"keep_rgb": True}), ("CMYK", {})])
def test_encoders_jpegs_pass_with_pillows_pixels(mode, options):
    data = jpeg("RGB", **options) if mode != "CMYK" else _cmyk()
    if mode == "L":
        data = jpeg("L", **options)
    assert jpeg_problem(data) is None
    image, _ = decode_image(data, shape=SHAPE if mode == "L" else (3, 28, 28), max_pixels=1 << 20, convert=True)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("L" if mode == "L" else "RGB"), dtype=np.float32)
    expected = reference / 255.0 if reference.ndim == 2 else np.transpose(reference, (2, 0, 1)) / 255.0
    assert np.array_equal(image.reshape(expected.shape), expected)


def _cmyk() -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg("RGB"))).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def test_bytes_between_segments_and_before_the_end_marker_pass():
    """libjpeg skips bytes between marker segments (with a warning) and reads on; so does the check, which decodes
    the stream without them. Bytes after the last scan, before the end marker, are let through too."""
    data = jpeg("RGB", progressive=True)
    first = 4 + int.from_bytes(data[4:6], "big")  # after SOI and the first segment
    assert jpeg_problem(data[:first] + b"junk" + data[first:]) is None
    assert jpeg_problem(data[:-2] + b"\x00\x00\x00\xff\xd9") is None


def test_a_cut_jpeg_is_a_422_through_the_app_and_nothing_is_certified(tmp_path):
    audit = tmp_path / "audit.jsonl"
    app = create_app(Settings(max_samples=500, audit_log=str(audit)), seed=0)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/certify", files={"image": ("x.jpg", cut_mid_scan(jpeg()), "image/jpeg")},
                        data={"mode": "surrogate"})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "bad_image" and "send the whole, intact file" in error["message"]
        ok = client.post("/certify", files={"image": ("x.jpg", jpeg(), "image/jpeg")}, data={"mode": "surrogate"})
        assert ok.status_code == 200, ok.text
    assert len(audit.read_text().splitlines()) == 1  # the whole JPEG's certificate only
