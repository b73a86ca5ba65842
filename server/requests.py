"""Decode stage of a request: multipart or JSON body -> (raw images, :class:`CertifyParams`), then raw -> tensor.

Decoding is CPU work (a 4096x4096 PNG takes ~0.2-1.3 s): it runs in an executor, off the event loop, except for small
images (at most ``INLINE_BYTES`` on the wire and ``INLINE_PIXELS`` declared, or a nested array of at most
``INLINE_NUMBERS`` numbers), which are decoded inline (~0.05 ms for a 28x28 PNG, ~0.5 ms for a 28x28 array, less than
a thread hand-off); a batch yields to the event loop after each inline decode. A request decodes at most
:func:`request_pixel_limit` pixels in all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from functools import partial
from typing import NamedTuple

import numpy as np
from fastapi import Request
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import FormParser, MultiPartException

from certification.errors import ServiceError
from certification.plan import CertifyParams
from models.strict_json import RepeatedKey, unique_keys
from server.imaging import ImageError, decode_image, received_input
from server.schemas import JSONBatchRequest, JSONCertifyRequest


INLINE_BYTES = 64 * 1024  # an image this small on the wire ...
INLINE_PIXELS = 128 * 128  # ... that declares at most this many pixels is decoded on the event loop (<= ~0.2 ms)
INLINE_NUMBERS = 4096  # a nested array costs ~0.6 us a number (parsed lists -> array, compact JSON for its hash):
# inline up to ~2.5 ms (a 3x32x32 image); a 128x128 one took ~11 ms of event loop
REQUEST_PIXEL_FACTOR = 4  # a request decodes at most 4 x CERTSERVE_MAX_PIXELS in all (see request_pixel_limit)
_FORM = ("multipart/form-data", "application/x-www-form-urlencoded")


async def parse_request(request: Request, *, batch: bool) -> tuple[list, CertifyParams]:
    """(raw images, params) from multipart form data or JSON; ServiceError (422/415, or 499 when the client went
    away mid-upload: not an internal error) otherwise."""
    if request.query_params:  # never read: a parameter there would be silently ignored
        names = ", ".join(sorted(set(request.query_params.keys()))[:10])
        raise ServiceError("bad_request", f"parameters go in the body (form fields or JSON keys), not in the query "
                                          f"string: got ?{names}")
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise ServiceError("unsupported_media_type", f"content-encoding {encoding} is not supported: send the body "
                                                     "uncompressed (no Content-Encoding header)")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if ctype == "application/json":
            return await _parse_json(request, batch)
        if ctype in _FORM:
            return await _parse_form(request, batch, multipart=ctype == _FORM[0])
    except ClientDisconnect:
        raise ServiceError("client_closed_request", "the client closed the connection while sending") from None
    raise ServiceError("unsupported_media_type", "send multipart/form-data (field 'image': the file), "
                                                 "application/x-www-form-urlencoded (field 'image': base64) or "
                                                 "application/json")


async def _in_pool(executor, work):
    """``work()`` in ``executor`` (the app's decode pool; None: asyncio's default); 503 draining once it has been
    shut down (the app is stopping)."""
    try:
        running = asyncio.get_running_loop().run_in_executor(executor, work)
    except RuntimeError:
        raise ServiceError("draining", "the server is shutting down; retry on another replica", retry_after=1) from None
    return await running


async def _parse_json(request: Request, batch: bool) -> tuple[list, CertifyParams]:
    field = "images" if batch else "image"
    raw = await request.body()
    parse = partial(json.loads, raw, object_pairs_hook=unique_keys)
    try:  # a large body (up to the body limit: ~45 ms for 4 MiB of numbers) is parsed off the event loop, in the
        # lifespan's bounded decode pool, as images are decoded (None outside the lifespan: asyncio's default)
        body = parse() if len(raw) <= INLINE_BYTES else await _in_pool(request.app.state.decoder, parse)
    except RepeatedKey as exc:
        raise ServiceError("bad_request", f"JSON keys given more than once: {exc} (give each once)") from None
    except (ValueError, UnicodeDecodeError, RecursionError):  # ValueError: also integers beyond Python's digit limit
        raise ServiceError("bad_json", "the body is not valid JSON (or nests deeper, or has longer numbers, than "
                                       "a request can)") from None
    if isinstance(body, dict) and body.get(field) is None:  # as a form without the field: missing_image, not a
        # pydantic "Field required" / "image.str: Input should be a valid string" under bad_request
        raise ServiceError("missing_image", f"JSON key '{field}' is required: "
                           + ("a list of images, each " if batch else "") + "base64 of PNG, JPEG or .npy bytes, or a "
                           "nested array (C,H,W or H,W) of floats in [0, 1]")
    try:
        req = (JSONBatchRequest if batch else JSONCertifyRequest).model_validate(body, strict=True)  # JSON has types:
        # true is not a sample budget, "0.1" not an alpha (form fields are text and are parsed below)
    except ValidationError as exc:
        raise ServiceError("bad_request", pydantic_message(exc)) from None
    params = CertifyParams.model_validate(req.model_dump(exclude={field}))
    return (req.images if batch else [req.image]), params


async def _parse_form(request: Request, batch: bool, multipart: bool) -> tuple[list, CertifyParams]:
    field = "images" if batch else "image"
    settings = request.app.state.settings
    if multipart:  # the parser stops silently where a body is cut short: the form would lack its last parts
        boundary = parse_options_header(request.headers.get("content-type", ""))[1].get(b"boundary")
        if boundary and b"--" + boundary + b"--" not in await request.body():  # the form parser reads this copy
            raise ServiceError("bad_multipart", "could not parse the multipart body: it ends before its closing "
                                                f"boundary '--{boundary.decode('latin-1')}--' (cut short?)")
    spare = settings.max_batch_images + 64  # every image as a text field, and the parameters
    limits = dict(max_fields=max(64, spare), max_part_size=settings.max_body_bytes)  # a part may be as large as the
    try:  # body (base64 text fields; Starlette's default is 1 MiB)
        body = None if multipart else await request.body()  # (cached: request.form() reads it from there)
        if body is not None and len(body) > INLINE_BYTES:  # unquoting took ~75 ms for 4 MiB of base64:
            form = await _in_pool(request.app.state.decoder,  # off the event loop, as a large JSON body
                                  partial(_urlencoded_form, request.headers, body, **limits))
        else:
            form = await request.form(max_files=max(256, spare), **limits)
    except (StarletteHTTPException, MultiPartException) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        kind = "multipart" if multipart else "urlencoded"
        if batch and str(detail).startswith("Too many"):  # the parser's limit on parts, above a full batch's
            raise ServiceError("too_many_images", f"at most {settings.max_batch_images} images per batch request; the "
                                                  f"{kind} body has more parts ({detail})") from None
        raise ServiceError("bad_multipart", f"could not parse the {kind} body: {detail}") from None
    files = form.getlist(field)
    if not files:
        what = (f"multipart field '{field}' (the image file, or its base64 as text)" if multipart else
                f"form field '{field}' (base64 of PNG, JPEG or .npy bytes)")
        raise ServiceError("missing_image", f"{what} is required")
    if len(files) > 1 and not batch:
        raise ServiceError("bad_request", f"{len(files)} 'image' fields: /certify takes one image; send several as "
                                          "'images' to /certify/batch")
    names = [k for k, _ in form.multi_items() if k != field]
    repeated = sorted({k for k in names if names.count(k) > 1})
    if repeated:
        raise ServiceError("bad_request", f"fields given more than once: {', '.join(repeated)} (give each once)")
    images = [await f.read() if isinstance(f, UploadFile) else f for f in files]
    extra = {k: v for k, v in form.multi_items() if k != field}
    try:
        params = CertifyParams.model_validate(extra)
    except ValidationError as exc:
        raise ServiceError("bad_request", pydantic_message(exc)) from None
    return images, params


def _urlencoded_form(headers, raw: bytes, **limits):
    """Starlette's own parser of an application/x-www-form-urlencoded body (as ``request.form()``), run to the end in
    this thread (a pool thread: no event loop here)."""
    async def body():
        yield raw
    return asyncio.run(FormParser(headers, body(), **limits).parse())


def pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg += f" (accepted: image or images, {', '.join(CertifyParams.model_fields)})"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


class Decoded(NamedTuple):
    image: np.ndarray  # (C, H, W) float32, what the model sees
    steps: list[str]  # preprocessing done (resize, convert)
    decode_ms: float
    input_sha256: str  # of the image as received (see server.imaging.received_input)
    input_encoding: str  # file | base64 | array


def decode(raw, params: CertifyParams, *, shape: tuple[int, int, int], max_pixels: int, admit=None) -> Decoded:
    """The decoded image, its preprocessing, the decode time and the hash of what was received; ServiceError for
    bad input. ``admit``: see :func:`server.imaging.decode_image`."""
    t0 = time.perf_counter()
    try:
        data, received, encoding = received_input(raw)
        image, steps = decode_image(data, shape=shape, max_pixels=max_pixels, resize=params.resize,
                                    convert=params.convert, admit=admit)
    except ImageError as exc:
        raise ServiceError(exc.code, str(exc)) from None
    return Decoded(image, steps, (time.perf_counter() - t0) * 1e3, hashlib.sha256(received).hexdigest(), encoding)


def request_pixel_limit(max_pixels: int, max_batch_images: int, shape: tuple[int, int, int]) -> int:
    """Pixels (width x height, declared by the headers) that one request may decode in all: 4 x the per-image
    limit, and at least a full batch of images of the model's own size."""
    return max(REQUEST_PIXEL_FACTOR * max_pixels, max_batch_images * shape[1] * shape[2])


