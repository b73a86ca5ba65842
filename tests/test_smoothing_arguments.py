"""Every public function of :mod:`smoothing` refuses bad arguments with a ValueError whose message names the argument.

A caller (the server, the calibration pipeline) passes these messages on unchanged, so each case checks the message
too, not only the exception type.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import smoothing as sm

BAD_LEVELS = [0, 1, -0.1, 1.5, math.nan, math.inf]
BAD_SIGMAS = [0, -0.25, math.nan, math.inf]
POLICY = {"sigma": 0.25, "alpha": 0.01, "budget": 1000}

# name -> call taking the bad alpha
ALPHA_CALLS = {
    "clopper_pearson_lower": lambda x: sm.clopper_pearson_lower(5, 10, x),
    "clopper_pearson_upper": lambda x: sm.clopper_pearson_upper(5, 10, x),
    "certify": lambda x: sm.certify(np.array([9, 1]), np.array([90, 10]), x, 0.25),
    "predict": lambda x: sm.predict(np.array([90, 10]), x),
    "rejects": lambda x: sm.rejects(5, 10, 0.3, x),
    "lower_bound": lambda x: sm.lower_bound(5, 10, x),
    "upper_bound": lambda x: sm.upper_bound(5, 10, x),
    "certified_radius": lambda x: sm.certified_radius(5, 10, x, 0.25),
    "probit_labels": lambda x: sm.probit_labels([90], 100, x),
    "level_split": lambda x: sm.level_split(x),
    "target_radius_decision": lambda x: sm.target_radius_decision(
        5, 10, sigma=0.25, target_radius=0.1, alpha=x, budget=1000),
    "target_radius_decision(alpha_futility)": lambda x: sm.target_radius_decision(
        5, 10, sigma=0.25, target_radius=0.1, alpha=0.01, budget=1000, alpha_futility=x),
    "best_radius_decision": lambda x: sm.best_radius_decision(5, 10, sigma=0.25, alpha=x, budget=1000),
}


@pytest.mark.parametrize("bad", BAD_LEVELS, ids=repr)
@pytest.mark.parametrize("name", list(ALPHA_CALLS))
def test_alpha_outside_open_unit_interval(name, bad):
    with pytest.raises(ValueError, match=r"alpha.*strictly between 0 and 1"):
        ALPHA_CALLS[name](bad)


DELTA_CALLS = {
    "conformal_quantile": lambda d: sm.conformal_quantile([0.1, 0.2, 0.3], d),
    "conformal_rank": lambda d: sm.conformal_rank(10, d),
    "min_calibration_size": lambda d: sm.min_calibration_size(d),
}


@pytest.mark.parametrize("bad", BAD_LEVELS, ids=repr)
@pytest.mark.parametrize("name", list(DELTA_CALLS))
def test_delta_outside_open_unit_interval(name, bad):
    with pytest.raises(ValueError, match=r"delta.*strictly between 0 and 1"):
        DELTA_CALLS[name](bad)


SIGMA_CALLS = {
    "certify": lambda s: sm.certify(np.array([9, 1]), np.array([90, 10]), 0.01, s),
    "certified_radius": lambda s: sm.certified_radius(5, 10, 0.01, s),
    "radius_from_probability": lambda s: sm.radius_from_probability(0.9, s),
    "probability_for_radius": lambda s: sm.probability_for_radius(0.5, s),
    "conformal_certificate": lambda s: sm.conformal_certificate(
        np.array([1.0]), s, knots=[0.0, 1.0], values=[0.0, 1.0], scale=[1.0, 1.0], edges=[], q_hat=[0.1]),
    "target_radius_decision": lambda s: sm.target_radius_decision(
        5, 10, sigma=s, target_radius=0.1, alpha=0.01, budget=1000),
    "best_radius_decision": lambda s: sm.best_radius_decision(5, 10, sigma=s, alpha=0.01, budget=1000),
}


@pytest.mark.parametrize("bad", BAD_SIGMAS, ids=repr)
@pytest.mark.parametrize("name", list(SIGMA_CALLS))
def test_sigma_not_positive_finite(name, bad):
    with pytest.raises(ValueError, match=r"sigma must be a finite number > 0"):
        SIGMA_CALLS[name](bad)


# name -> call taking (successes, trials)
COUNT_CALLS = {
    "clopper_pearson_lower": lambda s, t: sm.clopper_pearson_lower(s, t, 0.01),
    "clopper_pearson_upper": lambda s, t: sm.clopper_pearson_upper(s, t, 0.01),
    "log_e_value": lambda s, t: sm.log_e_value(s, t, 0.3),
    "rejects": lambda s, t: sm.rejects(s, t, 0.3, 0.01),
    "lower_bound": lambda s, t: sm.lower_bound(s, t, 0.01),
    "upper_bound": lambda s, t: sm.upper_bound(s, t, 0.01),
    "certified_radius": lambda s, t: sm.certified_radius(s, t, 0.01, 0.25),
    "probit_labels": lambda s, t: sm.probit_labels(s, t, 0.01),
    "target_radius_decision": lambda s, t: sm.target_radius_decision(s, t, target_radius=0.1, **POLICY),
    "best_radius_decision": lambda s, t: sm.best_radius_decision(s, t, **POLICY),
}
BAD_COUNTS = [
    ("successes > trials", 11, 10, r"successes must not exceed trials"),
    ("negative successes", -1, 10, r"successes must be >= 0"),
    ("negative trials", 0, -10, r"trials must be >= 0"),
    ("fractional successes", 2.5, 10, r"successes must be whole numbers"),
    ("fractional trials", 2, 10.5, r"trials must be whole numbers"),
    ("nan successes", math.nan, 10, r"successes must be whole numbers"),
    ("one bad entry in a batch", np.array([1, 12]), np.array([10, 10]), r"successes must not exceed trials"),
]


@pytest.mark.parametrize("label,s,t,pattern", BAD_COUNTS, ids=[c[0] for c in BAD_COUNTS])
@pytest.mark.parametrize("name", list(COUNT_CALLS))
def test_bad_counts(name, label, s, t, pattern):
    with pytest.raises(ValueError, match=pattern):
        COUNT_CALLS[name](s, t)


@pytest.mark.parametrize("name", ["clopper_pearson_lower", "clopper_pearson_upper"])
def test_clopper_pearson_needs_at_least_one_trial(name):
    with pytest.raises(ValueError, match=r"trials must be >= 1"):
        getattr(sm, name)(0, 0, 0.01)


@pytest.mark.parametrize(
    "sel,est,pattern",
    [
        (np.array([9, -1]), np.array([90, 10]), r"selection_counts must be >= 0"),
        (np.array([9, 1]), np.array([90, -10]), r"estimation_counts must be >= 0"),
        (np.array([9.5, 1]), np.array([90, 10]), r"selection_counts must be whole numbers"),
        (np.array([9, 1]), np.array([90, 10.25]), r"estimation_counts must be whole numbers"),
        (np.array([9, 1, 0]), np.array([90, 10]), r"same shape|shape"),
        (np.int64(9), np.int64(90), r"shape"),
        (np.array([9, 1]), np.array([0, 0]), r"trials must be >= 1"),
    ],
)
def test_certify_bad_counts(sel, est, pattern):
    with pytest.raises(ValueError, match=pattern):
        sm.certify(sel, est, 0.01, 0.25)


@pytest.mark.parametrize(
    "counts,pattern",
    [(np.array([5, -1]), r"counts must be >= 0"), (np.array([5.5, 3]), r"counts must be whole numbers"),
     (np.array([5]), r"num_classes"), (np.zeros((2, 2, 2), dtype=int), r"num_classes")],
)
def test_predict_bad_counts(counts, pattern):
    with pytest.raises(ValueError, match=pattern):
        sm.predict(counts, 0.01)


PRIOR_CALLS = {
    "log_e_value": lambda a, b: sm.log_e_value(5, 10, 0.3, a, b),
    "rejects": lambda a, b: sm.rejects(5, 10, 0.3, 0.01, a, b),
    "lower_bound": lambda a, b: sm.lower_bound(5, 10, 0.01, a, b),
    "upper_bound": lambda a, b: sm.upper_bound(5, 10, 0.01, a, b),
    "certified_radius": lambda a, b: sm.certified_radius(5, 10, 0.01, 0.25, a, b),
    "target_radius_decision": lambda a, b: sm.target_radius_decision(5, 10, target_radius=0.1, a=a, b=b, **POLICY),
    "best_radius_decision": lambda a, b: sm.best_radius_decision(5, 10, a=a, b=b, **POLICY),
}


@pytest.mark.parametrize("a,b,which", [(0, 1, "a"), (-1, 1, "a"), (math.nan, 1, "a"), (math.inf, 1, "a"),
                                       (1, 0, "b"), (1, -2.5, "b"), (1, math.nan, "b")])
@pytest.mark.parametrize("name", list(PRIOR_CALLS))
def test_prior_parameters_not_positive(name, a, b, which):
    with pytest.raises(ValueError, match=rf"Beta prior parameter {which} must be finite and > 0"):
        PRIOR_CALLS[name](a, b)


@pytest.mark.parametrize("p0", [0, 1, -0.5, 1.5, math.nan])
@pytest.mark.parametrize("name", ["log_e_value", "rejects"])
def test_null_probability_outside_open_interval(name, p0):
    args = (5, 10, p0) if name == "log_e_value" else (5, 10, p0, 0.01)
    with pytest.raises(ValueError, match=r"p0 must lie strictly between 0 and 1"):
        getattr(sm, name)(*args)


@pytest.mark.parametrize("scores", [[], np.array([]), [0.1, math.nan], [math.inf, 0.2]], ids=repr)
def test_conformal_quantile_empty_or_non_finite_scores(scores):
    with pytest.raises(ValueError, match=r"scores must be a non-empty array of finite numbers"):
        sm.conformal_quantile(scores, 0.1)


def test_conformal_rank_needs_a_score():
    with pytest.raises(ValueError, match=r"at least one calibration score"):
        sm.conformal_rank(0, 0.1)


@pytest.mark.parametrize("logits", [np.array([[1.0, math.nan]]), np.array([1.0, 2.0]), np.array([[1.0]])],
                         ids=["nan", "1-d", "one class"])
def test_surrogate_logits_must_be_a_finite_matrix(logits):
    """The surrogate's log-odds need finite (N, K >= 2) logits; anything else is refused, naming the logits."""
    with pytest.raises(ValueError, match=r"logits must be a finite \(N, K\) array"):
        sm.surrogate_log_odds(logits)


