"""Shared by the malformed-input tests (tests/test_server_input.py, tests/test_server_input_preprocessing.py): the
real app (embedded default bundle, 1x28x28 input) with a small body limit (``MAX_BODY``) as the module-scoped
``client`` fixture (``raise_server_exceptions=False``: a server error shows up as a 500 response), the ``easy`` image,
image builders (``encode``, ``npy``), ``post_file`` and ``assert_error`` (the JSON error envelope, with a message that
says what was expected). Each test module that binds the fixtures starts its own app.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from calibration.data import load_fashion_mnist
from server.app import create_app
from server.settings import Settings

MAX_BODY = 256 * 1024
EASY = 2  # a trouser: the surrogate certifies it


# ---------------------------------------------------------------------------------------------------- builders
def encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if mode is not None and img.mode != mode:
        img = Image.fromarray(arr, mode=mode)
    img.save(buf, format=fmt)
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def client():
    settings = Settings(max_samples=500, max_body_bytes=MAX_BODY)
    with TestClient(create_app(settings, seed=0), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def easy() -> np.ndarray:
    """(28, 28) uint8 trouser."""
    return np.round(load_fashion_mnist().x_test[EASY, 0] * 255).astype(np.uint8)


def assert_error(r, status: int, *fragments: str, code: str | None = None) -> dict:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err.get("code"), str) and err["code"]
    assert isinstance(err.get("message"), str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    for fragment in fragments:
        assert fragment.lower() in err["message"].lower(), f"{fragment!r} not in {err['message']!r}"
    return err


def post_file(client, data: bytes, name: str = "x.png", ctype: str = "image/png", **fields):
    return client.post("/certify", files={"image": (name, data, ctype)}, data={k: str(v) for k, v in fields.items()})
