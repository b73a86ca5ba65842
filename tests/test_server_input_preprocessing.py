"""Opt-in preprocessing of unusual input through the real app: convert (RGB, grey+alpha -> 1 channel) and resize
(any size -> 28x28) are applied only when asked for and echoed in ``preprocessing``, certify like the grey 28x28
image they stand for; a 16-bit greyscale PNG keeps its grey levels; an image with no pixels is refused even with
resize. Malformed input and size limits are in tests/test_server_input.py.

The app is the real one (embedded default bundle, 1x28x28 input, small body limit; tests/server_input_helpers.py).
``raise_server_exceptions=False``: a server error shows up as a 500 response, not as an exception.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image

from calibration.data import load_fashion_mnist
from tests import server_input_helpers
from tests.server_input_helpers import assert_error, encode, npy, post_file

# the fixtures (module-scoped: this module's own app)
client = server_input_helpers.client
easy = server_input_helpers.easy


# -------------------------------------------------------------------------------------------- opt-in preprocessing
def test_rgb_with_convert_is_accepted_and_echoed(client, easy):
    rgb = np.stack([easy] * 3, axis=-1)
    r = post_file(client, encode(rgb), convert="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["preprocessing"] == ["converted 3->1 channels"]
    grey = client.post("/certify", files={"image": ("g.png", encode(easy), "image/png")}).json()
    assert grey["preprocessing"] == []
    assert body["class_index"] == grey["class_index"] == 1
    assert body["radius"] == pytest.approx(grey["radius"], rel=1e-4)  # grey RGB converts back to the same pixels


def test_wrong_size_with_resize_is_accepted_and_echoed(client, easy):
    big = np.asarray(Image.fromarray(easy).resize((56, 56), Image.BILINEAR))
    r = post_file(client, encode(big), resize="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["preprocessing"] == ["resized 56x56->28x28"]
    assert body["class_index"] == 1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_wrong_size_without_resize_is_refused_before_decoding(client, easy, monkeypatch, fmt):
    """A PNG or JPEG of another height x width than the model's, without resize=true, is refused from its header:
    422 naming both sizes, and Pillow decodes nothing (a 4096x4096 image was decoded, 50 MB of pixels and 200 MB of
    floats, only to be refused). Checked against the code before (2026-12-06): Image.load ran, this test failed."""
    big = encode(np.asarray(Image.fromarray(easy).resize((56, 40), Image.BILINEAR)), fmt)
    loads = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda im: (loads.append(im.size), real_load(im))[1])
    r = post_file(client, big)
    assert_error(r, 422, "40x56 (HxW)", "expects 28x28", "resize=true", code="bad_image")
    assert loads == []


def test_convert_and_resize_together(client, easy):
    rgb = np.stack([np.asarray(Image.fromarray(easy).resize((40, 32)))] * 3, axis=-1)
    r = client.post("/certify", json={"image": base64.b64encode(encode(rgb)).decode(), "convert": True,
                                      "resize": True})
    assert r.status_code == 200, r.text
    assert r.json()["preprocessing"] == ["converted 3->1 channels", "resized 32x40->28x28"]


def test_grey_alpha_png_is_accepted(client, easy):
    la = np.stack([easy, np.full_like(easy, 255)], axis=-1)
    r = post_file(client, encode(la, mode="LA"))
    assert r.status_code == 200, r.text
    assert r.json()["class_index"] == 1


def test_sixteen_bit_png_keeps_its_grey_levels(client):
    """A 16-bit greyscale PNG of a picture must certify exactly like the 8-bit PNG of the same grey levels (values
    scaled by 65535, not clipped at 255). Compared on the deterministic surrogate path, on images whose surrogate
    output is sensitive to the pixel values (a shirt, uniform mid-grey)."""
    x = load_fashion_mnist().x_test
    pictures = {"shirt": np.round(x[4, 0] * 255).astype(np.uint8), "grey128": np.full((28, 28), 128, np.uint8)}
    for name, eight_bit in pictures.items():
        want = post_file(client, encode(eight_bit), mode="surrogate").json()
        r = post_file(client, encode(eight_bit.astype(np.uint16) * 257, mode="I;16"), mode="surrogate")
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["class_index"], got["certified"]) == (want["class_index"], want["certified"]), name
        assert got["p_lower"] == pytest.approx(want["p_lower"], abs=1e-3), name


def test_empty_image_is_refused_even_with_resize(client):
    """An image with no pixels cannot be resized into an input: 422, not a certificate of an invented image."""
    for image in ([[]], [[[]]]):
        assert_error(client.post("/certify", json={"image": image, "resize": True}), 422)
    assert_error(post_file(client, npy(np.zeros((0, 0), np.uint8)), "x.npy", resize="true"), 422)