@pytest.mark.parametrize("call,pattern", [
    (lambda: sm.radius_from_probability(1.2, 0.25), r"p_lower must lie in \[0, 1\]"),
    (lambda: sm.radius_from_probability(math.nan, 0.25), r"p_lower must lie in \[0, 1\]"),
    (lambda: sm.probability_for_radius(-0.1, 0.25), r"radius must be a finite number >= 0"),
    (lambda: sm.target_radius_decision(5, 10, target_radius=-0.1, **POLICY), r"radius must be a finite number >= 0"),
    (lambda: sm.target_radius_decision(5, 10, target_radius=math.nan, **POLICY), r"radius must be a finite number"),
    (lambda: sm.best_radius_decision(5, 10, fraction=0.0, **POLICY), r"fraction must lie in \(0, 1\]"),
    (lambda: sm.best_radius_decision(5, 10, fraction=1.5, **POLICY), r"fraction must lie in \(0, 1\]"),
    (lambda: sm.best_radius_decision(5, 10, sigma=0.25, alpha=0.01, budget=0), r"budget must be between 1 and 2\^31"),
    (lambda: sm.checkpoint_schedule(0), r"budget >= 1"),
    (lambda: sm.checkpoint_schedule(100, growth=1.0), r"growth > 1"),
    (lambda: sm.conformal_lower([1.0], knots=[1.0, 0.0], values=[0.0, 1.0], scale=[1.0, 1.0], edges=[], q_hat=[0.1]),
     r"knots must be strictly increasing"),
    (lambda: sm.bin_index([1.0], [2.0, 1.0]), r"bin edges must be a strictly increasing"),
    (lambda: sm.mondrian_quantiles([0.1, 0.2], [0, 2], 2, 0.1), r"bin indices must lie in \[0, 2\)"),
    (lambda: sm.mondrian_quantiles([0.1, 0.2], [0], 1, 0.1), r"scores and bins differ in length"),
    (lambda: sm.conformal_quantile([0.1, math.nan], 0.1), r"scores must be a non-empty array of finite numbers"),
    (lambda: sm.training_conditional_rank(100, 0.1, 0.0), r"gamma must lie strictly between 0 and 1"),
    (lambda: sm.training_conditional_rank(100, 1.0, 0.1), r"delta must lie strictly between 0 and 1"),
], ids=["p>1", "p nan", "radius<0", "target<0", "target nan", "fraction=0", "fraction>1", "budget=0",
        "schedule budget=0", "schedule growth=1", "knots", "edges", "bin range", "bin length", "nan score", "gamma=0",
        "delta=1"])
