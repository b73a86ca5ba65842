"""The one conversion from a request to a plan (:func:`certification.plan.make_plan`), without ONNX or an engine."""

from __future__ import annotations

import pytest

from certification.config import ServiceConfig
from certification.errors import ServiceError
from certification.plan import CertifyParams, make_plan
from models.surrogate import auto_uses_surrogate

CONFIG = ServiceConfig(default_alpha=0.001, max_samples=10_000, auto_max_samples=4_000, default_deadline_ms=30_000,
                       auto_min_surrogate_z=1.6)
ALPHA_CAL = 0.001
SIGMA = 0.25  # auto's threshold: 1.6 sigmas = radius 0.4


def plan(radius=0.45, alpha_cal=ALPHA_CAL, arrival=100.0, config=CONFIG, **params):
    return make_plan(CertifyParams(**params), config, alpha_cal=alpha_cal, surrogate_radius=radius, sigma=SIGMA,
                     arrival=arrival)


def test_auto_answers_from_the_surrogate_when_it_certifies():
    p = plan()
    assert (p.route, p.fallback_reason, p.alpha) == ("surrogate", None, 0.001)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(radius=None, alpha_cal=None), "no_surrogate"),
    (dict(per_input=True), "per_input_requested"),
    (dict(alpha=0.0001), "alpha_below_alpha_cal"),
    (dict(radius=0.0), "surrogate_abstained"),
    (dict(target_radius=0.5), "below_target_radius"),
    (dict(radius=0.39), "below_auto_min_radius"),
    (dict(per_input=True, alpha=0.0001, radius=0.0), "per_input_requested"),  # first reason in order
])
def test_auto_falls_back_with_its_reason(kwargs, reason):
    p = plan(**kwargs)
    assert (p.route, p.fallback_reason) == ("sequential", reason)
    assert p.budget == CONFIG.auto_max_samples  # auto's latency-oriented budget


def test_auto_threshold_is_the_shared_routing_rule_and_a_target_overrides_it():
    """Auto answers with the surrogate exactly where models.surrogate.auto_uses_surrogate says so (the rule the
    offline evaluation replays); a caller's target_radius replaces the threshold; 0 sigmas = whenever it certifies.
    Fails if the plan's threshold drifts from the evaluated one (e.g. radius instead of sigmas, or > instead of >=):
    run once (2026-12-04) with ``<=`` in place of ``<`` in plan._fallback_reason, it failed at radius 0.4."""
    for radius in (0.0, 0.1, 0.3999, 0.4, 0.41, 0.9):
        assert (plan(radius=radius).route == "surrogate") == auto_uses_surrogate(radius, SIGMA, 1.6), radius
    assert plan(radius=0.3, target_radius=0.25).route == "surrogate"  # the caller's target is met
    p = plan(radius=0.3)
    assert (p.route, p.fallback_reason, p.proposal) == ("sequential", "below_auto_min_radius", True)
    zero = ServiceConfig(auto_min_surrogate_z=0.0)
    assert plan(radius=0.01, config=zero).route == "surrogate"
    assert plan(radius=0.0, config=zero).fallback_reason == "surrogate_abstained"


def test_budget_is_capped_and_explicit_modes_get_max_samples():
    assert plan(mode="sequential").budget == 10_000
    assert plan(mode="cohen").budget == 10_000
    assert plan(mode="sequential", max_samples=50_000).budget == 10_000
    assert plan(mode="sequential", max_samples=700).budget == 700
    assert plan(per_input=True, max_samples=700).budget == 700


def test_deadline_counts_from_arrival():
    assert plan(mode="sequential", arrival=5.0).deadline == pytest.approx(35.0)
    assert plan(mode="sequential", arrival=5.0, deadline_ms=250).deadline == pytest.approx(5.25)


def test_alpha_defaults_to_the_configured_one_and_explicit_modes_keep_theirs():
    assert plan(mode="sequential").alpha == CONFIG.default_alpha
    p = plan(mode="cohen", alpha=0.05)
    assert (p.route, p.alpha, p.target_radius, p.fallback_reason) == ("cohen", 0.05, None, None)


@pytest.mark.parametrize("mode", ["fixed", "cohen", "surrogate"])
def test_modes_that_cannot_stop_at_a_target_refuse_it(mode):
    """fixed and cohen draw a sample size fixed in advance, the surrogate one forward pass: none can certify 'at
    least target_radius', so the request is refused rather than the target ignored (cohen and surrogate ignored it
    before 2026-12-05: this test failed for them)."""
    with pytest.raises(ServiceError, match=f"mode={mode} cannot stop at a target_radius") as info:
        plan(mode=mode, target_radius=0.2)
    assert info.value.code == "bad_request"


@pytest.mark.parametrize("kwargs, code", [
    (dict(radius=None, alpha_cal=None), "no_surrogate"),
    (dict(per_input=True), "per_input_unavailable"),
    (dict(alpha=0.0005), "alpha_below_alpha_cal"),
])
def test_surrogate_mode_refuses_what_it_cannot_certify(kwargs, code):
    with pytest.raises(ServiceError) as info:
        plan(mode="surrogate", **kwargs)
    assert info.value.code == code


def test_surrogate_mode_answers_even_when_the_surrogate_abstains():
    p = plan(mode="surrogate", radius=0.0)
    assert (p.route, p.fallback_reason) == ("surrogate", None)


def test_fixed_mode_routes_to_the_fixed_n_engine_job_and_refuses_a_target():
    p = plan(mode="fixed", max_samples=3000)
    assert (p.route, p.budget, p.fallback_reason) == ("fixed", 3000, None)
    with pytest.raises(ServiceError) as info:
        plan(mode="fixed", target_radius=0.3)
    assert info.value.code == "bad_request" and "target_radius" in info.value.message


@pytest.mark.parametrize("kwargs, proposal", [
    (dict(), False),  # answered by the surrogate
    (dict(per_input=True), True),
    (dict(alpha=0.0001), True),
    (dict(radius=0.0), True),
    (dict(target_radius=0.5), False),  # the caller's target wins
    (dict(radius=None, alpha_cal=None), False),  # no surrogate: nothing to propose
    (dict(mode="sequential"), False),  # explicit sequential: the best-radius rule
    (dict(mode="fixed"), False),
])
def test_auto_fallbacks_target_the_surrogates_proposal(kwargs, proposal):
    """An auto request that falls back (per_input, alpha below the ladder, surrogate abstained) targets the
    surrogate's proposed radius; an explicit target, an explicit mode or a bundle without surrogate does not."""
    assert plan(**kwargs).proposal is proposal


@pytest.mark.parametrize("kwargs, per_input_lambda", [
    (dict(), False),  # answered by the surrogate
    (dict(per_input=True), True),
    (dict(radius=0.0), True),
    (dict(radius=None, alpha_cal=None), True),  # no surrogate: no proposal, but still auto's per-input path
    (dict(radius=None, alpha_cal=None, per_input=True), True),
    (dict(target_radius=0.5), False),  # the caller's target: the target policy, no lambda
    (dict(mode="sequential"), False),  # explicit sequential: the best-radius rule's default lambda
])
def test_every_auto_fallback_without_a_target_runs_the_per_input_lambda(kwargs, per_input_lambda):
    """Auto's fallback stops by the latency-oriented lambda whether or not the bundle has a surrogate to propose a
    radius. Run once against the old plan (the lambda tied to the proposal): a bundle without surrogate ran auto
    with the best-radius default lambda (5e-5 instead of 2e-4) on auto's budget, the two no-surrogate cases failed."""
    assert plan(**kwargs).per_input_lambda is per_input_lambda
