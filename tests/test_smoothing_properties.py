"""Property-based tests (hypothesis, derandomized) over the whole valid input domain of :mod:`smoothing`:
t up to 1e7, a and b in [1e-3, 1e3], alpha in [1e-10, 0.5], the KT-mixture weight in {0, default, 1/2, 1}.

Each property runs ~60 examples in the default suite and ~1500 in the slow one (same body).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smoothing import (
    DEFAULT_KT_WEIGHT,
    Stop,
    best_radius_decision,
    certified_radius,
    conformal_quantile,
    log_e_value,
    lower_bound,
    radius_from_probability,
    rejects,
    target_radius_decision,
    upper_bound,
)

EXAMPLES = {"fast": 60, "slow": 1500}

trials = st.integers(1, 10**7)
fractions = st.floats(0.0, 1.0)
alphas = st.floats(1e-10, 0.5)
prior_params = st.floats(-3.0, 3.0).map(lambda x: float(10.0**x))
sigmas = st.floats(0.01, 2.0)
weights = st.sampled_from([0.0, DEFAULT_KT_WEIGHT, 0.5, 1.0])


def run(size, test, *strategies):
    """Run ``test`` under hypothesis with the example budget of ``size`` (fast / slow), derandomized."""
    given(*strategies)(
        settings(max_examples=EXAMPLES[size.name], derandomize=True, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])(test)
    )()


def _successes(t, fracs):
    """Sorted hit counts in 0..t: the drawn fractions plus the edge cases 0, 1, t-1, t."""
    s = {0, t, max(t - 1, 0), min(1, t)} | {round(f * t) for f in fracs}
    return np.array(sorted(s))


def test_bounds_monotone_in_successes(size):
    """For fixed t, L_t, U_t and the certified radius are non-decreasing in S_t (more hits never certify less)."""

    def prop(t, fracs, alpha, a, b, w):
        s = _successes(t, fracs)
        L, U = lower_bound(s, t, alpha, a, b, kt_weight=w), upper_bound(s, t, alpha, a, b, kt_weight=w)
        r = certified_radius(s, t, alpha, 0.25, a, b, kt_weight=w)
        assert np.all(np.diff(L) >= 0), (s[1:][np.diff(L) < 0], t)
        assert np.all(np.diff(U) >= 0), (s[1:][np.diff(U) < 0], t)
        assert np.all(np.diff(r) >= 0), (s[1:][np.diff(r) < 0], t)

    run(size, prop, trials, st.lists(fractions, min_size=1, max_size=20), alphas, prior_params, prior_params, weights)


def test_bounds_bracket_the_hit_rate_and_are_finite(size):
    """0 <= L_t <= S_t/t <= U_t <= 1, L_t <= U_t, no NaN / inf anywhere (also in log_e_value and the radius)."""

    def prop(t, frac, alpha, a, b, p0, w):
        s = round(frac * t)
        L, U = lower_bound(s, t, alpha, a, b, kt_weight=w), upper_bound(s, t, alpha, a, b, kt_weight=w)
        assert np.isfinite(L) and np.isfinite(U)
        assert 0.0 <= L <= s / t <= U <= 1.0, (s, t, L, U)
        assert L <= U
        r = certified_radius(s, t, alpha, 0.25, a, b, kt_weight=w)
        assert np.isfinite(r) and r >= 0 and (r > 0) == (L > 0.5 and L < 1.0)
        assert np.isfinite(log_e_value(s, t, p0, a, b, kt_weight=w))
        assert isinstance(rejects(s, t, p0, alpha, a, b, kt_weight=w), bool)

    run(size, prop, trials, fractions, alphas, prior_params, prior_params, st.floats(1e-6, 1 - 1e-6), weights)


def test_rejects_and_lower_bound_agree(size):
    """rejects(S, t, p0) is True exactly for p0 at or below L_t (up to a 1e-9 relative band around L_t):
    the confidence sequence is the inversion of the e-process test."""

    def prop(t, frac, alpha, a, b, rel, w):
        s = round(frac * t)
        L = lower_bound(s, t, alpha, a, b, kt_weight=w)
        if L <= 1e-290:
            return
        p0 = L * rel
        if abs(rel - 1.0) > 1e-9 and p0 < 1.0:
            assert rejects(s, t, p0, alpha, a, b, kt_weight=w) == (p0 < L), (s, t, alpha, a, b, w, L, p0)
        assert rejects(s, t, L, alpha, a, b, kt_weight=w), (s, t, alpha, a, b, w, L)

    run(size, prop, trials, fractions, alphas, prior_params, prior_params, st.floats(0.5, 1.5), weights)


def test_radius_monotone_in_lower_bound(size):
    """radius_from_probability is non-decreasing in p on [0, 1), 0 exactly for p <= 1/2, finite everywhere."""

    def prop(ps, sigma):
        p = np.sort(np.array(ps))
        r = radius_from_probability(p, sigma)
        assert np.all(np.isfinite(r)) and np.all(r >= 0)
        assert np.all(np.diff(r) >= 0), p[1:][np.diff(r) < 0]
        assert np.all((r == 0) == (p <= 0.5))

    run(size, prop, st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=2, max_size=30), sigmas)


def test_vectorized_equals_scalar(size):
    """Batched evaluation (how the worker calls it) equals one call per job to 1e-9 relative. (Not bit-identical:
    the Newton loop and its back-off run until ALL jobs of the batch are done, so a job's last digits depend on its
    batch-mates: differences of 2e-12 relative were seen, e.g. S=273, t=1387, alpha=0.4377, a=40.15, b=42.17.)"""

    def prop(ts, fracs, alpha, a, b, w):
        t = np.array(ts)
        s = np.array([round(f * x) for f, x in zip(fracs, ts)])
        a, b = np.array(a), np.array(b)  # a different prior per job, as the worker's meta priors
        L = lower_bound(s, t, alpha, a, b, kt_weight=w)
        U = upper_bound(s, t, alpha, a, b, kt_weight=w)
        for i in range(len(t)):
            one = (int(s[i]), int(t[i]), alpha, a[i], b[i])
            assert L[i] == pytest.approx(lower_bound(*one, kt_weight=w), rel=1e-9, abs=0)
            assert U[i] == pytest.approx(upper_bound(*one, kt_weight=w), rel=1e-9, abs=0)

    five = {"min_size": 5, "max_size": 5}
    run(size, prop, st.lists(trials, **five), st.lists(fractions, **five), alphas, st.lists(prior_params, **five),
        st.lists(prior_params, **five), weights)


TARGET_CODES = {Stop.CONTINUE, Stop.TARGET, Stop.FUTILITY, Stop.BUDGET}
BEST_CODES = {Stop.CONTINUE, Stop.CERTIFIED, Stop.FUTILITY, Stop.BUDGET}


def test_stopping_policies_return_valid_codes(size):
    """Both policies return only their documented codes (scalar: a Stop; batched: int codes), and TARGET /
    CERTIFIED only where the current bound certifies a positive radius."""

    def prop(t, frac, alpha, a, b, sigma, radius_in_sigmas, budget):
        s = round(frac * t)
        target = radius_in_sigmas * sigma
        d1 = target_radius_decision(s, t, sigma=sigma, target_radius=target, alpha=alpha, budget=budget, a=a, b=b)
        d2 = best_radius_decision(s, t, sigma=sigma, alpha=alpha, budget=budget, a=a, b=b)
        assert isinstance(d1, Stop) and d1 in TARGET_CODES
        assert isinstance(d2, Stop) and d2 in BEST_CODES
        L = lower_bound(s, t, alpha, a, b)
        if d1 == Stop.TARGET:
            assert L >= max(0.5, float(np.nextafter(0.5, 0)))
        if d2 == Stop.CERTIFIED:
            assert certified_radius(s, t, alpha, sigma, a, b) > 0
        if d1 == Stop.CONTINUE:
            assert t < budget
        batch = target_radius_decision(np.array([s, s]), np.array([t, t]), sigma=sigma, target_radius=target,
                                       alpha=alpha, budget=budget, a=a, b=b)
        assert set(batch.tolist()) == {int(d1)}

    run(size, prop, st.integers(0, 10**6), fractions, alphas, prior_params, prior_params, sigmas,
        st.floats(0.0, 5.0), st.integers(1, 2 * 10**6))


def test_conformal_quantile_is_a_score_and_monotone_in_delta(size):
    """q_hat is one of the scores (or +inf) and does not decrease when delta decreases."""

    def prop(scores, d1, d2):
        lo, hi = sorted((d1, d2))
        q_lo_delta, q_hi_delta = conformal_quantile(scores, lo), conformal_quantile(scores, hi)
        assert q_lo_delta >= q_hi_delta
        for q in (q_lo_delta, q_hi_delta):
            assert q == np.inf or q in scores

    run(size, prop, st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200), st.floats(1e-4, 0.9),
        st.floats(1e-4, 0.9))


@pytest.mark.parametrize("t", [1, 10, 1000, 10**5, 10**7])
def test_extreme_priors_and_levels_are_finite(t):
    """Corners of the domain (a, b in {1e-3, 1e3}, alpha in {1e-10, 0.5}, S in {0, 1, t-1, t}) give finite bounds."""
    for a in (1e-3, 1e3):
        for b in (1e-3, 1e3):
            for alpha in (1e-10, 0.5):
                s = np.unique([0, 1, t - 1, t])
                L, U = lower_bound(s, t, alpha, a, b), upper_bound(s, t, alpha, a, b)
                assert np.all(np.isfinite(L)) and np.all(np.isfinite(U))
                assert np.all(L <= s / t) and np.all(U >= s / t) and np.all(np.diff(L) >= 0)