def test_other_bad_arguments(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.parametrize("call,pattern", [
    (lambda: sm.lower_bound(5, 10, True), r"alpha must be a number"),
    (lambda: sm.lower_bound(5, 10, "0.05"), r"alpha must be a number"),
    (lambda: sm.lower_bound(5, 10, np.array([1e-3 + 1j])), r"alpha must be a number"),
    (lambda: sm.lower_bound(5, 5, 0.05, True, True), r"Beta prior parameter a must be a number"),
    (lambda: sm.lower_bound(True, True, 0.05), r"successes must be whole numbers"),
    (lambda: sm.lower_bound(5, 10, 0.05, kt_weight=True), r"kt_weight must be a number"),
    (lambda: sm.lower_bound(5, 10, 0.05, kt_weight="0.5"), r"kt_weight must be a number"),
    (lambda: sm.radius_from_probability(0.9, "3"), r"sigma must be a number"),
    (lambda: sm.lower_bound(5, 1e19, 0.05), r"trials must be below 2\^62"),
    (lambda: sm.best_radius_decision([5200, 5200], [10000, 10000], sigma=0.5, alpha=1e-3, budget=2 * 10**15),
     r"budget must be between 1 and 2\^31"),
], ids=["alpha bool", "alpha str", "alpha complex", "prior bool", "counts bool", "weight bool", "weight str",
        "sigma str", "trials 1e19", "budget 2e15"])
def test_arguments_numpy_would_silently_coerce_are_refused(call, pattern):
    """Booleans, strings and complex numbers are not numbers here (numpy made True 1.0, "0.05" 0.05 and dropped an
    imaginary part); a float count beyond int64 is not "negative"; a budget whose plug-in projection S * B overflows
    int64 made the array path say FUTILITY where the one-job path said CONTINUE. Run against the checks before
    2026-12-05: every case was accepted (or misreported); this test failed (found by review)."""
    with pytest.raises(ValueError, match=pattern):
        call()


def test_valid_edge_arguments_are_accepted():
    """The boundaries of the valid domain are accepted: integer-valued floats, bool-free int arrays, t = 0 for the
    sequence (no data: L = 0, U = 1), S = 0 and S = t, tiny and large alpha, counts as numpy scalars."""
    assert sm.lower_bound(0, 0, 0.01) == 0.0 and sm.upper_bound(0, 0, 0.01) == 1.0
    assert sm.lower_bound(5.0, 10.0, 1e-12) >= 0.0
    assert sm.clopper_pearson_lower(np.int32(10), np.int64(10), 0.999) > 0.0
    assert sm.certify(np.array([3.0, 1.0]), np.array([100.0, 0.0]), 0.001, 0.25).certified
    assert sm.target_radius_decision(0, 0, target_radius=0.0, **POLICY) == sm.Stop.CONTINUE


KT_WEIGHT_CALLS = {
    "log_e_value": lambda w: sm.log_e_value(5, 10, 0.3, 2.0, 3.0, kt_weight=w),
    "rejects": lambda w: sm.rejects(5, 10, 0.3, 0.01, 2.0, 3.0, kt_weight=w),
    "lower_bound": lambda w: sm.lower_bound(5, 10, 0.01, 2.0, 3.0, kt_weight=w),
    "upper_bound": lambda w: sm.upper_bound(5, 10, 0.01, 2.0, 3.0, kt_weight=w),
    "certified_radius": lambda w: sm.certified_radius(5, 10, 0.01, 0.25, 2.0, 3.0, kt_weight=w),
    "best_radius_decision": lambda w: sm.best_radius_decision(5, 10, kt_weight=w, **POLICY),
    "target_radius_decision": lambda w: sm.target_radius_decision(5, 10, target_radius=0.1, kt_weight=w, **POLICY),
    "planned_sample_size": lambda w: sm.planned_sample_size(2.0, 3.0, sigma=0.25, alpha=0.01, budget=100,
                                                            kt_weight=w),
}


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, "half", None], ids=repr)
@pytest.mark.parametrize("name", list(KT_WEIGHT_CALLS))
def test_kt_weight_outside_unit_interval(name, bad):
    with pytest.raises(ValueError, match=r"kt_weight must be a number in \[0, 1\]"):
        KT_WEIGHT_CALLS[name](bad)


