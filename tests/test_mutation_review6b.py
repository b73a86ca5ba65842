"""Mutation audit, round 6b: what decides a certificate before any noise sample and what a bundle promises: the
manifest and its calibration block (models.bundle), the surrogate's calibrated answer and auto's routing rule
(models.surrogate), the clean-image class and prior (models.priors), the plan (certification.plan) and what the
certificate states (certification.certificate).

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. Deterministic: no noise is drawn, no ONNX
session runs (stand-in backends, manifests validated as dicts), so each test takes milliseconds.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from certification.certificate import GUARANTEE_OF_ROUTE, STATEMENTS, ModelInfo, Timings, build_certificate
from certification.config import ServiceConfig
from certification.plan import CertifyParams, make_plan
from models.bundle import Calibration, Manifest
from models.priors import FEATURE_NAMES, class_and_prior, softmax
from models.surrogate import auto_uses_surrogate, surrogate_answers
from smoothing import level_split

SIGMA = 0.25
CONFIG = ServiceConfig(default_alpha=0.001, max_samples=10_000, auto_max_samples=4_000, auto_min_surrogate_z=1.6)


def _level(alpha, q_hat=(0.5, 0.2), edges=(4.0,), values=(0.0, 3.0), **kw):
    delta, alpha_1 = level_split(alpha)
    return {"alpha": alpha, "delta": delta, "alpha_1": alpha_1, "knots": [0.0, 10.0], "values": list(values),
            "scale": [1.0, 0.5], "edges": list(edges), "q_hat": list(q_hat), "bin_sizes": [4000 // len(q_hat)] *
            len(q_hat), **kw}


def _calibration(**kw):
    block = {"samples_per_image": 10_000, "num_calibration": 4000, "num_tuning": 200,
             "levels": [_level(0.1), _level(0.01)]}
    return Calibration.model_validate({**block, **kw})


def _manifest(**kw):
    base = {"schema_version": 2, "name": "t", "sigma": SIGMA, "input": {"shape": [1, 4, 4]},
            "classes": ["a", "b", "c"], "artifacts": {"base": {"file": "base.onnx", "sha256": "0" * 64}}}
    return Manifest.model_validate({**base, **kw})


# ------------------------------------------------------------------------------------ the bundle's promises
def test_a_level_whose_alpha_is_not_delta_plus_alpha_1_is_refused():
    """A level states alpha = delta + alpha_1 (the certificate reports alpha); one whose parts sum 1% below it is a
    malformed block (another split than level_split's), refused at load. Bug guarded against (run against it, this
    test failed): ConformalLevel._consistent comparing with rel_tol=0.1 instead of 1e-9 (the exact-arithmetic check
    only refuses a sum ABOVE alpha; the existing test's mismatch, delta 0.05 at alpha 0.1, is 45% off)."""
    lv = _level(0.1)
    with pytest.raises(ValidationError, match="must equal delta \\+ alpha_1"):
        _calibration(levels=[{**lv, "delta": lv["delta"] * 0.99}])
    _calibration(levels=[lv])  # the exact split loads


@pytest.mark.parametrize("change", [dict(gamma=0.05), dict(guarantee="training-conditional", gamma=1.0)])
def test_gamma_comes_with_and_only_with_the_training_conditional_guarantee(change):
    """gamma (the PAC miss probability) belongs to the training-conditional guarantee only, and lies in (0, 1): a
    marginal block with a gamma states a guarantee it was not calibrated for. Bugs guarded against (each run, this
    test failed): the check reduced to 'training-conditional needs gamma' (a marginal block with gamma loaded), and
    gamma's bound lt=1 relaxed to le=1 (gamma 1: a vacuous PAC statement loaded)."""
    with pytest.raises(ValidationError):
        _calibration(**change)
    _calibration(guarantee="training-conditional", gamma=0.05)


def test_meta_features_in_another_order_are_refused():
    """The service feeds the meta model FEATURE_NAMES in that order: the same names in another order would feed
    the meta model its features swapped. Bug guarded against (run against it, this test failed): Manifest comparing
    sorted(meta_features) with sorted(FEATURE_NAMES) (tests/test_bundle_refusals.py's case also adds an unknown name,
    which that bug still refused)."""
    meta = {"base": {"file": "base.onnx", "sha256": "0" * 64}, "meta": {"file": "meta.onnx", "sha256": "1" * 64}}
    _manifest(artifacts=meta, meta_features=list(FEATURE_NAMES))
    with pytest.raises(ValidationError, match="meta_features must be"):
        _manifest(artifacts=meta, meta_features=[FEATURE_NAMES[1], FEATURE_NAMES[0], *FEATURE_NAMES[2:]])


@pytest.mark.parametrize("classes", [["a", "b", "a"], ["a", "b", "b "]])
def test_two_classes_with_one_name_are_refused(classes):
    """A certificate names its class (class_name): two classes with one name (after stripping) make it ambiguous.
    Bug guarded against (run against it, this test failed): Manifest checking only that names are non-blank."""
    with pytest.raises(ValidationError, match="distinct"):
        _manifest(classes=classes)


# ------------------------------------------------------------------------------------ the surrogate's answer
def test_a_non_finite_logit_abstains_even_where_the_calibration_would_certify_any_output():
    """A row with a NaN or inf logit has no calibration score: it abstains (radius 0, p_lower 0) whatever the maps
    say. Here the point-estimate map is 3 everywhere and the quantile 0, so a finite row certifies at any log-odds,
    including the uniform output a NaN row is computed on. Bug guarded against (run against it, this test failed):
    surrogate_answers zeroing z_hat but not the radius of bad rows (a certificate from a NaN output; the existing
    NaN tests use calibrations whose radius at the uniform stand-in is 0 anyway)."""
    cal = _calibration(levels=[_level(0.1, q_hat=(0.0,), edges=(), values=(3.0, 3.0))])
    logits = np.array([[np.nan, 0.0, 0.0], [np.inf, 0.0, 0.0], [2.0, 0.0, 0.0]])
    ans = surrogate_answers(logits, cal, SIGMA, 0.1)
    assert ans.level == 0.1
    assert list(ans.radius[:2]) == [0.0, 0.0] and list(ans.p_lower[:2]) == [0.0, 0.0]
    assert ans.radius[2] > 0  # the finite row certifies: the test would be vacuous otherwise


def test_auto_never_routes_an_abstaining_surrogate_even_at_a_zero_threshold():
    """auto_uses_surrogate (replayed by the offline evaluation) requires radius > 0 at any threshold, as the plan
    does (fallback surrogate_abstained). Bug guarded against (run against it, this test failed): radius >= 0 in
    place of > 0 (tests/test_plan.py compares the two only at 1.6 sigmas, where radius 0 is below it anyway)."""
    zero = ServiceConfig(auto_min_surrogate_z=0.0)
    for radius in (0.0, 1e-9, 0.3):
        routed = make_plan(CertifyParams(), zero, alpha_cal=0.001, surrogate_radius=radius, sigma=SIGMA,
                           arrival=0.0).route == "surrogate"
        assert routed == bool(auto_uses_surrogate(radius, SIGMA, 0.0)) == (radius > 0), radius
    assert not auto_uses_surrogate(np.zeros(3), SIGMA, 0.0).any()


# ------------------------------------------------------------------------------------ class and prior
class _Recording:
    def __init__(self, logits):
        self.logits, self.seen = np.asarray(logits, dtype=np.float32), []

    def forward(self, images):
        self.seen.append(np.array(images, copy=True))
        return self.logits


def test_the_surrogates_class_and_prior_come_from_the_clean_images_themselves():
    """class_and_prior runs the surrogate (and the base model) on the very images it is given: the clean ones,
    before any noise sample. Bug guarded against (run against it, this test failed): the surrogate's forward pass
    on a noisy copy of the images (the service passes its own surrogate logits, so only the offline evaluation,
    the benchmarks and this function's own path ran it; no test called that path with a surrogate backend)."""
    images = np.random.default_rng(3).uniform(0, 1, (2, 1, 4, 4)).astype(np.float32)
    base, surrogate = _Recording([[2.0, 0.0, 0.0]] * 2), _Recording([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    tested, _ = class_and_prior(base, surrogate, None, images)
    assert list(tested) == [1, 2]
    for backend in (base, surrogate):
        assert len(backend.seen) == 1 and np.array_equal(backend.seen[0], images)


def test_the_tested_class_of_confident_float32_logits_is_their_arg_max():
    """ONNX models give float32 logits, whose exp overflows above ~88.7: softmax must shift by the row's maximum,
    or a confident surrogate's probabilities are inf / inf = NaN and its tested class the first NaN (not the
    arg-max). Bug guarded against (run against it, this test failed): softmax without the max shift."""
    logits = np.array([[100.0, 120.0, 0.0]], dtype=np.float32)
    probs = softmax(logits)
    assert np.all(np.isfinite(probs)) and probs.argmax() == 1
    base = _Recording([[0.0, 1.0, 0.0]])
    tested, _ = class_and_prior(base, _Recording(logits), None, np.zeros((1, 1, 4, 4), np.float32))
    assert list(tested) == [1]


# ------------------------------------------------------------------------------------ the plan
def _plan(radius, **params):
    return make_plan(CertifyParams(**params), CONFIG, alpha_cal=0.001, surrogate_radius=radius, sigma=SIGMA,
                     arrival=0.0)


def test_a_surrogate_radius_equal_to_the_target_answers_from_the_surrogate():
    """auto uses the surrogate where its radius is >= target_radius (it certifies the target). Bug guarded against
    (run against it, this test failed): <= in place of < in the below_target_radius rule."""
    assert (_plan(0.5, target_radius=0.5).route, _plan(0.5, target_radius=0.5).fallback_reason) == ("surrogate", None)
    assert _plan(0.5, target_radius=0.5000001).fallback_reason == "below_target_radius"


def test_a_target_radius_of_zero_replaces_the_auto_threshold():
    """target_radius = 0 is a target (any certificate will do), not 'no target': a radius below auto's 1.6 sigma
    threshold but > 0 answers from the surrogate. Bug guarded against (run against it, this test failed):
    ``if params.target_radius:`` in place of ``is not None`` (0 fell through to below_auto_min_radius)."""
    p = _plan(0.1, target_radius=0.0)
    assert (p.route, p.fallback_reason, p.target_radius) == ("surrogate", None, 0.0)
    assert _plan(0.0, target_radius=0.0).fallback_reason == "surrogate_abstained"


def test_an_alpha_below_1e_15_is_refused_and_1e_15_accepted():
    """The documented minimum alpha is 1e-15 (below it floating point cannot hold the bounds). Bug guarded against
    (run against it, this test failed): CertifyParams checking 1e-300 instead."""
    with pytest.raises(ValidationError, match="at least 1e-15"):
        CertifyParams(alpha=1e-16)
    assert CertifyParams(alpha=1e-15).alpha == 1e-15


# ------------------------------------------------------------------------------------ the certificate
def _build(route, class_index, radius=0.3):
    model = ModelInfo(name="t", version="1", sha256="0" * 64, manifest_sha256="1" * 64)
    return build_certificate(route=route, class_index=class_index, radius=radius, p_lower=0.4, samples=0,
                             stopped_by="abstained", guarantee_alpha=0.01, classes=["a", "b"],
                             timings=Timings(decode_ms=0.0, total_ms=0.0), model=model, request_id="r",
                             preprocessing=[])


def test_an_abstaining_certificate_states_radius_zero_whatever_radius_it_is_given():
    """class_index -1 makes the certificate uncertified with radius 0 and no class name, on every route. Bug guarded
    against (run against it, this test failed): build_certificate passing the given radius through when abstaining
    (every existing caller happens to pass 0 there)."""
    for route in GUARANTEE_OF_ROUTE:
        cert = _build(route, -1, radius=0.3)
        assert (cert.certified, cert.radius, cert.class_name, cert.method) == (False, 0.0, None, route)


def test_each_route_states_the_statement_of_its_own_guarantee():
    """The guarantee's statement is the one of its kind: the surrogate's says marginal, not per input; the engine
    routes' say per input. Bug guarded against (run against it, this test failed): build_certificate stating the
    anytime-valid statement on every route (the kind stayed right, so no existing test, which check kind and alpha,
    noticed that a marginal certificate claimed 'for this input')."""
    for route, kind in GUARANTEE_OF_ROUTE.items():
        cert = _build(route, 1)
        assert (cert.guarantee.kind, cert.guarantee.statement) == (kind, STATEMENTS[kind])
    assert _build("surrogate", 1).guarantee.statement.startswith("marginal, not per input")
    for route in ("sequential", "fixed", "cohen"):
        assert _build(route, 1).guarantee.statement.startswith("for this input")
