"""Bug hunt (server request path): images that the server certified although README says they are refused, each
reproduced through the real app (embedded default bundle, 1x28x28 input) and its lifespan, then fixed. The PNGs are
written byte by byte here (Pillow does not write these bit depths / palettes). Each test says what it guards and that
it failed on the code before its fix. ``raise_server_exceptions=False``: a server error shows up as a 500 response.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from tests import input_hardening_helpers
from tests.input_hardening_helpers import SURROGATE, assert_error, post_file

client = input_hardening_helpers.client  # the module-scoped fixture: this module's own app (real lifespan)


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: list[bytes], *extra: tuple) -> bytes:
    """A PNG of ``rows`` (packed samples of one row each, filter byte 0 added here), with ``extra`` (tag, payload)
    chunks between IHDR and IDAT."""
    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    data = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(chunk(t, p) for t, p in extra)
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def packed(values: np.ndarray, bit_depth: int) -> list[bytes]:
    """Each row of ``values`` (integers < 2**bit_depth) packed at ``bit_depth`` bits per sample, MSB first."""
    bits = np.unpackbits(values.astype(np.uint8)[..., None], axis=-1)[..., 8 - bit_depth:]  # (H, W, bit_depth)
    return [np.packbits(row.reshape(-1)).tobytes() for row in bits]


@pytest.mark.parametrize("bit_depth", [2, 4])
def test_low_bit_depth_grey_png_with_transparent_pixels_is_refused(client, bit_depth):
    """README: transparent pixels are refused (422 bad_image), "a 16-bit grey tRNS value counts". A 2- or 4-bit grey
    PNG whose tRNS makes the white half of the image fully transparent was certified (200) as if that half were
    opaque white: Pillow scales such a PNG's pixels to 8 bits (3 -> 255 at 2 bits) but keeps its tRNS value
    unscaled (3), so server.imaging._has_transparent_pixels (convert("RGBA")) matched no pixel. Failed on the old
    code (200); the opaque control still passes."""
    top = (1 << bit_depth) - 1
    values = np.zeros((28, 28), dtype=np.uint8)
    values[:, 14:] = top  # the right half white ...
    transparent = png(28, 28, bit_depth, 0, packed(values, bit_depth), (b"tRNS", struct.pack(">H", top)))  # ... and
    assert_error(post_file(client, transparent, **SURROGATE), 422, "bad_image", "transparent")  # transparent
    opaque = png(28, 28, bit_depth, 0, packed(values, bit_depth), (b"tRNS", struct.pack(">H", top - 1)))  # no pixel
    assert post_file(client, opaque, **SURROGATE).status_code == 200  # has the transparent value: certified


def test_palette_png_with_an_index_beyond_its_palette_is_refused(client):
    """A palette PNG whose pixels use index 200 of a 2-entry PLTE (the PNG spec: an error) was certified (200):
    Pillow paints such pixels black, colours of its own making, as it invents a whole palette for a palette PNG
    without PLTE (refused since review B). Failed on the old code (200); now 422 bad_image naming the index and the
    palette's size. The same image with index 1 (in the palette) is still certified."""
    plte = (b"PLTE", bytes([255, 255, 255, 128, 128, 128]))
    beyond = png(28, 28, 8, 3, [bytes([200] * 28)] * 28, plte)
    assert_error(post_file(client, beyond, convert="true", **SURROGATE), 422, "bad_image", "palette index 200",
                 "2 entries")
    inside = png(28, 28, 8, 3, [bytes([1] * 28)] * 28, plte)
    assert post_file(client, inside, convert="true", **SURROGATE).status_code == 200
