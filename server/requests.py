"""Decode stage of a request: multipart or JSON body -> (raw images, :class:`CertifyParams`), then raw -> tensor."""

from __future__ import annotations

import hashlib
import json
import time
from typing import NamedTuple

import numpy as np
from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from certification.errors import ServiceError
from certification.plan import CertifyParams
from server.imaging import ImageError, decode_image, received_input
from server.schemas import JSONBatchRequest, JSONCertifyRequest


async def parse_request(request: Request, *, batch: bool) -> tuple[list, CertifyParams]:
    """(raw images, params) from multipart form data or JSON; ServiceError (422/415, or 499 when the client went
    away mid-upload: not an internal error) otherwise."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if ctype == "application/json":
            return await _parse_json(request, batch)
        if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            return await _parse_form(request, batch)
    except ClientDisconnect:
        raise ServiceError("client_closed_request", "the client closed the connection while sending") from None
    raise ServiceError("unsupported_media_type", "send multipart/form-data (field 'image') or application/json")


async def _parse_json(request: Request, batch: bool) -> tuple[list, CertifyParams]:
    field = "images" if batch else "image"
    try:
        body = json.loads(await request.body(), object_pairs_hook=_unique_keys)
    except _RepeatedKey as exc:
        raise ServiceError("bad_request", f"JSON keys given more than once: {exc} (give each once)") from None
    except (ValueError, UnicodeDecodeError, RecursionError):  # ValueError: also integers beyond Python's digit limit
        raise ServiceError("bad_json", "the body is not valid JSON (or nests deeper, or has longer numbers, than "
                                       "a request can)") from None
    try:
        req = (JSONBatchRequest if batch else JSONCertifyRequest).model_validate(body, strict=True)  # JSON has types:
        # true is not a sample budget, "0.1" not an alpha (form fields are text and are parsed below)
    except ValidationError as exc:
        raise ServiceError("bad_request", pydantic_message(exc)) from None
    params = CertifyParams.model_validate(req.model_dump(exclude={field}))
    return (req.images if batch else [req.image]), params


class _RepeatedKey(Exception):
    """A JSON object with a key given twice (json.loads would keep the last one silently)."""


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):  # linear: a body with many keys costs no more than parsing it
        seen, repeated = set(), set()
        for key, _ in pairs:
            (repeated if key in seen else seen).add(key)
        raise _RepeatedKey(", ".join(sorted(repeated)[:10]))
    return out


async def _parse_form(request: Request, batch: bool) -> tuple[list, CertifyParams]:
    field = "images" if batch else "image"
    try:
        form = await request.form(max_files=256, max_fields=64)
    except (StarletteHTTPException, MultiPartException) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        raise ServiceError("bad_multipart", f"could not parse the multipart body: {detail}") from None
    files = form.getlist(field)
    if not files:
        raise ServiceError("missing_image", f"multipart field '{field}' (the image file) is required")
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


def decode(raw, params: CertifyParams, *, shape: tuple[int, int, int], max_pixels: int) -> Decoded:
    """The decoded image, its preprocessing, the decode time and the hash of what was received; ServiceError for
    bad input."""
    t0 = time.perf_counter()
    try:
        data, received, encoding = received_input(raw)
        image, steps = decode_image(data, shape=shape, max_pixels=max_pixels, resize=params.resize,
                                    convert=params.convert)
    except ImageError as exc:
        raise ServiceError(exc.code, str(exc)) from None
    return Decoded(image, steps, (time.perf_counter() - t0) * 1e3, hashlib.sha256(received).hexdigest(), encoding)