@pytest.mark.parametrize("call,pattern", [
    (lambda: sm.best_radius_decision(5, 10, min_gain=-1e-4, **POLICY), r"min_gain must be a finite number >= 0"),
    (lambda: sm.best_radius_decision(5, 10, min_gain=math.inf, **POLICY), r"min_gain must be a finite number >= 0"),
    (lambda: sm.planned_sample_size(2.0, 3.0, sigma=0.25, alpha=0.01, budget=100, min_gain=-1.0),
     r"min_gain must be a finite number >= 0"),
    (lambda: sm.planned_sample_size(2.0, 3.0, sigma=0.25, alpha=0.01, budget=0), r"budget must be >= 1"),
    (lambda: sm.planned_sample_size(0.0, 3.0, sigma=0.25, alpha=0.01, budget=100), r"Beta prior parameter a"),
    (lambda: sm.planned_sample_size(2.0, 3.0, sigma=0.0, alpha=0.01, budget=100), r"sigma must be a finite number"),
    (lambda: sm.planned_sample_size(2.0, 3.0, sigma=0.25, alpha=1.0, budget=100), r"alpha.*strictly between"),
    (lambda: sm.fixed_n_certificate(11, 10, 0.01, 0.25), r"successes must not exceed trials"),
    (lambda: sm.fixed_n_certificate(5, 10, 0.0, 0.25), r"alpha.*strictly between"),
    (lambda: sm.fixed_n_certificate(5, 10, 0.01, -1.0), r"sigma must be a finite number"),
], ids=["gain<0", "gain inf", "plan gain<0", "plan budget=0", "plan a=0", "plan sigma=0", "plan alpha=1",
        "fixed s>t", "fixed alpha=0", "fixed sigma<0"])
def test_new_route_bad_arguments(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_fixed_n_certificate_without_samples_abstains():
    """A fixed-n job cut by its deadline before any sample: bound 0, radius 0 (abstain), no error."""
    p_lower, radius = sm.fixed_n_certificate(0, 0, 0.01, 0.25)
    assert p_lower == 0.0 and radius == 0.0
