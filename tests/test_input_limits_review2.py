"""Input limits found by review 2 (image decoding): each test failed on the code before it.

* A progressive JPEG may repeat a scan (each a few bytes, with an end-of-band run over the whole image) as often as
  its body holds: every scan is a pass over the whole image. 3.4 MB of them (100,000 scans of a 4096x4096 image) held
  a decode thread for 275 s; now more than ``JPEG_MAX_SCANS`` (500, as TurboJPEG's TJFLAG_LIMITSCANS) are refused
  before decoding.
* A TIFF was asked its ``n_frames`` before its format was refused: Pillow seeks through every IFD, quadratically
  (3.2 MB of IFDs: 45 s).
* A CMYK JPEG (4 channels) was converted to RGB by Pillow's formula without ``convert`` and without a word in the
  certificate's ``preprocessing``.
* A 16-bit colour PNG with a chunk before its IHDR passed the 16-bit check (which reads the IHDR at its place) and
  was certified at 8 bits.
* A binary file sent as a multipart text field (no filename: ``curl -F image=<x.png``) was told about '+' in
  urlencoded bodies.
* API keys given as a list (a Ray Serve config's ``args``) were not checked: an empty key let in every request that
  sent no key.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, TiffImagePlugin

from server.app import create_app
from server.imaging import ImageError, decode_image
from server.jpeg_data import JPEG_MAX_SCANS
from server.settings import Settings

SHAPE = (1, 28, 28)  # the embedded bundle's input


def decode(data: bytes, **options):
    return decode_image(data, shape=SHAPE, max_pixels=4096 * 4096, **options)


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, bytes) of a Pillow-written JPEG; a scan's bytes run from its SOS to the next marker."""
    out, pos = [(0xD8, data[:2])], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append((marker, data[pos:pos + 2]))
            break
        end = pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
        out.append((marker, data[pos:end]))
        pos = end
    return out


def many_scans(extra: int, side: int = 256) -> bytes:
    """A black progressive grey JPEG with one of its AC scans (12 bytes: one end-of-band run) repeated ``extra``
    more times before its EOI; libjpeg decodes it (a warning it does not report)."""
    segments = jpeg_segments(encode(Image.new("L", (side, side)), "JPEG", progressive=True))
    scans = [s for m, s in segments if m == 0xDA]
    ac_first = min((s for s in scans if s[7] > 0 and s[9] >> 4 == 0), key=len)  # Ss > 0, Ah = 0
    return b"".join(s for m, s in segments if m != 0xD9) + ac_first * extra + b"\xff\xd9"


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(max_samples=500), seed=0), raise_server_exceptions=False) as c:
        yield c


# --------------------------------------------------------------------------------------------- JPEG scans
def test_a_jpeg_of_too_many_scans_is_refused_before_decoding(monkeypatch):
    """Old code: decoded (100,000 extra scans of a 4096x4096 image: 275 s in a decode thread)."""
    bomb = many_scans(JPEG_MAX_SCANS)  # 6 scans of its own
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(ImageError, match=f"more than {JPEG_MAX_SCANS} scans"):
        decode(bomb, resize=True)


def with_junk_after_first_segment(data: bytes) -> bytes:
    """``data`` with one stray byte after its first segment (APP0): libjpeg and Pillow skip it with a warning."""
    end = 4 + struct.unpack(">H", data[4:6])[0]
    return data[:end] + b"\x00" + data[end:]


def test_a_stray_byte_between_segments_does_not_hide_the_scans(monkeypatch):
    """Old code (the scan count stopped at the first byte that was not a marker): the bomb passed and was decoded
    (5,000 extra scans of a 2048x2048 image: 1.7 s for 97 KB, growing with both)."""
    bomb = with_junk_after_first_segment(many_scans(JPEG_MAX_SCANS))
    Image.open(io.BytesIO(bomb)).load()  # the decoder reads every scan past the stray byte
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(ImageError, match=f"more than {JPEG_MAX_SCANS} scans"):
        decode(bomb, resize=True)


def test_a_stray_byte_between_segments_still_decodes():
    image, _ = decode(with_junk_after_first_segment(many_scans(0)), resize=True)
    assert image.shape == SHAPE


@pytest.mark.parametrize("mode,options,scans", [
    ("L", {}, 1), ("RGB", {"progressive": True}, 10), ("L", {"progressive": True, "restart_marker_rows": 1}, 6),
    ("RGB", {"progressive": True, "restart_marker_blocks": 3, "optimize": True}, 10)])
def test_encoders_jpegs_pass_the_scan_count(monkeypatch, mode, options, scans):
    """Ordinary JPEGs (restart markers, stuffed 0xFF bytes in the noise, an EXIF block) pass; their scans are
    counted exactly (one fewer allowed is refused)."""
    pixels = np.random.default_rng(3).integers(0, 256, (28, 28, 3) if mode == "RGB" else (28, 28), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x010F] = "camera"
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif, **options)
    image, _ = decode(data, convert=True)
    assert image.shape == SHAPE
    monkeypatch.setattr("server.jpeg_data.JPEG_MAX_SCANS", scans - 1)
    with pytest.raises(ImageError, match="scans"):
        decode(data, convert=True)


