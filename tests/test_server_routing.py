"""The HTTP API's modes and routing through the real app and its lifespan: all four modes (surrogate, sequential,
fixed, Cohen) and the router's decisions (surrogate vs sequential vs Cohen, with the reason of every fallback: alpha
below alpha_cal, per-input requested, a target radius above the surrogate's, a weak surrogate certificate), the risk
ladder of calibrated levels, budgets and deadlines. (Endpoints, encodings and the batch endpoint are in
tests/test_server_api.py; the shared helpers and fixtures in tests/server_api_helpers.py.)

Everything is real: the embedded default bundle (Fashion-MNIST, sigma 0.25, surrogate + meta prior, alpha_cal
0.001), real onnxruntime sessions, the real sequential engine started by the lifespan, real Fashion-MNIST test
images. ``TestClient`` (httpx) runs the lifespan. Budgets are small (server ``max_samples=2000``) so that the module
runs in seconds on a 2-core CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from server.schemas import Certificate
from tests import server_api_helpers
from tests.server_api_helpers import (ALPHA_CAL, COHEN_N0, MAX_SAMPLES, SIGMA, check_certificate, png_bytes,
                                      post_file, quantized)

# the fixtures (module-scoped: this module's own app)
fmnist = server_api_helpers.fmnist
easy = server_api_helpers.easy
client = server_api_helpers.client
surrogate_cert = server_api_helpers.surrogate_cert


@pytest.fixture(scope="module")
def medium(client, fmnist) -> tuple[np.ndarray, Certificate]:
    """The first test image (of 200) that the surrogate certifies, for its true class, with a radius in (0.15, 0.4): a
    target a little above it is out of the surrogate's reach but (for a correct class) within the engine's."""
    for i in range(200):
        img = quantized(fmnist.x_test[i])
        cert = check_certificate(client.post("/certify", json={"image": img.tolist(), "mode": "surrogate"}).json())
        if cert.class_index == fmnist.y_test[i] and 0.15 < cert.radius < 0.4:
            return img, cert
    pytest.fail("no test image among the first 200 has a surrogate radius in (0.15, 0.4)")


def test_surrogate_abstention_reports_no_probability_bound(client, fmnist):
    """A surrogate abstention carries p_lower null: its labels are clipped at Phi^-1 = 0, so nothing below 1/2 was
    calibrated. Run against the service reporting the uncalibrated value (before 2026-12-05): test image 12 gave
    p_lower 0.22 with class -1; this test failed."""
    for i in range(50):
        body = client.post("/certify", json={"image": quantized(fmnist.x_test[i]).tolist(), "mode": "surrogate"}).json()
        cert = check_certificate(body)
        if not cert.certified:
            assert body["p_lower"] is None and cert.radius == 0.0 and cert.class_index == -1
            return
    pytest.fail("the surrogate certified all of the first 50 test images")


# ---------------------------------------------------------------------------------------------------- modes & routing
def test_auto_default_alpha_is_served_by_the_surrogate(surrogate_cert):
    c = surrogate_cert
    assert c.method == "surrogate" and c.certified and c.radius > 0
    assert c.guarantee.kind == "conformal-marginal" and c.guarantee.alpha == ALPHA_CAL
    assert c.samples == 0 and c.fallback_reason is None and c.stopped_by == "certified"
    assert c.timings.surrogate_ms is not None and c.timings.sampling_ms is None


def test_mode_surrogate_at_alpha_cal(client, easy, surrogate_cert):
    r = client.post("/certify", json={"image": easy.tolist(), "mode": "surrogate", "alpha": ALPHA_CAL})
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.method == "surrogate" and cert.radius == pytest.approx(surrogate_cert.radius, rel=1e-9)


@pytest.mark.parametrize("alpha, level", [(0.05, 0.05), (0.02, 0.01), (0.002, 0.001), (0.3, 0.1)])
def test_a_looser_alpha_uses_the_largest_calibrated_level_below_it(client, easy, alpha, level):
    """The risk ladder: the certificate reports the level it used (<= the request's alpha), and a looser level
    never certifies less than a tighter one for the same image."""
    cert = check_certificate(client.post("/certify", json={"image": easy.tolist(), "alpha": alpha}).json())
    tight = check_certificate(client.post("/certify", json={"image": easy.tolist(), "alpha": ALPHA_CAL}).json())
    assert cert.method == "surrogate" and cert.guarantee.alpha == level <= alpha
    assert cert.radius >= tight.radius and cert.class_index == tight.class_index


def test_alpha_below_alpha_cal_falls_back_to_sequential(client, easy):
    r = client.post("/certify", json={"image": easy.tolist(), "alpha": 0.0005})
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.method == "sequential" and cert.fallback_reason == "alpha_below_alpha_cal"
    assert cert.guarantee.kind == "anytime-valid" and cert.guarantee.alpha == 0.0005
    assert 0 < cert.samples <= MAX_SAMPLES
    assert cert.certified and cert.class_index == 1  # an easy image certifies on the sequential path too
    assert cert.stopped_by in {"certified", "budget"}
    assert cert.timings.sampling_ms is not None and cert.timings.queue_ms is not None


def test_per_input_falls_back_to_sequential(client, easy):
    r = post_file(client, png_bytes(easy), per_input=True)
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.method == "sequential" and cert.fallback_reason == "per_input_requested"
    assert cert.guarantee.kind == "anytime-valid" and cert.guarantee.alpha == 0.001
    assert cert.stopped_by in {"target", "certified", "futility", "budget"}  # target: the surrogate's proposal


def test_target_radius_above_surrogate_radius_goes_sequential(client, medium):
    image, sur = medium
    target = round(sur.radius + 0.05, 3)  # out of the surrogate's reach, in the engine's
    r = client.post("/certify", json={"image": image.tolist(), "target_radius": target})
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.method == "sequential" and cert.fallback_reason == "below_target_radius"
    assert cert.stopped_by in {"target", "futility", "budget"}
    assert cert.stopped_by == "target", f"a reachable target ({target}) was not certified: {cert}"
    assert cert.radius >= target and cert.class_index == sur.class_index
    assert cert.samples < MAX_SAMPLES  # the target policy stops as soon as the target is certified


def test_auto_sends_a_weak_surrogate_certificate_to_the_per_input_path(client, medium):
    """auto without a target: a surrogate radius below auto_min_surrogate_z sigmas (default 1.6 x 0.25 = 0.4; the
    ``medium`` image's is in (0.15, 0.4)) goes to the per-input path, which certifies it anytime-validly; the
    surrogate's own certificate is what mode=surrogate still answers."""
    image, sur = medium
    r = client.post("/certify", json={"image": image.tolist()})
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert (cert.method, cert.fallback_reason) == ("sequential", "below_auto_min_radius")
    assert cert.guarantee.kind == "anytime-valid" and cert.guarantee.alpha == 0.001
    assert 0 < cert.samples <= 4000 and cert.class_index == sur.class_index


def test_target_radius_below_surrogate_radius_stays_on_the_surrogate(client, easy, surrogate_cert):
    r = client.post("/certify", json={"image": easy.tolist(), "target_radius": surrogate_cert.radius / 2})
    cert = check_certificate(r.json())
    assert cert.method == "surrogate" and cert.radius >= surrogate_cert.radius / 2


def test_mode_surrogate_below_alpha_cal_is_refused(client, easy):
    r = client.post("/certify", json={"image": easy.tolist(), "mode": "surrogate", "alpha": 0.0001})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "alpha_below_alpha_cal" and "alpha_cal" in err["message"]


def test_mode_surrogate_with_per_input_is_refused(client, easy):
    r = client.post("/certify", json={"image": easy.tolist(), "mode": "surrogate", "per_input": True})
    assert r.status_code == 422
    assert "per input" in r.json()["error"]["message"]


def test_mode_sequential(client, easy):
    r = client.post("/certify", json={"image": easy.tolist(), "mode": "sequential", "max_samples": 500})
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.method == "sequential" and cert.guarantee.kind == "anytime-valid"
    assert 0 < cert.samples <= 500 and cert.fallback_reason is None
    assert cert.stopped_by in {"certified", "budget", "futility"}


def test_mode_fixed_spends_the_planned_n_and_reports_its_clopper_pearson_bound(client, easy):
    """mode=fixed: n planned from the clean image's prior alone, class from the clean image, one CP bound on the n
    samples (p_lower is exactly clopper_pearson_lower(S, n) for an integer S), stopped_by 'planned' (it drew the n
    it planned; before 2026-12-05 it said 'budget', which reads as 'ran out of samples')."""
    from models.priors import class_and_prior
    from smoothing import clopper_pearson_lower, planned_sample_size

    service = client.app.state.service
    tested, prior = class_and_prior(service.base, service.surrogate, service.meta, easy[None])
    n = int(planned_sample_size(prior[0, 0], prior[0, 1], sigma=SIGMA, alpha=0.001, budget=MAX_SAMPLES))
    r = client.post("/certify", json={"image": easy.tolist(), "mode": "fixed"})
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.method == "fixed" and cert.guarantee.kind == "clopper-pearson" and cert.guarantee.alpha == 0.001
    assert cert.samples == n and cert.stopped_by == "planned" and cert.class_index == int(tested[0]) == 1
    s = np.arange(n + 1)
    k = int(np.argmin(np.abs(clopper_pearson_lower(s, n, 0.001) - cert.p_lower)))
    assert cert.p_lower == clopper_pearson_lower(k, n, 0.001)
    assert client.post("/certify", json={"image": easy.tolist(), "mode": "fixed", "target_radius": 0.2}
                       ).json()["error"]["code"] == "bad_request"


def test_planning_a_fixed_job_leaves_the_event_loop_free(client, easy, monkeypatch):
    """mode=fixed plans n (tens of ms of expected-radius tables) off the event loop: a coroutine that wakes up after
    50 ms runs while a planning call that takes 0.5 s is in progress. Run against the service planning on the loop
    (before 2026-12-05): the tick came after the fixed certificate."""
    import asyncio
    import time

    import certification.service as service_module
    from certification.plan import CertifyParams

    planned = service_module.planned_sample_size

    def slow_plan(*args, **kwargs):
        time.sleep(0.5)
        return planned(*args, **kwargs)

    monkeypatch.setattr(service_module, "planned_sample_size", slow_plan)
    service, order = client.app.state.service, []

    async def fixed():
        await service._certify(easy, CertifyParams(mode="fixed", max_samples=200), request_id="loop-free")
        order.append("fixed")

    async def tick():
        await asyncio.sleep(0.05)
        order.append("tick")

    async def both():
        await asyncio.gather(fixed(), tick())

    asyncio.run(both())
    assert order == ["tick", "fixed"]


@pytest.mark.parametrize("budget", [300, None])
def test_mode_cohen_spends_n0_plus_budget(client, easy, budget):
    payload = {"image": easy.tolist(), "mode": "cohen"} | ({"max_samples": budget} if budget else {})
    r = client.post("/certify", json=payload)
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.method == "cohen" and cert.guarantee.kind == "clopper-pearson" and cert.guarantee.alpha == 0.001
    assert cert.samples == COHEN_N0 + (budget or MAX_SAMPLES)
    assert cert.stopped_by == "budget" and cert.fallback_reason is None
    assert cert.certified and cert.class_index == 1
    assert cert.timings.surrogate_ms is None  # Cohen never looks at the surrogate


def test_requested_budget_is_capped_by_the_server(client, easy):
    r = client.post("/certify", json={"image": easy.tolist(), "mode": "cohen", "max_samples": 10 * MAX_SAMPLES})
    assert r.status_code == 200
    assert r.json()["samples"] == COHEN_N0 + MAX_SAMPLES


def test_short_deadline_returns_a_valid_answer(client, easy):
    r = client.post("/certify", json={"image": easy.tolist(), "mode": "sequential", "deadline_ms": 1,
                                      "max_samples": MAX_SAMPLES})
    assert r.status_code == 200, r.text
    cert = check_certificate(r.json())
    assert cert.stopped_by in {"deadline", "certified"}
    assert cert.samples <= MAX_SAMPLES
