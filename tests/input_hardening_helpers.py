"""Shared by the input-hardening tests of review B (tests/test_input_hardening.py,
tests/test_input_hardening_images.py): the real app (embedded default bundle, 1x28x28 input) through its lifespan as
the module-scoped ``client`` fixture (``raise_server_exceptions=False``: a server error shows up as a 500 response;
each test module that binds it starts its own app), Pillow-made images (``grey``, ``encode``), ``post_file`` and
``assert_error``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.app import create_app
from server.settings import Settings

SURROGATE = {"mode": "surrogate"}


# ---------------------------------------------------------------------------------------------------- builders
def grey(h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def encode(img: Image.Image | np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format=fmt, **options)
    return buf.getvalue()


def post_file(client, data: bytes, name: str = "x.png", path: str = "/certify", **fields):
    return client.post(path, files={"image": (name, data, "application/octet-stream")},
                       data={k: str(v) for k, v in fields.items()})


def assert_error(r, status: int, code: str, *fragments: str) -> dict:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:300]}"
    err = r.json()["error"]
    assert err["code"] == code, err
    for fragment in fragments:
        assert fragment.lower() in err["message"].lower(), f"{fragment!r} not in {err['message']!r}"
    return err


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(max_samples=500), seed=0), raise_server_exceptions=False) as c:
        yield c
