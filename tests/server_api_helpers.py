"""Shared by the HTTP API tests (tests/test_server_api.py, tests/test_server_routing.py): the constants of the
embedded default bundle, request builders (``png_bytes``, ``npy_bytes``, ``quantized``, ``post_file``),
``check_certificate`` (every response field present, typed per the schema and self-consistent), and the module-scoped
fixtures ``fmnist``, ``easy``, ``client`` (the real app through its lifespan, server ``max_samples=2000``) and
``surrogate_cert``, bound by each test module that uses them (each module starts its own app).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from calibration.data import load_fashion_mnist
from server.app import create_app
from server.schemas import Certificate
from server.settings import Settings
from smoothing import radius_from_probability

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
SIGMA = 0.25
ALPHA_CAL = 0.001
MAX_SAMPLES = 2000
COHEN_N0 = 100
EASY = 2  # Fashion-MNIST test image #2: a trouser, the easiest class; the surrogate certifies it at alpha_cal
CERT_KEYS = set(Certificate.model_fields)


# ---------------------------------------------------------------------------------------------------- helpers
def png_bytes(img: np.ndarray, fmt: str = "PNG") -> bytes:
    """(H, W) or (C, H, W) float image in [0, 1] -> PNG/JPEG bytes (8-bit)."""
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(np.round(arr * 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def quantized(img: np.ndarray) -> np.ndarray:
    """The image exactly as an 8-bit PNG carries it (so PNG and array requests see identical pixels)."""
    return (np.round(np.asarray(img) * 255) / 255).astype(np.float32)


def post_file(client, data: bytes, filename: str = "x.png", ctype: str = "image/png", **fields):
    form = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in fields.items()}
    return client.post("/certify", files={"image": (filename, data, ctype)}, data=form)


def check_certificate(body: dict, *, sigma: float = SIGMA, classes=FMNIST_CLASSES) -> Certificate:
    """Every response field is present, typed per the schema and self-consistent."""
    assert set(body) == CERT_KEYS, f"response fields differ from the schema: {sorted(set(body) ^ CERT_KEYS)}"
    cert = Certificate.model_validate(body)
    assert set(body["guarantee"]) >= {"kind", "alpha", "statement"}
    assert set(body["model"]) == {"name", "version", "sha256", "manifest_sha256"}
    assert set(body["timings"]) >= {"decode_ms", "total_ms"}
    assert cert.timings.total_ms >= cert.timings.decode_ms >= 0
    assert cert.request_id
    assert cert.radius >= 0 and math.isfinite(cert.radius)
    assert cert.samples >= 0
    assert cert.certified == (cert.class_index >= 0) == (cert.radius > 0)
    if cert.certified:
        assert 0 <= cert.class_index < len(classes)
        assert cert.class_name == classes[cert.class_index]
        assert cert.p_lower is not None and cert.p_lower > 0.5
        assert cert.radius == pytest.approx(radius_from_probability(cert.p_lower, sigma), rel=1e-9, abs=1e-12)
    else:
        assert cert.class_name is None and cert.radius == 0.0
    if cert.p_lower is not None:
        assert 0.0 <= cert.p_lower <= 1.0
    expected_kind = {"surrogate": "conformal-marginal", "sequential": "anytime-valid", "fixed": "clopper-pearson",
                     "cohen": "clopper-pearson"}
    assert cert.guarantee.kind == expected_kind[cert.method]
    assert 0 < cert.guarantee.alpha < 1 and cert.guarantee.statement
    if cert.method == "surrogate":
        assert cert.samples == 0 and cert.fallback_reason is None
        assert cert.stopped_by == ("certified" if cert.certified else "abstained")
        assert cert.certified or cert.p_lower is None  # below 1/2 the surrogate's bound is not calibrated
    return cert


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fmnist():
    return load_fashion_mnist()


@pytest.fixture(scope="module")
def easy(fmnist) -> np.ndarray:
    """(1, 28, 28) float32 in [0, 1], already 8-bit exact."""
    return quantized(fmnist.x_test[EASY])


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(max_samples=MAX_SAMPLES, cohen_n0=COHEN_N0), seed=0)) as c:
        yield c


@pytest.fixture(scope="module")
def surrogate_cert(client, easy) -> Certificate:
    r = post_file(client, png_bytes(easy))
    assert r.status_code == 200, r.text
    return check_certificate(r.json())
