"""Input hardening found by review B (2026-12), malformed and unusual image files: each test here was a 500, a
silent change of the input or a misleading answer on the code before it (Pillow's own errors, .npy headers, 16-bit
transparency, short, interlaced and palette PNG data, animated PNGs, EXIF orientation). The app is the real one
(embedded default bundle, 1x28x28 input) through its lifespan; the images are made by Pillow in the test (malformed
ones by editing a Pillow-made file's chunks). ``raise_server_exceptions=False``: a server error shows up as a 500
response, not as an exception. The request-level hardening is in tests/test_input_hardening.py; the shared fixture
and builders in tests/input_hardening_helpers.py.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests import input_hardening_helpers
from tests.input_hardening_helpers import SURROGATE, assert_error, encode, grey, post_file

client = input_hardening_helpers.client  # the module-scoped fixture: this module's own app


# ---------------------------------------------------------------------------------------------------- builders
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
