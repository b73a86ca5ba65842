"""Documentation vs the live service (second review): what README.md and the OpenAPI document promise about error
answers, checked against the real app (embedded bundle, real onnxruntime, real engine), seeded.

Each test says what it guards and that it failed on the code before it.
"""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from calibration.data import load_fashion_mnist
from server.app import create_app
from server.settings import Settings

EASY = 2  # Fashion-MNIST test image #2 (a trouser): the surrogate certifies it at once in plain auto mode


@pytest.fixture(scope="module")
def easy() -> list:
    x = load_fashion_mnist().x_test[EASY]
    return (np.round(np.asarray(x) * 255) / 255).astype(np.float32).tolist()


@pytest.fixture(scope="module")
def small_engine():
    """max_live_jobs=2: a batch of 3 images that all sample can never be admitted."""
    with TestClient(create_app(Settings(max_live_jobs=2, drain_seconds=0), seed=41)) as c:
        yield c


@pytest.mark.parametrize("extra", [{"per_input": True}, {"alpha": 0.0005}], ids=["per_input", "alpha_below_cal"])
def test_an_auto_batch_that_must_sample_every_image_beyond_the_live_job_limit_is_a_422(small_engine, easy, extra):
    """README: a batch of more images than CERTSERVE_MAX_LIVE_JOBS that samples every image is 422 too_many_images
    (no retry can pass it), not 503 queue_full + Retry-After (which CertserveClient retries, then gives up with a
    'retry later'). An auto batch with per_input=true, or with alpha below the bundle's alpha_cal, samples every image
    whatever the surrogate says, exactly as mode=sequential does. Run against the code before this test: 503
    queue_full; this test failed."""
    r = small_engine.post("/certify/batch", json={"images": [easy] * 3, **extra})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "too_many_images" and "CERTSERVE_MAX_LIVE_JOBS = 2" in err["message"]
    assert "retry-after" not in r.headers


def test_a_plain_auto_batch_keeps_its_503_since_the_surrogate_may_answer_its_images(small_engine, easy):
    """The rule above stays narrow: a plain auto batch of the same easy image is answered by the surrogate, every
    image (no job at all), so the limit does not apply to it."""
    r = small_engine.post("/certify/batch", json={"images": [easy] * 3})
    assert r.status_code == 200, r.text
    assert [c["method"] for c in r.json()["results"]] == ["surrogate"] * 3


def test_samples_every_image_is_the_plan_rule():
    """certification.plan.samples_every_image is True exactly where make_plan never routes to the surrogate, whatever
    the surrogate's radius: the 422 above is never given to a batch that a retry could pass."""
    from certification.config import ServiceConfig
    from certification.plan import CertifyParams, make_plan, samples_every_image

    config = ServiceConfig()
    for mode in ("auto", "surrogate", "sequential", "fixed", "cohen"):
        for per_input in (False, True):
            for alpha in (None, 0.0005, 0.001, 0.05):
                for alpha_cal in (None, 0.001):
                    params = CertifyParams(mode=mode, per_input=per_input, alpha=alpha)
                    routes = set()
                    for radius in (0.0, 0.1, 0.5, 2.0):
                        try:
                            routes.add(make_plan(params, config, alpha_cal=alpha_cal,
                                                 surrogate_radius=None if alpha_cal is None else radius,
                                                 sigma=0.25, arrival=0.0).route)
                        except Exception:  # mode=surrogate refused (no surrogate, per_input, alpha below)
                            routes.add("refused")
                    always = samples_every_image(params, config, alpha_cal=alpha_cal)
                    assert always == ("surrogate" not in routes and "refused" not in routes), (params, alpha_cal)


@pytest.mark.parametrize("method, path, code, expected", [
    ("GET", "/certfy", "not_found", ["POST /certify", "POST /certify/batch", "GET /v1/models"]),
    ("GET", "/certify", "method_not_allowed", ["GET /certify", "takes POST"]),
    ("POST", "/readyz", "method_not_allowed", ["takes GET"]),
])
def test_routing_errors_say_what_the_api_expects(small_engine, method, path, code, expected):
    """The brief of the error contract (README "Errors"): every error says what was expected. A wrong path or method
    answered Starlette's bare "Not Found" / "Method Not Allowed". Now the message names the routes, or the method the
    route takes. Run against the code before this test: this test failed (message "Not Found")."""
    r = small_engine.request(method, path)
    err = r.json()["error"]
    assert err["code"] == code and r.headers["x-request-id"] == err["request_id"]
    assert all(e in err["message"] for e in expected), err["message"]
