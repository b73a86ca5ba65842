"""The HTTP contract as a client sees it: the error envelope for unexpected failures, decompression bombs, and an
OpenAPI document that validates and describes exactly what the server accepts."""

from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from certification.errors import CODES
from server.app import create_app
from server.errors import STATUS
from server.settings import Settings

GREY = np.full((28, 28), 0.5).tolist()


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(max_samples=500, auto_max_samples=300, default_deadline_ms=20_000), seed=3)) as c:
        yield c


class _Broken:
    """A model session that fails the way a real one can (a CUDA error, a corrupt graph): it raises."""

    def __init__(self, real):
        self.real, self.device, self.name = real, real.device, real.name

    def forward(self, x):
        raise RuntimeError("injected model failure")

    def noisy_predictions(self, *args):
        raise RuntimeError("injected model failure")


def _assert_internal(r, request_id: str) -> None:
    assert r.status_code == 500, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-request-id"] == request_id
    assert r.json() == {"error": {"code": "internal", "message": r.json()["error"]["message"],
                                  "request_id": request_id}}


def test_engine_failure_is_a_json_500_with_the_request_id(client, caplog):
    """A model call that raises inside the engine reaches the client as the JSON envelope (not plain text), is
    logged with its traceback, counted, and the engine keeps serving afterwards."""
    engine = client.app.state.service.engine
    real = engine.sampler.backend
    engine.sampler.backend = _Broken(real)
    try:
        with caplog.at_level(logging.ERROR, logger="certserve"):
            r = client.post("/certify", json={"image": GREY, "mode": "sequential"}, headers={"x-request-id": "boom-1"})
    finally:
        engine.sampler.backend = real
    _assert_internal(r, "boom-1")
    assert any("boom-1" in rec.getMessage() and rec.exc_info for rec in caplog.records)
    assert "certserve_internal_errors_total 1.0" in client.get("/metrics").text
    assert client.post("/certify", json={"image": GREY, "mode": "sequential"}).status_code == 200
    assert client.get("/readyz").status_code == 200


def test_clean_forward_failure_is_a_json_500(client):
    service = client.app.state.service
    real = service.surrogate
    service.surrogate = _Broken(real)
    try:
        r = client.post("/certify", json={"image": GREY}, headers={"x-request-id": "boom-2"})
    finally:
        service.surrogate = real
    _assert_internal(r, "boom-2")


def _zero_png(width: int, height: int) -> bytes:
    """A real, fully decodable all-black greyscale PNG, compressed row block by row block (never held in memory)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    rows = (b"\x00" * (width + 1)) * 500
    parts = [comp.compress(rows) for _ in range(height // 500)] + [comp.flush()]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def test_decompression_bomb_is_413_with_pixel_count_and_limit(client):
    """A 20000x20000 PNG (~400 kB on the wire, 400 MB decoded) is refused from its header with 413, naming the pixel
    count and the limit (PIL's own guard used to turn it into a misleading 422 "expected PNG")."""
    bomb = _zero_png(20000, 20000)
    assert len(bomb) < 1_000_000
    r = client.post("/certify", files={"image": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "image_too_large"
    assert "20000x20000" in err["message"] and str(20000 * 20000) in err["message"]
    assert str(client.app.state.settings.max_pixels) in err["message"]


def test_every_error_code_has_one_status():
    assert set(STATUS) == set(CODES)
    assert all(400 <= status < 600 for status in STATUS.values())


def test_openapi_document_validates_and_describes_the_bodies(client):
    doc = client.get("/openapi.json").json()
    validate(doc)  # raises on an invalid document (e.g. a $ref to a schema it does not define)
    schemas = doc["components"]["schemas"]
    for path, model, field in (("/certify", "JSONCertifyRequest", "image"), ("/certify/batch", "JSONBatchRequest",
                                                                            "images")):
        content = doc["paths"][path]["post"]["requestBody"]["content"]
        assert content["application/json"]["schema"]["$ref"] == f"#/components/schemas/{model}"
        assert field in schemas[model]["required"] and schemas[model]["additionalProperties"] is False
        form = content["multipart/form-data"]["schema"]
        assert form["required"] == [field]
        props = form["properties"]
        assert props["mode"]["enum"] == ["auto", "surrogate", "sequential", "fixed", "cohen"]
        assert props["alpha"]["type"] == "number" and props["alpha"]["exclusiveMinimum"] == 0
        assert props["alpha"]["exclusiveMaximum"] == 1
        assert props["max_samples"]["type"] == "integer" and props["max_samples"]["minimum"] == 1
        assert props["per_input"]["type"] == "boolean"
        assert set(props) == {field, *schemas[model]["properties"]} - ({"images"} if field == "image" else {"image"})
    documented = {int(s) for s in doc["paths"]["/certify"]["post"]["responses"]}
    assert {200, 401, 413, 415, 422, 500, 503} <= documented


def test_documented_form_fields_are_accepted_as_documented(client):
    """Every documented multipart field, sent as a form would send it, is accepted (typed values, enums)."""
    r = client.post("/certify", files={"image": ("x.npy", _npy(), "application/octet-stream")},
                    data={"alpha": "0.01", "mode": "sequential", "target_radius": "0.1", "max_samples": "300",
                          "deadline_ms": "20000", "per_input": "true", "resize": "false", "convert": "false"})
    assert r.status_code == 200, r.text
    assert r.json()["method"] == "sequential" and r.json()["guarantee"]["alpha"] == 0.01


def _npy() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.full((28, 28), 128, dtype=np.uint8))
    return buf.getvalue()