def test_too_many_scans_is_a_422_through_the_app(client):
    r = client.post("/certify", files={"image": ("x.jpg", many_scans(JPEG_MAX_SCANS), "image/jpeg")},
                    data={"resize": "true", "mode": "surrogate"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "bad_image"
    assert "re-encode" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------- other formats
def test_a_multi_page_tiff_is_refused_without_reading_its_pages(monkeypatch):
    """Old code: ``n_frames`` read every IFD before the format was refused (60,000 IFDs: 45 s)."""
    ifds, out = 2000, bytearray(b"II*\x00" + struct.pack("<I", 8))
    for i in range(ifds):
        following = len(out) + 2 + 4 * 12 + 4 if i < ifds - 1 else 0
        out += struct.pack("<H", 4) + b"".join(struct.pack("<HHII", tag, 4, 1, value) for tag, value in
                                               ((256, 1), (257, 1), (273, 8), (279, 1))) + struct.pack("<I", following)
    seeks = []
    seek = TiffImagePlugin.TiffImageFile._seek
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_seek", lambda self, frame: (seeks.append(frame),
                                                                                     seek(self, frame))[1])
    with pytest.raises(ImageError, match="format TIFF is not accepted"):
        decode(bytes(out))
    assert len(seeks) <= 1, f"{len(seeks)} IFDs read"


# --------------------------------------------------------------------------------------------------- CMYK
def cmyk_jpeg() -> bytes:
    pixels = np.random.default_rng(5).integers(0, 256, (28, 28, 4), dtype=np.uint8)
    return encode(Image.fromarray(pixels, mode="CMYK"), "JPEG", quality=95)


def test_a_cmyk_jpeg_needs_convert():
    """Old code: accepted with ``steps == []`` (Pillow's CMYK->RGB formula applied silently)."""
    with pytest.raises(ImageError, match="CMYK.*convert=true"):
        decode(cmyk_jpeg())
    _, steps = decode(cmyk_jpeg(), convert=True)
    assert steps == ["converted CMYK->RGB", "converted 3->1 channels"]


def test_a_cmyk_conversion_is_in_the_certificate(client):
    r = client.post("/certify", files={"image": ("x.jpg", cmyk_jpeg(), "image/jpeg")},
                    data={"convert": "true", "mode": "surrogate"})
    assert r.status_code == 200, r.text
    assert r.json()["preprocessing"] == ["converted CMYK->RGB", "converted 3->1 channels"]


# -------------------------------------------------------------------------------------------------- PNG IHDR
def png(*chunks: tuple[bytes, bytes]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(p)) + t + p + struct.pack(">I", zlib.crc32(t + p))
                                          for t, p in chunks)


def ihdr(bits: int, colour: int) -> tuple[bytes, bytes]:
    return b"IHDR", struct.pack(">IIBBBBB", 28, 28, bits, colour, 0, 0, 0)


def rgb16() -> tuple[bytes, bytes]:
    pixels = np.random.default_rng(7).integers(0, 65536, (28, 28, 3)).astype(">u2")
    return b"IDAT", zlib.compress(b"".join(b"\x00" + row.tobytes() for row in pixels))


@pytest.mark.parametrize("chunks", [
    [(b"tEXt", b"k\x00v"), ihdr(16, 2), rgb16()],  # a chunk before the IHDR
    [ihdr(8, 6), (b"tEXt", b"k\x00v"), ihdr(16, 4), (b"IDAT", zlib.compress((b"\x00" + b"\x12\x34\xff\xff" * 28) * 28))],
], ids=["chunk-before-ihdr", "second-ihdr"])
def test_a_png_whose_ihdr_is_not_first_and_alone_is_refused(chunks):
    """Old code: the first case was certified at 8 bits (Pillow reads 16-bit colour as 8-bit RGB), past the 16-bit
    check that reads the IHDR's bit depth at its place (bytes 24-25)."""
    with pytest.raises(ImageError, match="IHDR"):
        decode(png(*chunks, (b"IEND", b"")), convert=True)


# -------------------------------------------------------------------------------------- multipart text part
def test_a_binary_file_sent_as_a_text_field_is_told_to_send_a_filename(client):
    data = encode(Image.fromarray(np.random.default_rng(9).integers(0, 256, (28, 28), dtype=np.uint8)), "PNG")
    r = client.post("/certify", files={"image": (None, data)})  # a part without a filename: a text field
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "filename" in message and "%2B" not in message, message


# ------------------------------------------------------------------------------------------------- API keys
IMAGE = {"image": np.full((28, 28), 0.5).tolist(), "mode": "surrogate"}


@pytest.mark.parametrize("keys", [["real-key", ""], [" "], ["key "], ["clé"], ["a,b"]])
def test_an_unusable_api_key_in_a_list_is_refused(keys):
    """Old code: a list (a Ray Serve config's ``args``) was taken as it was; ["real-key", ""] let in every request
    that sent no key (the empty key matched the empty header), the others made keys that no header matches."""
    with pytest.raises(ValueError, match="API key") as info:
        Settings(api_keys=keys)
    assert "clé" not in str(info.value) and "real-key" not in str(info.value)  # never echoes a key


def test_an_empty_key_never_opens_the_app():
    try:
        settings = Settings(max_samples=200, api_keys=["real-key", ""])
    except ValueError:
        return  # refused at start-up (the fix)
    with TestClient(create_app(settings, seed=0), raise_server_exceptions=False) as c:
        assert c.post("/certify", json=IMAGE).status_code == 401


def test_keys_from_a_string_are_still_split_and_trimmed():
    assert Settings(api_keys=" a , b ,, ").api_keys == ["a", "b"]
    assert Settings(api_keys=["k1", "k-2_~!"]).api_keys == ["k1", "k-2_~!"]