class _DecodeInThread(Exception):
    """Raised by an inline decode's header check: the image declares more than INLINE_PIXELS."""


async def decode_all(raws: list, params: CertifyParams, *, shape: tuple[int, int, int], max_pixels: int,
                     request_pixels: int, executor=None) -> list[Decoded]:
    """Decode a request's images in order, each one inline when small (see the module docstring), else in
    ``executor`` (None: asyncio's default); 413 image_too_large as soon as their declared pixels exceed
    ``request_pixels`` in all, before that image is decoded."""
    spent = 0

    def admit(pixels: int, inline: bool) -> None:
        nonlocal spent
        if inline and pixels > INLINE_PIXELS:
            raise _DecodeInThread
        if spent + pixels > request_pixels:
            raise ImageError(f"the images of this request declare {spent + pixels} pixels in all (up to image "
                             f"{len(out) + 1}); a request may decode at most {request_pixels} pixels in all "
                             f"({REQUEST_PIXEL_FACTOR} x the per-image limit {max_pixels}, and at least a full batch "
                             "of model-size images): send fewer or smaller images per request", "image_too_large")
        spent += pixels  # the images are decoded one after the other: no other thread touches this meanwhile

    out = []
    for raw in raws:
        if out:  # a batch: other requests get the loop between two images (64 inline decodes held it ~55 ms)
            await asyncio.sleep(0)
        try:
            out.append(await _decode_one(raw, params, admit, executor, shape=shape, max_pixels=max_pixels))
        except ServiceError as exc:
            if len(raws) > 1 and exc.code != "draining":  # a batch: say which image
                raise ServiceError(exc.code, f"image {len(out) + 1} of {len(raws)}: {exc.message}",
                                   retry_after=exc.retry_after) from None
            raise
    return out


async def _decode_one(raw, params: CertifyParams, admit, executor, *, shape, max_pixels) -> Decoded:
    """One image of :func:`decode_all`: inline when small, else in ``executor``."""
    job = partial(decode, raw, params, shape=shape, max_pixels=max_pixels)
    if _small(raw):
        try:
            return job(admit=partial(admit, inline=True))
        except _DecodeInThread:
            pass
    return await _in_pool(executor, partial(job, admit=partial(admit, inline=False)))


def _small(raw) -> bool:
    """Cheap to decode inline as far as its size on the wire tells (the declared pixels are checked on decoding)."""
    if not isinstance(raw, list):
        return len(raw) <= (INLINE_BYTES if isinstance(raw, bytes) else INLINE_BYTES * 4 // 3 + 1024)
    count, rows = 0, [raw]  # numbers and lists of a nested list, counted up to just beyond the inline limit
    while rows and count <= INLINE_NUMBERS:
        row = rows.pop()
        count += len(row)
        rows.extend(item for item in row if type(item) is list)
    return count <= INLINE_NUMBERS
