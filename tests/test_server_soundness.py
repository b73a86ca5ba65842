"""End-to-end soundness on a model whose smoothed classifier is known in closed form.

The base model is linear and binary on a 1x4x4 input: logits = [0, w.x + b], exported to ONNX with
:func:`models.export.export_onnx` and bundled (base only) with :func:`models.bundle.create_bundle`. Under Gaussian
noise e ~ N(0, sigma^2 I), w.(x+e) + b ~ N(m, sigma^2 ||w||^2) with m = w.x + b, so the smoothed classifier predicts
sign(m) with pA = Phi(|m| / (sigma ||w||)) and its exact certified radius is sigma Phi^-1(pA) = |m| / ||w||.

Requests go through the real HTTP app (sequential, sequential with a target radius, Cohen) at alpha = 0.1, so that an
unsound bound would show up as a visible violation rate. A violation: certified with the wrong class, or a radius
above the exact one. Bound: rate <= alpha + 3 binomial standard errors over >= 100 requests per method. Certificates
must also be useful: most inputs with a clear margin certify, at a good fraction of the exact radius.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from scipy.stats import norm

from models.bundle import create_bundle
from models.export import export_onnx
from server.app import create_app
from server.settings import Settings

SIGMA = 0.25
ALPHA = 0.1
N_INPUTS = 150
BUDGET = 2000
COHEN_N0 = 100
CLASSES = ["neg", "pos"]


class LinearBinary(torch.nn.Module):
    def __init__(self, w: np.ndarray, b: float):
        super().__init__()
        self.linear = torch.nn.Linear(16, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(np.stack([np.zeros(16), w]), dtype=torch.float32))
            self.linear.bias.copy_(torch.tensor([0.0, b], dtype=torch.float32))

    def forward(self, x):
        return self.linear(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    rng = np.random.default_rng(2024)
    w = rng.normal(size=16).astype(np.float32)
    b = np.float32(-w.sum() / 2)  # the decision boundary passes through the grey image x = 0.5
    root = tmp_path_factory.mktemp("linear")
    onnx_path = export_onnx(LinearBinary(w, float(b)), torch.zeros(1, 1, 4, 4), root / "linear.onnx")
    bundle = create_bundle(root / "bundle", base=onnx_path, sigma=SIGMA, input_shape=(1, 4, 4), classes=CLASSES,
                           name="linear-binary")
    return {"w": w.astype(np.float64), "b": float(b), "bundle": bundle}


@pytest.fixture(scope="module")
def client(model):
    settings = Settings(bundle=str(model["bundle"].root), max_samples=BUDGET, cohen_n0=COHEN_N0)
    with TestClient(create_app(settings, seed=7)) as c:
        yield c


@pytest.fixture(scope="module")
def inputs(model):
    """N_INPUTS random images in [0, 1]^16 (float32), their true class and exact smoothed radius."""
    rng = np.random.default_rng(99)
    x = rng.random((N_INPUTS, 1, 4, 4), dtype=np.float32)
    margin = x.reshape(N_INPUTS, 16).astype(np.float64) @ model["w"] + model["b"]
    norm_w = float(np.linalg.norm(model["w"]))
    return {"x": x, "cls": (margin > 0).astype(int), "radius": np.abs(margin) / norm_w,
            "pA": norm.cdf(np.abs(margin) / (SIGMA * norm_w))}


def certify_all(client, x: np.ndarray, **params) -> list[dict]:
    out = []
    for start in range(0, len(x), 50):
        r = client.post("/certify/batch", json={"images": [img.tolist() for img in x[start:start + 50]], **params})
        assert r.status_code == 200, r.text
        out.extend(r.json()["results"])
    assert len(out) == len(x)
    return out


def violations(results: list[dict], inputs: dict) -> np.ndarray:
    bad = []
    for res, cls, radius in zip(results, inputs["cls"], inputs["radius"]):
        wrong_class = res["certified"] and res["class_index"] != cls
        too_big = res["certified"] and res["radius"] > radius
        bad.append(wrong_class or too_big)
    return np.array(bad)


def assert_sound(results: list[dict], inputs: dict, what: str) -> None:
    n = len(results)
    rate = float(violations(results, inputs).mean())
    limit = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / n)
    assert n >= 100
    assert rate <= limit, f"{what}: violation rate {rate:.3f} > alpha + 3 SE = {limit:.3f} over {n} requests"


def assert_useful(results: list[dict], inputs: dict, what: str, *, min_ratio: float) -> None:
    """Inputs with a clear margin (pA >= 0.9) nearly all certify, and the radius is a good part of the exact one."""
    clear = inputs["pA"] >= 0.9
    assert clear.sum() >= 30, "the input distribution has too few clear-margin inputs to judge usefulness"
    certified = np.array([r["certified"] for r in results])
    assert certified[clear].mean() >= 0.9, f"{what}: only {certified[clear].mean():.2f} of clear inputs certify"
    ratios = np.array([r["radius"] for r in results])[clear] / inputs["radius"][clear]
    assert float(np.mean(ratios)) >= min_ratio, f"{what}: mean radius / exact radius = {np.mean(ratios):.3f}"


def test_model_card_of_the_linear_bundle(client):
    card = client.get("/v1/models").json()[0]
    assert card["name"] == "linear-binary" and card["classes"] == CLASSES and card["input_shape"] == [1, 4, 4]
    assert card["sigma"] == SIGMA and card["has_surrogate"] is False


def test_exported_model_is_the_linear_function(model, inputs):
    """The served ONNX computes exactly w.x + b (so the closed-form radius is the truth for the served model)."""
    logits = model["bundle"].backend("base", threads=1, device="cpu").forward(inputs["x"])
    margin = inputs["x"].reshape(len(logits), 16).astype(np.float64) @ model["w"] + model["b"]
    np.testing.assert_allclose(logits[:, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(logits[:, 1], margin, atol=1e-5)


def test_sequential_certificates_are_sound(client, inputs):
    results = certify_all(client, inputs["x"], mode="sequential", alpha=ALPHA)
    for res in results:
        assert res["method"] == "sequential" and res["guarantee"] == {**res["guarantee"], "kind": "anytime-valid",
                                                                       "alpha": ALPHA}
        assert res["samples"] <= BUDGET
    assert_sound(results, inputs, "sequential")
    assert_useful(results, inputs, "sequential", min_ratio=0.5)


def test_auto_on_a_base_only_bundle_is_sound(client, inputs):
    results = certify_all(client, inputs["x"][:100], alpha=ALPHA)
    assert {r["fallback_reason"] for r in results} == {"no_surrogate"}
    sub = {k: v[:100] for k, v in inputs.items()}
    assert_sound(results, sub, "auto (sequential, no surrogate)")


def test_target_radius_certificates_are_sound(client, inputs):
    """Target = half the exact radius: the target policy should usually reach it, never overshoot the truth."""
    targets = np.round(0.5 * inputs["radius"], 4)
    results = []
    for x, target in zip(inputs["x"], targets):
        r = client.post("/certify", json={"image": x.tolist(), "mode": "sequential", "alpha": ALPHA,
                                          "target_radius": float(target)})
        assert r.status_code == 200, r.text
        results.append(r.json())
    assert_sound(results, inputs, "sequential with target radius")
    stopped = np.array([r["stopped_by"] for r in results])
    radius = np.array([r["radius"] for r in results])
    assert np.all(radius[stopped == "target"] >= targets[stopped == "target"])
    clear = inputs["pA"] >= 0.9
    assert np.mean(stopped[clear] == "target") >= 0.9


@pytest.fixture(scope="module")
def boundary_inputs(model):
    """150 images whose pA lies in [0.6, 0.995], where an optional-stopping bound can overshoot within the budget
    (rejection sampling from uniform images, so the margin and the exact radius are those of the actual image)."""
    rng = np.random.default_rng(314)
    x = rng.random((3000, 1, 4, 4), dtype=np.float32)
    margin = x.reshape(len(x), 16).astype(np.float64) @ model["w"] + model["b"]
    norm_w = float(np.linalg.norm(model["w"]))
    p_a = norm.cdf(np.abs(margin) / (SIGMA * norm_w))
    keep = np.flatnonzero((p_a >= 0.6) & (p_a <= 0.995))[:N_INPUTS]
    assert len(keep) == N_INPUTS
    return {"x": x[keep], "radius": np.abs(margin[keep]) / norm_w, "pA": p_a[keep]}


def test_target_at_the_exact_radius_is_a_sound_test(client, boundary_inputs, sim, record_rate):
    """target_radius = the EXACT radius, i.e. p_target = pA: the null hypothesis pA <= p_target holds with equality,
    so "target reached" (L_t >= pA) is a type-I error and must happen in <= alpha of the requests, and no more often
    than the exact probability of the engine's policy predicts (dynamic program over its checkpoints, KT prior: the
    bundle has no meta-learner). Run against the optional-stopping bug once (2026-12-04, on a copy of the tree with
    models/decisions.py stopping and certifying with the fixed-n Clopper-Pearson bound) it failed: 54 of 150
    requests (0.36) reached the target against a limit of 0.17, while the sequential and half-radius target tests
    above passed on the same copy."""
    from smoothing import checkpoint_schedule, lower_bound, target_radius_decision

    results = []
    for x, radius in zip(boundary_inputs["x"], boundary_inputs["radius"]):
        r = client.post("/certify", json={"image": x.tolist(), "mode": "sequential", "alpha": ALPHA,
                                          "target_radius": float(radius)})
        assert r.status_code == 200, r.text
        results.append(r.json())
    reached = np.array([r["certified"] and r["p_lower"] >= p for r, p in zip(results, boundary_inputs["pA"])])
    n, rate = len(results), float(reached.mean())
    assert rate <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / n), f"type-I rate {rate:.3f} over {n} requests"
    checkpoints = checkpoint_schedule(BUDGET)
    exact = np.array([sim.exact_policy_violation(
        lambda s, t, p=p: target_radius_decision(s, t, sigma=SIGMA, target_radius=SIGMA * norm.ppf(p), alpha=ALPHA,
                                                 budget=BUDGET),
        lambda s, t: lower_bound(s, t, ALPHA), p, checkpoints)[0] for p in boundary_inputs["pA"]])
    expected, sd = exact.sum(), math.sqrt(float(np.sum(exact * (1 - exact))))
    record_rate(rate, ALPHA, n, f"exact expectation {expected / n:.4f}")
    assert reached.sum() <= expected + 4 * sd + 1, (int(reached.sum()), expected, sd)


def test_cohen_certificates_are_sound(client, inputs):
    results = certify_all(client, inputs["x"], mode="cohen", alpha=ALPHA, max_samples=1000)
    for res in results:
        assert res["method"] == "cohen" and res["guarantee"]["kind"] == "clopper-pearson"
        assert res["samples"] == COHEN_N0 + 1000
    assert_sound(results, inputs, "cohen")
    assert_useful(results, inputs, "cohen", min_ratio=0.7)


def test_fixed_certificates_are_sound(client, inputs):
    """mode=fixed (class from the clean image, n planned from the clean-image prior, one Clopper-Pearson bound) on
    the linear model with exactly known radii. Run once against a bug (the engine's CP bound computed at 5 * alpha):
    violation rate 0.487 against the limit 0.173, and this test failed."""
    results = certify_all(client, inputs["x"], mode="fixed", alpha=ALPHA, max_samples=1000)
    for res in results:
        assert res["method"] == "fixed" and res["guarantee"]["kind"] == "clopper-pearson"
        assert 0 < res["samples"] <= 1000 and res["stopped_by"] in ("planned", "deadline")
    assert_sound(results, inputs, "fixed")
    assert_useful(results, inputs, "fixed", min_ratio=0.5)


def test_near_boundary_inputs_abstain_rather_than_guess(client, model):
    """Inputs exactly on and very near the decision boundary (pA ~ 1/2): certifying them at a radius beyond the
    tiny exact one would be a violation; the answers must abstain or stay below it."""
    rng = np.random.default_rng(5)
    w, b = model["w"], model["b"]
    xs, radii = [], []
    for _ in range(40):
        x = rng.random(16)
        x = np.clip(x - (x @ w + b) / (w @ w) * w, 0, 1)  # project (approximately) onto the boundary
        xs.append(x.astype(np.float32).reshape(1, 4, 4))
        radii.append(abs(float(xs[-1].reshape(16).astype(np.float64) @ w + b)) / np.linalg.norm(w))
    results = certify_all(client, np.stack(xs), mode="sequential", alpha=ALPHA)
    radii = np.array(radii)
    over = [r["radius"] > rad for r, rad in zip(results, radii) if r["certified"]]
    assert sum(over) <= 0.1 * len(results) + 3 * math.sqrt(0.09 * len(results))
