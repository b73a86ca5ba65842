"""Decode and validate request images against the bundle's input spec; never a 500 for bad input.

Accepted: PNG or JPEG bytes, ``.npy`` bytes (uint8 0-255 or float 0-1), base64 of any of these (line breaks, as
MIME wraps base64, are dropped), or a nested list of floats in [0, 1] shaped (C, H, W) or (H, W). The pixel count
is checked from the header BEFORE decoding (decompression bombs), and reported to the caller's ``admit`` (a request's
budget of pixels) before anything is decoded. A wrong size or channel count is rejected with the expected shape,
unless the request asks for ``resize`` / ``convert``; what was done is echoed back. Refused rather than silently
changed: transparent pixels (also a 16-bit, 4-bit or 2-bit grey tRNS value), palette indices beyond the palette,
animations (only a first frame would be certified), an EXIF orientation (the pixels would be certified as stored,
not as shown), PNG data that does not fill exactly the rows the header declares (Pillow zero-fills missing rows),
and a CMYK JPEG without ``convert`` (4 channels; with it, Pillow's CMYK->RGB formula is applied and echoed), and
JPEG data that libjpeg would complete by invention (a scan cut short, scans missing, damaged codes:
:mod:`server.jpeg_data`, which also refuses a JPEG of more than ``JPEG_MAX_SCANS`` scans before decoding).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from server.jpeg_data import jpeg_problem

_NPY_MAGIC = b"\x93NUMPY"
_LINE_BREAKS = b"\r\n"
_NOT_TEXT = re.compile(r"[^\x20-\x7e\r\n\t]")  # what base64 text never holds: control bytes, non-ASCII
_EXIF_ORIENTATION = 0x0112
_FORMATS = ("PNG", "JPEG")


# The pixel count is checked against ``max_pixels`` from the header before anything is decoded (below). PIL's own
# decompression-bomb guard would refuse a large image at open time with an error that names no limit of ours, so the
# server's limit replaces it: Image.open reads the header only, and nothing is decoded before our check.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """Bad image input; ``code`` is ``bad_image`` or ``image_too_large`` (the service's error codes)."""

    def __init__(self, message: str, code: str = "bad_image"):
        super().__init__(message)
        self.code = code


def decode_image(data: bytes | str | list, *, shape: tuple[int, int, int], max_pixels: int, resize: bool = False,
                 convert: bool = False, admit: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """Return ((C, H, W) float32 in [0, 1], list of preprocessing steps) or raise ImageError. ``admit(pixels)`` is
    called with the declared pixel count (width x height) once it passed ``max_pixels``, before any decoding: it may
    raise (e.g. a request's total pixel budget is spent)."""
    steps: list[str] = []
    admit = admit or (lambda pixels: None)
    if isinstance(data, list):
        arr = _from_nested(data, max_pixels, admit)
    else:
        raw = _b64(data) if isinstance(data, str) else data
        if not raw:
            raise ImageError("the image is empty (0 bytes)")
        arr = (_from_npy(raw, max_pixels, admit) if raw.startswith(_NPY_MAGIC) else
               _from_pil(raw, max_pixels, admit, convert, steps, None if resize else shape))
    return _conform(arr, shape, resize, convert, steps), steps


def received_input(data: bytes | str | list) -> tuple[bytes | list, bytes, str]:
    """(what to decode, the bytes a certificate's ``input.sha256`` hashes, their encoding) of a request image.

    ``file``: multipart bytes as received. ``base64``: the bytes the string decodes to (a ``data:`` URL prefix
    dropped), so the same file hashes alike in both encodings. ``array``: a nested list hashes as compact JSON,
    ``json.dumps(array, separators=(",", ":"))`` of the numbers as parsed (Python's shortest round-trip floats)."""
    if isinstance(data, list):
        return data, compact_json(data).encode(), "array"
    if isinstance(data, str):
        raw = _b64(data)
        return raw, raw, "base64"
    return data, data, "file"


def compact_json(data, depth: int = 0) -> str:
    """``json.dumps(data, separators=(",", ":"))``, the same text, one innermost list at a time (down to depth 3): one
    call held the GIL ~10 ms for a 128x128 array, so the event loop waited that long even with the decode in a pool
    thread; between two rows the loop gets it back."""
    if depth < 3 and type(data) is list and any(type(item) is list for item in data):
        return "[" + ",".join(compact_json(item, depth + 1) for item in data) + "]"
    return json.dumps(data, separators=(",", ":"))


def _b64(text: str) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:  # line breaks (MIME base64 wraps its lines at 76) carry nothing: dropped
        return base64.b64decode(text.encode("ascii").translate(None, _LINE_BREAKS), validate=True)
    except (binascii.Error, ValueError):  # UnicodeEncodeError (non-ASCII text) is a ValueError
        hint = (" (it is binary, not text: a file sent in a multipart body must be a file part, with a filename, "
                "e.g. curl -F image=@x.png; curl -F image=<x.png sends it as a text field)"
                if _NOT_TEXT.search(text) else
                " (it contains spaces: in an application/x-www-form-urlencoded body each '+' of base64 must be sent "
                "as %2B, else it arrives as a space)" if " " in text else "")
        raise ImageError(f"image must be base64 (PNG, JPEG or .npy bytes) or a nested array of floats{hint}") from None


def _from_pil(raw: bytes, max_pixels: int, admit: Callable[[int], None], convert: bool = False,
              steps: list[str] | None = None, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Decode a PNG or JPEG. ``shape`` (the model's, when the request does not ask to resize): an image of another
    height x width is refused from its header, before anything is decoded (as :func:`_conform` would refuse it
    after decoding: a large image's decode cost the server its time and memory for nothing)."""
    try:
        img = Image.open(io.BytesIO(raw))
        width, height = img.size  # header only, nothing decoded yet
        # PNG: from acTL, in the header. Not asked of other formats (refused below): a TIFF seeks through all its
        # IFDs for it, quadratically (3 MB of them held the thread for 45 s)
        frames = getattr(img, "n_frames", 1) if img.format in _FORMATS else 1
    except MemoryError:
        raise
    except Exception:  # Pillow's parsers raise more than OSError on malformed headers (SyntaxError, struct.error, ...)
        raise ImageError("could not read the image: expected PNG, JPEG or .npy bytes") from None
    if img.format not in _FORMATS:
        raise ImageError(f"image format {img.format} is not accepted: send PNG, JPEG or .npy")
    if frames != 1:
        raise ImageError(f"the image is animated ({frames} frames); only its first frame would be certified: send "
                         "one still frame (a single-image PNG or JPEG)")
    if img.format == "PNG" and raw[24:25] == b"\x10" and raw[25:26] != b"\x00":  # IHDR bit depth 16, not grey
        raise ImageError("16-bit colour or grey+alpha PNGs cannot be decoded without losing precision: send an "
                         "8-bit or 16-bit grey PNG, or a float .npy")
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                         "image_too_large")
    if shape is not None and (height, width) != shape[1:] and not _oriented(img):  # (oriented: refused below, with
        raise ImageError(_size_message((height, width), shape))  # what to do; its stored size is not the one shown)
    admit(width * height)
    if img.format == "PNG":
        _check_png_data(raw, width, height)  # bounded by the pixel check above, as decoding
    elif (problem := jpeg_problem(raw)) is not None:  # too many scans, or data that libjpeg would invent
        raise ImageError(problem)
    if img.mode == "CMYK":  # JPEG: 4 channels, and no standard RGB without its colour profile
        if not convert:
            raise ImageError("the image is CMYK (4 channels); the model takes grey or RGB: send it as RGB or grey, "
                             "or send convert=true to convert it (Pillow's CMYK->RGB formula, no colour profile)")
        steps.append("converted CMYK->RGB")
    try:
        img.load()  # decoding is bounded by the pixel check above
        orientation = img.getexif().get(_EXIF_ORIENTATION)  # after load: a PNG's eXIf chunk may follow its IDAT
        grey_bits = raw[24] if img.format == "PNG" and raw[25:26] == b"\x00" else 8  # IHDR: grey, its bit depth
        transparent = _has_transparent_pixels(img, grey_bits)
        beyond = _palette_overflow(img)
        if img.mode not in ("L", "RGB"):
            if not img.mode.startswith("I"):  # 16-bit grey stays as it is (scaled below)
                img = img.convert("L" if img.mode in ("1", "LA", "F") else "RGB")  # palette, alpha, CMYK -> RGB
        arr = np.asarray(img, dtype=np.float32)
    except MemoryError:
        raise
    except Exception:  # also Pillow's AssertionError / IndexError / TypeError on inconsistent chunks
        raise ImageError("the image data is truncated or corrupt") from None
    if orientation in range(2, 9):  # 1 (or none): stored as shown
        raise ImageError(f"the image has EXIF orientation {orientation}: it is shown rotated or mirrored, but its "
                         "pixels are stored unrotated and would be certified as stored. Apply the orientation to "
                         "the pixels (e.g. PIL.ImageOps.exif_transpose) and send the image without it")
    if beyond:  # Pillow paints them black, a colour of its own making (as for a palette PNG without PLTE)
        raise ImageError(f"the image data is truncated or corrupt: the palette PNG uses palette index {beyond[0]}, "
                         f"but its palette (PLTE) has {beyond[1]} entries")
    if transparent:  # dropping the alpha would certify pixels that were not shown
        raise ImageError("the image has transparent pixels: flatten it onto a background (no alpha) first")
    if img.mode.startswith("I"):  # 16-bit PNG: scale, do not clip to 8 bits
        return arr / 65535.0
    arr = arr / 255.0
    return arr if arr.ndim == 2 else np.transpose(arr, (2, 0, 1))


def _oriented(img: Image.Image) -> bool:
    """An EXIF orientation other than 1 in what Pillow read of the header (a JPEG's APP1, a PNG's eXIf before its
    data; nothing is decoded): such an image is refused after decoding for its orientation, not for its stored size
    (rotated, a 32x28 stored image is shown 28x32; "send resize=true" would only lead to that refusal)."""
    return "exif" in img.info and img.getexif().get(_EXIF_ORIENTATION) in range(2, 9)


def _has_transparent_pixels(img: Image.Image, grey_bits: int = 8) -> bool:
    """True where some pixel is not fully opaque (a fully opaque alpha channel is dropped: nothing changes).
    ``grey_bits``: the bit depth of a grey PNG (8 otherwise)."""
    if "A" not in img.getbands() and "transparency" not in img.info:
        return False
    if img.mode.startswith("I") or img.mode == "L" and grey_bits in (2, 4):  # convert("RGBA") ignores a 16-bit grey
        # tRNS value, and matches no pixel of a 2- or 4-bit one (Pillow scales those pixels to 8 bits, x 85 or x 17,
        # not the tRNS value): compare the pixels with the value, scaled as they are
        value, scale = img.info["transparency"], 255 // ((1 << grey_bits) - 1) if img.mode == "L" else 1
        return not isinstance(value, int) or bool((np.asarray(img) == value * scale).any())
    return img.convert("RGBA").getchannel("A").getextrema()[0] < 255


def _palette_overflow(img: Image.Image) -> tuple[int, int] | None:
    """(largest index, palette entries) of a palette image that uses an index its palette does not have (PNG spec:
    an error; Pillow decodes such pixels as black), else None."""
    if img.mode != "P" or img.palette is None:
        return None
    entries = len(img.palette.palette) // len(img.palette.mode)
    largest = int(np.asarray(img).max(initial=0))
    return (largest, entries) if largest >= entries else None


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _check_png_data(raw: bytes, width: int, height: int) -> None:
    """Refuse a PNG whose image data does not fill exactly the rows its header declares (a zlib stream that ends
    cleanly early is zero-filled by Pillow, without an error), or a palette PNG with no PLTE before its data (Pillow
    would invent a palette). The IDAT data are inflated in 1 MiB pieces and counted, up to one byte beyond the
    expected size: filter bytes included, Adam7 passes summed."""
    view, pos, parts, ihdr, palette = memoryview(raw), 8, [], None, False
    while pos + 8 <= len(raw):
        length, tag = int.from_bytes(raw[pos:pos + 4], "big"), raw[pos + 4:pos + 8]
        if tag == b"IHDR":  # first, once (PNG spec); _from_pil's 16-bit check reads it there: Pillow would take an
            if pos != 8 or ihdr is not None:  # IHDR after another chunk, or the last of several, and 8-bit it
                raise ImageError("the image data is truncated or corrupt: the PNG header (IHDR) must be its first "
                                 "chunk, once")
            ihdr = raw[pos + 8:pos + 8 + 13]
        elif tag == b"PLTE" and not parts:
            palette = True
        elif tag == b"IDAT":
            parts.append(view[pos + 8:pos + 8 + length])
        elif tag == b"IEND":
            break
        pos += 12 + length
    if ihdr is None or len(ihdr) < 13 or ihdr[9] not in _PNG_CHANNELS:
        raise ImageError("the image data is truncated or corrupt: the PNG header (IHDR) is malformed")
    if ihdr[9] == 3 and not palette:
        raise ImageError("the image data is truncated or corrupt: the palette PNG has no palette (PLTE) before its "
                         "image data")
    bits = ihdr[8] * _PNG_CHANNELS[ihdr[9]]
    passes = ([(width, height)] if ihdr[12] == 0 else
              [(-(-(width - x) // dx), -(-(height - y) // dy)) for x, y, dx, dy in _ADAM7 if width > x and height > y])
    expected = sum(h * (1 + (w * bits + 7) // 8) for w, h in passes)
    inflate, got = zlib.decompressobj(), 0
    try:
        for part in parts:
            while part and not inflate.eof and got <= expected:
                got += len(inflate.decompress(part, 1 << 20))
                part = inflate.unconsumed_tail
    except zlib.error:
        raise ImageError("the image data is truncated or corrupt: the PNG's compressed data is invalid") from None
    if got < expected:
        raise ImageError(f"the image data is truncated or corrupt: the PNG's image data ends after {got} of the "
                         f"{expected} bytes its {width}x{height} header declares (rows are missing)")
    if got > expected:
        raise ImageError(f"the image data is truncated or corrupt: the PNG holds more image data than its "
                         f"{width}x{height} header declares")


def _from_npy(raw: bytes, max_pixels: int, admit: Callable[[int], None]) -> np.ndarray:
    buf = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(buf)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        dims, _, dtype = header(buf)
    except MemoryError:
        raise
    except Exception:  # numpy parses the header with ast/tokenize: TokenError, SyntaxError, TypeError, ...
        raise ImageError("could not read the .npy header") from None
    if not all(type(d) is int and d >= 0 for d in dims):  # numpy lets True (an int) through as a dimension
        raise ImageError(f"could not read the .npy header: its shape must be non-negative integers; got {dims}")
    if dtype.kind not in "uif" or dtype.hasobject or dtype.kind in "ui" and dtype != np.uint8:
        raise ImageError(f".npy dtype {dtype} is not accepted: use uint8 (0-255) or float (0-1)")
    if math.prod(dims) > 4 * max_pixels:  # exact (np.prod in int64 wraps around: 2**32 x 2**32 gave 0)
        raise ImageError(f".npy array of shape {dims} exceeds the pixel limit {max_pixels}", "image_too_large")
    _check_pixels(dims, max_pixels)
    admit(_pixels(dims))
    expected = buf.tell() + math.prod(dims) * dtype.itemsize  # header, then exactly the array's bytes
    if len(raw) != expected:  # np.load ignores bytes after the array (and reads a short one as truncated)
        raise ImageError(f"the .npy data is truncated or corrupt: {len(raw) - buf.tell()} bytes follow the header "
                         f"where its shape {dims} and dtype {dtype} need {expected - buf.tell()}")
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except MemoryError:
        raise
    except Exception:
        raise ImageError("the .npy data is truncated or corrupt") from None
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return _check_range(arr)


def _from_nested(data: list, max_pixels: int, admit: Callable[[int], None]) -> np.ndarray:
    dims, inner = [], data
    while type(inner) is list:  # the shape along the first items: what a rectangular array has (else refused below)
        dims.append(len(inner))
        inner = inner[0] if inner else None
    if math.prod(dims) <= 4 * max_pixels:
        admit(_pixels(dims))
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        arr = None
    if arr is None or arr.dtype.kind not in "iuf" or _has_booleans(data):  # ragged, or strings, booleans (alone
        # they give a bool array; mixed with numbers numpy makes them 1.0 / 0.0), nulls, integers beyond int64
        raise ImageError("image array must be a rectangular nested list of numbers (floats in [0, 1])") from None
    if arr.size > 4 * max_pixels:
        raise ImageError(f"image array of shape {arr.shape} exceeds the pixel limit {max_pixels}", "image_too_large")
    _check_pixels(arr.shape, max_pixels)
    return _check_range(arr)


def _has_booleans(data: list) -> bool:
    """True if a JSON true/false hides among the numbers of a rectangular nested list (checked row by row: the
    innermost lists are scanned by ``map(type, ...)`` at C speed, ~1 ms for a 3x224x224 image)."""
    rows = [data]
    while rows:
        row = rows.pop()
        if row and type(row[0]) is list:  # rectangular (np.asarray accepted it): every item of this row is a list
            rows.extend(row)
        elif bool in map(type, row):
            return True
    return False


def _pixels(dims) -> int:
    """width x height of an array shaped (H, W), (C, H, W) or (H, W, C) as :func:`_conform` reads it."""
    if len(dims) == 3 and dims[0] in (1, 3):
        return dims[1] * dims[2]
    if len(dims) == 3 and dims[-1] in (1, 3):
        return dims[0] * dims[1]
    return math.prod(dims)


def _check_pixels(dims, max_pixels: int) -> None:
    """An array's width x height against max_pixels, as a PNG's header (its 4 x bound on numbers is for channels)."""
    if (pixels := _pixels(dims)) > max_pixels:
        raise ImageError(f"image array of shape {tuple(dims)} is {pixels} pixels (width x height); the limit is "
                         f"{max_pixels}", "image_too_large")


def _check_range(arr: np.ndarray) -> np.ndarray:
    """The values as float32 after checking them at their own precision (a finite 1e39 is out of range, not inf)."""
    if not np.all(np.isfinite(arr)):
        raise ImageError("image values must be finite numbers (found NaN or infinity)")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):  # numpy's str: the shortest text that reads back exactly
        raise ImageError(f"float image values must lie in [0, 1]; found [{arr.min()}, {arr.max()}]")
    return arr.astype(np.float32)


def _conform(arr: np.ndarray, shape: tuple[int, int, int], resize: bool, convert: bool, steps: list[str]) -> np.ndarray:
    c, h, w = shape
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[0] not in (1, 3) and arr.shape[-1] in (1, 3):
        arr = np.transpose(arr, (2, 0, 1))  # H, W, C
    if arr.ndim != 3:
        raise ImageError(f"image must have shape (C, H, W) or (H, W); got {arr.shape}; expected ({c}, {h}, {w})")
    if arr.size == 0:
        raise ImageError(f"the image is empty (shape {arr.shape}); expected ({c}, {h}, {w})")
    if arr.shape[0] != c:
        if not convert:
            raise ImageError(f"image has {arr.shape[0]} channel(s); the model expects {c} (shape ({c}, {h}, {w})). "
                             "Send convert=true to convert.")
        original = arr.shape[0]
        if arr.shape[0] == 3 and c == 1:
            arr = (0.299 * arr[0] + 0.587 * arr[1] + 0.114 * arr[2])[None]
        elif arr.shape[0] == 1 and c == 3:
            arr = np.repeat(arr, 3, axis=0)
        else:
            raise ImageError(f"cannot convert {arr.shape[0]} channels to {c}")
        steps.append(f"converted {original}->{c} channels")
    if arr.shape[1:] != (h, w):
        if not resize:
            raise ImageError(_size_message(arr.shape[1:], shape))
        steps.append(f"resized {arr.shape[1]}x{arr.shape[2]}->{h}x{w}")
        arr = np.stack([np.asarray(Image.fromarray(ch.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
                        for ch in arr])
        arr = np.clip(arr, 0.0, 1.0)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _size_message(hw: tuple[int, int], shape: tuple[int, int, int]) -> str:
    c, h, w = shape
    return (f"image is {hw[0]}x{hw[1]} (HxW); the model expects {h}x{w} (shape ({c}, {h}, {w})). Send resize=true "
            "to resize.")
