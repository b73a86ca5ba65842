"""The HTTP API through the real app and its lifespan: endpoints, request encodings, the response contract, the batch
endpoint and a base-only (bring-your-own-model) bundle. (All four modes and the router's decisions are in
tests/test_server_routing.py; the shared helpers and fixtures in tests/server_api_helpers.py.)

Everything is real: the embedded default bundle (Fashion-MNIST, sigma 0.25, surrogate + meta prior, alpha_cal
0.001), real onnxruntime sessions, the real sequential engine started by the lifespan, real Fashion-MNIST test
images. ``TestClient`` (httpx) runs the lifespan. Budgets are small (server ``max_samples=2000``) so that the module
runs in seconds on a 2-core CPU.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.bundle import DEFAULT_BUNDLE_DIR, create_bundle, load_bundle, sha256_file
from server.app import create_app
from server.schemas import ModelCard
from server.settings import Settings
from tests import server_api_helpers
from tests.server_api_helpers import (ALPHA_CAL, COHEN_N0, EASY, FMNIST_CLASSES, MAX_SAMPLES, SIGMA, check_certificate,
                                      npy_bytes, png_bytes, post_file, quantized)
from tests.worker_helpers import SlowModel

# the fixtures (module-scoped: this module's own app)
fmnist = server_api_helpers.fmnist
easy = server_api_helpers.easy
client = server_api_helpers.client
surrogate_cert = server_api_helpers.surrogate_cert


# ---------------------------------------------------------------------------------------------------- endpoints
def test_healthz_and_readyz_after_start(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_models_card_describes_the_served_bundle(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    cards = r.json()
    assert isinstance(cards, list) and len(cards) == 1
    card = ModelCard.model_validate(cards[0])
    manifest = load_bundle(DEFAULT_BUNDLE_DIR, check_models=False).manifest
    assert card.name == manifest.name == "fmnist-sigma0.25"
    assert card.sigma == SIGMA
    assert card.alpha_cal == ALPHA_CAL and card.calibrated_levels == [0.1, 0.05, 0.01, 0.005, 0.001]
    assert card.classes == FMNIST_CLASSES
    assert tuple(card.input_shape) == (1, 28, 28)
    assert card.has_surrogate and card.has_meta_prior
    assert card.manifest_sha256 == sha256_file(DEFAULT_BUNDLE_DIR / "manifest.json")
    cert = client.post("/certify", json={"image": np.zeros((28, 28)).tolist(), "mode": "surrogate"}).json()
    assert cert["model"]["manifest_sha256"] == card.manifest_sha256  # every certificate names the manifest
    assert card.default_alpha == 0.001 and card.max_samples == MAX_SAMPLES
    assert card.sha256 == sha256_file(DEFAULT_BUNDLE_DIR / "base.onnx")


def test_metrics_endpoint_exposes_certserve_series(client, surrogate_cert):
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("certserve_requests_total", "certserve_request_duration_seconds_bucket", "certserve_ready 1.0",
                 "certserve_samples_processed_total", "certserve_worker_batch_size_bucket"):
        assert name in text, f"{name} missing from /metrics"


def test_unknown_route_is_404(client):
    assert client.get("/v2/nothing").status_code == 404


def test_openapi_documents_the_certify_contract(client):
    spec = client.get("/openapi.json").json()
    assert "/certify" in spec["paths"] and "/certify/batch" in spec["paths"]
    content = spec["paths"]["/certify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert "Certificate" in spec["components"]["schemas"]


# ---------------------------------------------------------------------------------------------------- encodings
def test_multipart_png(client, easy, surrogate_cert):
    assert surrogate_cert.method == "surrogate"
    assert surrogate_cert.class_index == 1 and surrogate_cert.class_name == "Trouser"


def test_multipart_jpeg(client, easy):
    r = post_file(client, png_bytes(easy, "JPEG"), "x.jpg", "image/jpeg")
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.method == "surrogate" and cert.class_index == 1


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
def test_multipart_npy_gives_the_same_certificate_as_png(client, easy, surrogate_cert, dtype):
    """The surrogate path is deterministic: identical pixels through .npy and PNG give the identical certificate."""
    arr = np.round(easy[0] * 255).astype(np.uint8) if dtype == "uint8" else easy[0].astype(dtype)
    r = post_file(client, npy_bytes(arr), "x.npy", "application/octet-stream")
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert (cert.class_index, cert.method) == (surrogate_cert.class_index, "surrogate")
    assert cert.radius == pytest.approx(surrogate_cert.radius, rel=1e-6)


def test_npy_in_hwc_layout_is_accepted(client, easy, surrogate_cert):
    r = post_file(client, npy_bytes(np.transpose(easy, (1, 2, 0))), "x.npy", "application/octet-stream")
    assert r.status_code == 200, r.text
    assert r.json()["radius"] == pytest.approx(surrogate_cert.radius, rel=1e-6)


def test_json_base64_png(client, easy, surrogate_cert):
    b64 = base64.b64encode(png_bytes(easy)).decode()
    for image in (b64, "data:image/png;base64," + b64):
        r = client.post("/certify", json={"image": image})
        assert r.status_code == 200, r.text
        cert = check_certificate(r.json())
        assert cert.radius == pytest.approx(surrogate_cert.radius, rel=1e-6)


@pytest.mark.parametrize("layout", ["HW", "CHW"])
def test_json_nested_array(client, easy, surrogate_cert, layout):
    image = easy[0].tolist() if layout == "HW" else easy.tolist()
    r = client.post("/certify", json={"image": image})
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.class_index == surrogate_cert.class_index
    assert cert.radius == pytest.approx(surrogate_cert.radius, rel=1e-6)


def test_json_with_charset_content_type(client, easy):
    body = json.dumps({"image": easy.tolist()}).encode()
    r = client.post("/certify", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_form_fields_are_parsed_like_json(client, easy):
    """Multipart strings ('true', '0.0005', '300') are parsed into the same typed parameters as JSON."""
    r = post_file(client, png_bytes(easy), mode="sequential", alpha="0.0005", max_samples="300", per_input="true")
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.method == "sequential" and cert.guarantee.alpha == 0.0005 and cert.samples <= 300
    assert cert.fallback_reason is None  # mode=sequential was asked for: not a fallback


def test_request_id_header_is_echoed(client, easy):
    r = client.post("/certify", json={"image": easy.tolist()}, headers={"X-Request-ID": "req-abc-123"})
    assert r.status_code == 200
    assert r.json()["request_id"] == "req-abc-123" == r.headers["x-request-id"]
    r = client.post("/certify", json={"image": easy.tolist()})
    assert r.json()["request_id"] == r.headers["x-request-id"] != "req-abc-123"


def test_model_identity_in_every_certificate(client, surrogate_cert):
    card = client.get("/v1/models").json()[0]
    assert surrogate_cert.model.model_dump() == {"name": card["name"], "version": card["version"],
                                                 "sha256": card["sha256"], "manifest_sha256": card["manifest_sha256"]}


# ---------------------------------------------------------------------------------------------------- batch
def test_batch_json_list(client, fmnist):
    imgs = [quantized(fmnist.x_test[i]) for i in (EASY, 0, 1)]
    images = [base64.b64encode(png_bytes(imgs[0])).decode(), imgs[1].tolist(), imgs[2][0].tolist()]
    r = client.post("/certify/batch", json={"images": images, "mode": "surrogate"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    certs = [check_certificate(res) for res in results]
    assert certs[0].class_index == 1  # order preserved: the trouser first
    # each agrees with the single-image endpoint (surrogate path: deterministic)
    for img, cert in zip(imgs, certs):
        single = check_certificate(client.post("/certify", json={"image": img.tolist(), "mode": "surrogate"}).json())
        assert (single.class_index, single.method) == (cert.class_index, cert.method)
        assert single.radius == pytest.approx(cert.radius, rel=1e-9)
    assert len({c.request_id for c in certs}) == 1  # one request, one id


def test_batch_multipart_repeated_images_with_shared_params(client, fmnist):
    files = [("images", (f"{i}.png", png_bytes(fmnist.x_test[i]), "image/png")) for i in (EASY, 3, 5)]
    r = client.post("/certify/batch", files=files, data={"mode": "sequential", "alpha": "0.01", "max_samples": "400"})
    assert r.status_code == 200, r.text
    certs = [check_certificate(res) for res in r.json()["results"]]
    assert len(certs) == 3
    for cert in certs:
        assert cert.method == "sequential" and cert.guarantee.alpha == 0.01 and cert.samples <= 400
    assert certs[0].class_index == 1


def test_batch_cohen_runs_jobs_together(client, fmnist):
    r = client.post("/certify/batch", json={"images": [fmnist.x_test[i].tolist() for i in range(4)],
                                            "mode": "cohen", "max_samples": 200})
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        cert = check_certificate(res)
        assert cert.method == "cohen" and cert.samples == COHEN_N0 + 200


def test_batch_with_one_bad_image_is_rejected_as_a_whole(client, fmnist):
    """...before any of its jobs starts: every image is decoded first. Before 2026-12-05 the good images' jobs were
    submitted, then dropped once the 422 had gone out, and counted as cancelled requests; this test failed."""
    engine = client.app.state.service.engine
    samples, batches = engine.samples_processed, engine.batches
    r = client.post("/certify/batch", json={"images": [fmnist.x_test[0].tolist(), fmnist.x_test[1].tolist(),
                                                       [[2.0]]], "mode": "sequential"})
    assert r.status_code == 422
    assert "[0, 1]" in r.json()["error"]["message"]
    assert r.json()["error"]["message"].startswith("image 3 of 3: ")  # which image (before 2026-12-06: not said)
    assert engine.live_jobs == 0 and (engine.samples_processed, engine.batches) == (samples, batches)


def test_batch_too_many_images(client, easy):
    b64 = base64.b64encode(png_bytes(easy)).decode()
    r = client.post("/certify/batch", json={"images": [b64] * 65})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "too_many_images" and "64" in err["message"]


@pytest.mark.parametrize("encoding, count", [("files", 257), ("text", 129), ("urlencoded", 129)])
def test_batch_too_many_form_parts_is_too_many_images(client, easy, encoding, count):
    """A form batch beyond the form parser's own limits on parts (256 files, 64 + 64 fields at the default 64 images)
    is 422 too_many_images naming the limit, as the README says of any batch beyond CERTSERVE_MAX_BATCH_IMAGES.
    Run against the code before this test: failed (422 bad_multipart "Too many files/fields ...")."""
    data = png_bytes(easy)
    b64 = base64.b64encode(data).decode()
    if encoding == "files":
        r = client.post("/certify/batch", files=[("images", ("x.png", data, "image/png"))] * count)
    elif encoding == "text":
        r = client.post("/certify/batch", files=[("images", (None, b64))] * count)
    else:
        body = "&".join(["images=" + b64.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")] * count)
        r = client.post("/certify/batch", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "too_many_images" and "at most 64 images" in err["message"]


def test_batch_empty_list_and_missing_field(client):
    r = client.post("/certify/batch", json={"images": []})
    assert r.status_code == 422 and "images" in r.json()["error"]["message"]
    r = client.post("/certify/batch", files={"image": ("x.png", b"\x89PNG", "image/png")})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "missing_image" and "'images'" in err["message"]


# ---------------------------------------------------------------------------------------------------- base-only bundle
@pytest.fixture(scope="module")
def base_only_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("byom") / "fmnist-base-only"
    create_bundle(root, base=DEFAULT_BUNDLE_DIR / "base.onnx", sigma=SIGMA, input_shape=(1, 28, 28),
                  classes=FMNIST_CLASSES, name="fmnist-base-only")
    return root


@pytest.fixture(scope="module")
def base_only_client(base_only_bundle):
    with TestClient(create_app(Settings(bundle=str(base_only_bundle), max_samples=MAX_SAMPLES), seed=1)) as c:
        yield c


def test_base_only_bundle_card(base_only_client):
    card = base_only_client.get("/v1/models").json()[0]
    assert card["name"] == "fmnist-base-only"
    assert card["has_surrogate"] is False and card["has_meta_prior"] is False and card["alpha_cal"] is None
    assert card["sha256"] == sha256_file(DEFAULT_BUNDLE_DIR / "base.onnx")


def test_base_only_bundle_auto_goes_sequential(base_only_client, easy):
    r = post_file(base_only_client, png_bytes(easy))
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.method == "sequential" and cert.fallback_reason == "no_surrogate"
    assert cert.guarantee.kind == "anytime-valid" and cert.guarantee.alpha == 0.001
    assert cert.certified and cert.class_index == 1  # tested class = the base model's clean arg-max
    assert cert.model.name == "fmnist-base-only"
    assert cert.timings.surrogate_ms is None


@pytest.mark.parametrize("params", [{}, {"per_input": True}])
def test_base_only_bundle_auto_runs_the_per_input_lambda(base_only_client, easy, params):
    """Auto's fallback on a bundle without surrogate is the per-input path: no proposal, but its latency-oriented
    lambda (PER_INPUT_MIN_GAIN) on auto's budget. Run against the service tying the lambda to the proposal
    (``min_gain=PER_INPUT_MIN_GAIN if plan.proposal``, before 2026-12-05): min_gain was None (5e-5), both failed."""
    from certification.plan import CertifyParams, make_plan
    from smoothing import PER_INPUT_MIN_GAIN

    service = base_only_client.app.state.service
    p = CertifyParams(**params)
    plan = make_plan(p, service.config, alpha_cal=None, surrogate_radius=None, sigma=SIGMA, arrival=0.0)
    spec = service._job_spec(easy, plan, None, None)
    assert (spec.kind, spec.proposal_radius, spec.target_radius) == ("sequential", None, None)
    assert spec.min_gain == PER_INPUT_MIN_GAIN and spec.budget == plan.budget == MAX_SAMPLES  # auto budget, capped


def test_base_only_bundle_refuses_surrogate_mode(base_only_client, easy):
    r = base_only_client.post("/certify", json={"image": easy.tolist(), "mode": "surrogate"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "no_surrogate" and "sequential" in err["message"]


def test_base_only_bundle_serves_cohen(base_only_client, easy):
    r = base_only_client.post("/certify", json={"image": easy.tolist(), "mode": "cohen", "max_samples": 300})
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.method == "cohen" and cert.samples == 100 + 300 and cert.class_index == 1


def test_http_deadline_returns_the_anytime_bound_at_the_counts_reached(base_only_bundle, easy):
    """A request deadline answers with the confidence-sequence bound at the samples counted so far. A base-only
    bundle uses the KT prior (a = b = 1/2), so p_lower can be checked exactly: it is lower_bound(S, samples) for an
    integer S."""
    from smoothing import lower_bound

    settings = Settings(bundle=str(base_only_bundle), max_samples=10**7, drain_seconds=0)
    with TestClient(create_app(settings, seed=3)) as c:
        sampler = c.app.state.service.engine.sampler
        sampler.backend, sampler.batch_size = SlowModel(sampler.backend), 64  # the deadline comes first
        r = c.post("/certify", json={"image": easy.tolist(), "mode": "sequential", "alpha": 0.001,
                                     "max_samples": 10**7, "deadline_ms": 700})
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.stopped_by == "deadline" and 0 < cert.samples < 10**7
    assert 0.5 < cert.timings.total_ms / 1e3 < 30
    n = cert.samples
    candidates = lower_bound(np.arange(n + 1), n, 0.001, 0.5, 0.5)
    s = int(np.argmin(np.abs(candidates - cert.p_lower)))
    assert cert.p_lower == pytest.approx(lower_bound(s, n, 0.001, 0.5, 0.5), rel=1e-12)
    assert s > 0.95 * n and cert.class_index == 1
