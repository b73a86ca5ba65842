"""Decode and validate request images against the bundle's input spec; never a 500 for bad input.

Accepted: PNG or JPEG bytes, ``.npy`` bytes (uint8 0-255 or float 0-1), base64 of any of these, or a nested list of
floats in [0, 1] shaped (C, H, W) or (H, W). The pixel count is checked from the header BEFORE decoding
(decompression bombs). A wrong size or channel count is rejected with the expected shape, unless the request asks
for ``resize`` / ``convert``; what was done is echoed back.
"""

from __future__ import annotations

import base64
import binascii
import io
import json

import numpy as np
from PIL import Image, UnidentifiedImageError

_NPY_MAGIC = b"\x93NUMPY"


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
                 convert: bool = False) -> tuple[np.ndarray, list[str]]:
    """Return ((C, H, W) float32 in [0, 1], list of preprocessing steps) or raise ImageError."""
    steps: list[str] = []
    if isinstance(data, list):
        arr = _from_nested(data, max_pixels)
    else:
        raw = _b64(data) if isinstance(data, str) else data
        if not raw:
            raise ImageError("the image is empty (0 bytes)")
        arr = _from_npy(raw, max_pixels) if raw.startswith(_NPY_MAGIC) else _from_pil(raw, max_pixels)
    return _conform(arr, shape, resize, convert, steps), steps


def received_input(data: bytes | str | list) -> tuple[bytes | list, bytes, str]:
    """(what to decode, the bytes a certificate's ``input.sha256`` hashes, their encoding) of a request image.

    ``file``: multipart bytes as received. ``base64``: the bytes the string decodes to (a ``data:`` URL prefix
    dropped), so the same file hashes alike in both encodings. ``array``: a nested list hashes as compact JSON,
    ``json.dumps(array, separators=(",", ":"))`` of the numbers as parsed (Python's shortest round-trip floats)."""
    if isinstance(data, list):
        return data, json.dumps(data, separators=(",", ":")).encode(), "array"
    if isinstance(data, str):
        raw = _b64(data)
        return raw, raw, "base64"
    return data, data, "file"


def _b64(text: str) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image must be base64 (PNG, JPEG or .npy bytes) or a nested array of floats") from None


def _from_pil(raw: bytes, max_pixels: int) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(raw))
        width, height = img.size  # header only, nothing decoded yet
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageError("could not read the image: expected PNG, JPEG or .npy bytes") from None
    if img.format not in ("PNG", "JPEG"):
        raise ImageError(f"image format {img.format} is not accepted: send PNG, JPEG or .npy")
    if img.format == "PNG" and raw[24:25] == b"\x10" and raw[25:26] != b"\x00":  # IHDR bit depth 16, not grey
        raise ImageError("16-bit colour or grey+alpha PNGs cannot be decoded without losing precision: send an "
                         "8-bit or 16-bit grey PNG, or a float .npy")
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                         "image_too_large")
    try:
        img.load()  # decoding is bounded by the pixel check above
        transparent = _has_transparent_pixels(img)
        if img.mode not in ("L", "RGB"):
            if not img.mode.startswith("I"):  # 16-bit grey stays as it is (scaled below)
                img = img.convert("L" if img.mode in ("1", "LA", "F") else "RGB")  # palette, alpha, CMYK -> RGB
    except (OSError, ValueError, SyntaxError):
        raise ImageError("the image data is truncated or corrupt") from None
    if transparent:  # dropping the alpha would certify pixels that were not shown
        raise ImageError("the image has transparent pixels: flatten it onto a background (no alpha) first")
    if img.mode.startswith("I"):  # 16-bit PNG: scale, do not clip to 8 bits
        return np.asarray(img, dtype=np.float32) / 65535.0
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr if arr.ndim == 2 else np.transpose(arr, (2, 0, 1))


def _has_transparent_pixels(img: Image.Image) -> bool:
    """True where some pixel is not fully opaque (a fully opaque alpha channel is dropped: nothing changes)."""
    if "A" not in img.getbands() and "transparency" not in img.info:
        return False
    return img.convert("RGBA").getchannel("A").getextrema()[0] < 255


def _from_npy(raw: bytes, max_pixels: int) -> np.ndarray:
    buf = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(buf)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        dims, _, dtype = header(buf)
    except (ValueError, OSError, SyntaxError):
        raise ImageError("could not read the .npy header") from None
    if dtype.kind not in "uif" or dtype.hasobject or dtype.kind in "ui" and dtype != np.uint8:
        raise ImageError(f".npy dtype {dtype} is not accepted: use uint8 (0-255) or float (0-1)")
    if int(np.prod(dims, dtype=np.int64)) > 4 * max_pixels:
        raise ImageError(f".npy array of shape {dims} exceeds the pixel limit {max_pixels}", "image_too_large")
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise ImageError("the .npy data is truncated or corrupt") from None
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return _check_range(arr)


def _from_nested(data: list, max_pixels: int) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        arr = None
    if arr is None or arr.dtype.kind not in "iuf" or _has_booleans(data):  # ragged, or strings, booleans (alone
        # they give a bool array; mixed with numbers numpy makes them 1.0 / 0.0), nulls, integers beyond int64
        raise ImageError("image array must be a rectangular nested list of numbers (floats in [0, 1])") from None
    if arr.size > 4 * max_pixels:
        raise ImageError(f"image array of shape {arr.shape} exceeds the pixel limit {max_pixels}", "image_too_large")
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


def _check_range(arr: np.ndarray) -> np.ndarray:
    """The values as float32 after checking them at their own precision (a finite 1e39 is out of range, not inf)."""
    if not np.all(np.isfinite(arr)):
        raise ImageError("image values must be finite numbers (found NaN or infinity)")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ImageError(f"float image values must lie in [0, 1]; found [{arr.min():g}, {arr.max():g}]")
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
            raise ImageError(f"image is {arr.shape[1]}x{arr.shape[2]} (HxW); the model expects {h}x{w} "
                             f"(shape ({c}, {h}, {w})). Send resize=true to resize.")
        steps.append(f"resized {arr.shape[1]}x{arr.shape[2]}->{h}x{w}")
        arr = np.stack([np.asarray(Image.fromarray(ch.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
                        for ch in arr])
        arr = np.clip(arr, 0.0, 1.0)
    return np.ascontiguousarray(arr, dtype=np.float32)
