"""Mutation audit, round 8e: the rest of the statistics package - smoothing.cohen (Clopper-Pearson bounds, Cohen et
al.'s CERTIFY / PREDICT), smoothing.radius (radius <-> probability, rounding down, validation), smoothing.fixed (the
fixed-n certificate and its sample-size plan) and smoothing.conformal (split-conformal ranks, Mondrian bins, the
training-conditional rank, the served lower bound), where tests/test_mutation_review5.py and
tests/test_mutation_review6.py leave them uncovered.

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. This round found no real bug in the area.
Deterministic: fixed grids and stubbed expected radii, no random draws.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import betainccinv


# ------------------------------------------------------------------------------------------ cohen: bounds
def test_the_upper_bound_keeps_its_rounding_up_above_the_inverse_beta_quantile():
    """clopper_pearson_upper rounds scipy's inverse UP by a relative 1e-12 (its docstring) before the forward
    confirmation, which only steps up: the reported bound is at least the quantile times (1 + 1e-12) (checked with
    half that margin, for the product's own rounding). Bug guarded against (run against it, this test failed): the
    rounding flipped to ``bound * (1 - 1e-12)``; the confirmation then lifted 999 hits in 1,000 at alpha = 0.001
    back only to 1e-15 above the quantile, the documented allowance for the inverse's error gone."""
    from smoothing import clopper_pearson_upper

    for s, n, a in ((999, 1000, 0.001), (3, 10, 0.001), (50, 100, 0.01), (0, 1, 0.5), (1, 10**6, 1e-6),
                    (7, 9, 0.05), (99, 100, 0.2)):
        assert clopper_pearson_upper(s, n, a) >= betainccinv(s + 1, n - s, a) * (1 + 0.5e-12), (s, n, a)


def test_certify_refuses_trials_below_the_estimation_counts_sum():
    """``trials`` is n, the samples drawn; fewer than the counted samples is a caller error that would shrink n and
    inflate p_lower (50 hits of 100 reported as 50 of 60: p_lower ~ 0.68, a radius for a coin flip). Bug guarded
    against (run against it, this test failed): the ``trials < est.sum()`` refusal dropped - certify certified
    class 0 at radius ~0.23 sigma."""
    from smoothing import certify

    with pytest.raises(ValueError, match="trials"):
        certify([10, 0], [50, 50], 0.001, 0.5, trials=60)
    with pytest.raises(ValueError, match="trials"):
        certify([[10, 0], [0, 10]], [[50, 50], [0, 100]], 0.001, 0.5, trials=[100, 99])


@pytest.mark.parametrize("alpha", [0.6, 0.75, 0.9])
def test_an_upper_bound_above_alpha_one_half_keeps_its_forward_margin(alpha):
    """For alpha > 1/2 _confirmed_upper accepts a bound U only where I_U(S + 1, n - S) >= (1 - alpha)(1 + 1e-9)
    (its docstring: the margin that covers betainc's error near 1), so the reported upper bound satisfies it. Bug
    guarded against (run against it, this test failed): that margin flipped to (1 - 1e-9) - the 1e-12 rounding of
    the inverse alone was accepted, within the forward function's own error of the exact quantile."""
    from scipy.special import betainc

    from smoothing import clopper_pearson_upper

    for s, n in ((0, 1), (0, 10), (3, 10), (50, 100), (998, 1000), (2, 10**5)):
        u = clopper_pearson_upper(s, n, alpha)
        assert betainc(s + 1, n - s, u) >= (1.0 - alpha) * (1.0 + 1e-9), (s, n, alpha)


def test_predict_returns_the_class_when_the_p_value_equals_alpha():
    """PREDICT abstains only where the binomial test's p-value EXCEEDS alpha (the reference's ``> alpha``): 5 of 5
    top-class votes have the exact two-sided p-value 2 / 2^5 = 0.0625, and at alpha = 0.0625 the class is returned.
    Bug guarded against (run against it, this test failed): ``pvalue >= alpha`` - an abstention the reference does
    not make."""
    from smoothing import ABSTAIN, predict

    assert predict([5, 0, 0], 0.0625) == 0
    assert predict([0, 6, 0], 0.03125) == 1
    assert predict([[5, 0, 0], [4, 0, 0]], 0.0625).tolist() == [0, ABSTAIN]  # 4 of 4: p = 0.125 > alpha


# ------------------------------------------------------------------------------------------ fixed: the plan
@pytest.mark.parametrize("sigma", [0.12, 0.25, 1.0, 3.0])
def test_the_fixed_n_radius_scales_with_sigma(sigma):
    """fixed_n_certificate's radius is sigma Phi^-1(p_lower) (rounded down by a relative 1e-10), p_lower the CP bound
    at alpha; 0 where p_lower <= 1/2 or nothing was drawn. Bug guarded against (run against it, this test failed):
    the radius computed at sigma = 1 whatever the noise level - 4x too large a certificate at sigma = 0.25."""
    from scipy.special import ndtri

    from smoothing import clopper_pearson_lower, fixed_n_certificate

    s, t = np.array([990, 600, 500, 0, 0]), np.array([1000, 1000, 1000, 1000, 0])
    p_lower, radius = fixed_n_certificate(s, t, 0.001, sigma)
    np.testing.assert_array_equal(p_lower[:4], clopper_pearson_lower(s[:4], t[:4], 0.001))
    want = sigma * ndtri(p_lower[:2])
    assert np.all(radius[:2] <= want) and np.all(radius[:2] >= want * (1 - 2e-10)), (radius, want)
    assert radius[2:].tolist() == [0.0, 0.0, 0.0] and p_lower[4] == 0.0


@pytest.mark.parametrize("budget", [1, 10, 63])
def test_a_plan_never_exceeds_a_budget_below_the_smallest_candidate(budget):
    """planned_sample_size's candidates start at min(64, budget): a budget below 64 caps every plan (the service
    draws the planned n; more than the budget is more than the caller allowed). Bug guarded against (run against it,
    this test failed): the first candidate taken as 64 whatever the budget - a plan of 64 samples for a budget of 10."""
    from smoothing import planned_sample_size

    for a, b in ((1.0, 1.0), (99.0, 1.0), (0.5, 0.5)):
        assert planned_sample_size(a, b, sigma=0.25, alpha=0.001, budget=budget) <= budget
    plans = planned_sample_size(np.array([1.0, 50.0]), np.array([1.0, 0.1]), sigma=0.5, alpha=0.01, budget=budget)
    assert np.all(plans <= budget) and np.all(plans >= 1)


def test_an_expected_radius_above_the_all_hits_radius_counts_as_the_all_hits_radius(monkeypatch):
    """The plan clips each expected radius to [0, the all-hits radius sigma Phi^-1(alpha^(1/n))] (no expected CP
    radius can exceed it; beyond it the predictive has cancelled numerically), so a runaway (infinite) expected radius
    plans exactly as the all-hits radius does. Bug guarded against (run against it, this test failed): the clip
    dropped - inf - lambda n is inf at every n, and the plan stuck at the first candidate (64) instead of the all-hits
    optimum."""
    import smoothing.fixed as fixed
    from smoothing import radius_from_probability

    kw = {"sigma": 0.5, "alpha": 0.001, "budget": 5000, "min_gain": 1e-4}
    monkeypatch.setattr(fixed, "expected_radius", lambda a, b, n, sigma, alpha, w: np.full(len(a), np.inf))
    runaway = fixed.planned_sample_size(1.0, 1.0, **kw)
    monkeypatch.setattr(fixed, "expected_radius", lambda a, b, n, sigma, alpha, w: np.full(
        len(a), radius_from_probability(alpha ** (1.0 / n), sigma)))
    all_hits = fixed.planned_sample_size(1.0, 1.0, **kw)
    assert runaway == all_hits > 64


def test_the_kt_weight_goes_to_the_kt_component():
    """expected_radius mixes (1 - w) BetaBinomial(n, a, b) + w BetaBinomial(n, 1/2, 1/2): w = 1 is the KT predictive
    alone whatever (a, b), and w = 0.25 the 3:1 mix. Bug guarded against (run against it, this test failed): the
    weights swapped (w on the input's own prior, 1 - w on KT) - the default kt_weight planned mostly from KT."""
    from smoothing.fixed import expected_radius

    a, b = np.array([99.0, 2.0]), np.array([1.0, 3.0])
    own = expected_radius(a, b, 300, 0.5, 0.001, 0.0)
    kt = expected_radius(np.array([0.5]), np.array([0.5]), 300, 0.5, 0.001, 0.0)
    np.testing.assert_allclose(expected_radius(a, b, 300, 0.5, 0.001, 1.0), np.broadcast_to(kt, 2), rtol=1e-12)
    np.testing.assert_allclose(expected_radius(a, b, 300, 0.5, 0.001, 0.25), 0.75 * own + 0.25 * kt, rtol=1e-12)
    assert abs(own[0] - kt[0]) > 0.05  # the two components differ: the checks above can tell them apart


def test_a_plan_with_nothing_to_gain_spends_the_fewest_samples(monkeypatch):
    """With lambda = 0 and an expected radius of exactly 0 at every n (a prior with no mass where the CP radius is
    positive; here an expected radius stubbed to 0, or NaN, which the plan reads as 0), every candidate's objective
    is 0: the plan keeps the first (smallest) candidate, the strict ``gain > best``. Bug guarded against (run against
    it, this test failed): ``gain >= best`` - ties went to the largest candidate, the whole budget spent on an input
    with nothing to certify."""
    import smoothing.fixed as fixed

    kw = {"sigma": 0.25, "alpha": 0.001, "budget": 20000, "min_gain": 0.0}
    for value in (0.0, np.nan):
        monkeypatch.setattr(fixed, "expected_radius", lambda a, b, n, sigma, alpha, w, v=value: np.full(len(a), v))
        assert fixed.planned_sample_size(1.0, 1.0, **kw) == 64
        assert fixed.planned_sample_size(np.array([1.0, 5.0]), np.array([1.0, 2.0]), **kw).tolist() == [64, 64]


def test_pruning_waits_for_the_input_with_the_lowest_objective(monkeypatch):
    """The plan stops scanning candidates only when no remaining n can beat ANY input's best objective
    (``reachable < best.min()``): an input whose expected radius keeps paying at larger n must get the same plan in
    a batch as alone. Stub: input a = 1 gets the all-hits radius (the highest objective, optimum ~3,000 samples),
    input a = 2 a radius of 2 lambda n (clipped at the all-hits radius: a lower objective that keeps growing to
    ~19,000 samples). Bug guarded against (run against it, this test failed): pruning against ``best.max()`` - the
    all-hits input's optimum cut the scan and the other input got a smaller n in the batch than alone."""
    import smoothing.fixed as fixed
    from smoothing import radius_from_probability

    lam = 1e-4
    monkeypatch.setattr(fixed, "expected_radius", lambda a, b, n, sigma, alpha, w: np.where(
        a == 1.0, radius_from_probability(alpha ** (1.0 / n), sigma), 2 * lam * n))
    # the stub's radii are no prior's expected radius, so the per-prior bound (fixed._radius_bounds) does not hold
    # for them: prune by the all-hits radius alone, as the scan did when this test was written
    monkeypatch.setattr(fixed, "_radius_bounds", lambda a, b, w, candidates, ceiling, sigma, full: np.array(full))
    kw = {"sigma": 1.0, "alpha": 0.001, "budget": 10**6, "min_gain": lam}
    alone = [fixed.planned_sample_size(a, 1.0, **kw) for a in (1.0, 2.0)]
    assert alone[1] > 2 * alone[0]
    assert fixed.planned_sample_size(np.array([1.0, 2.0]), np.array([1.0, 1.0]), **kw).tolist() == alone


# ------------------------------------------------------------------------------------------ conformal: ranks
def test_the_training_conditional_rank_matches_the_binomial_tail():
    """training_conditional_rank is the smallest k with P(Beta(k, m + 1 - k) <= 1 - delta) <= gamma; by the
    order-statistic identity that is P(Binomial(m, 1 - delta) >= k) <= gamma, computed here independently (m + 1
    where no k suffices). Bug guarded against (run against it, this test failed): the Beta's second parameter taken as
    m + 2 - k (the coverage of m + 1 scores) - a different, larger rank at many (m, delta, gamma)."""
    from scipy.stats import binom

    from smoothing import training_conditional_rank

    for m in (1, 5, 19, 20, 99, 100, 500, 1000):
        for delta in (0.01, 0.05, 0.1, 0.3):
            for gamma in (0.01, 0.1, 0.5, 0.9):
                ks = np.arange(1, m + 1)
                ok = binom.sf(ks - 1, m, 1.0 - delta) <= gamma * (1 + 1e-9)
                tight = np.abs(binom.sf(ks - 1, m, 1.0 - delta) - gamma) <= 1e-9 * gamma
                if tight.any():
                    continue  # a tie at gamma: the two formulas may round apart; none on this grid in practice
                want = int(ks[ok][0]) if ok.any() else m + 1
                assert training_conditional_rank(m, delta, gamma) == want, (m, delta, gamma)


def test_the_training_conditional_rank_accepts_a_tail_exactly_at_gamma():
    """The rank's condition is P(coverage < 1 - delta) <= gamma, not <: where the Beta tail equals gamma exactly (in
    floating point too: Beta(1, 1) and Beta(2, 1) at 0.75 and 0.5) that rank qualifies. Bug guarded against (run
    against it, this test failed): a strict ``< gamma`` - one rank higher, here m + 1 (an abstaining bin)."""
    from smoothing import training_conditional_rank

    assert training_conditional_rank(1, 0.25, 0.75) == 1  # P(U < 0.75) = 0.75
    assert training_conditional_rank(2, 0.5, 0.25) == 2  # P(max of 2 uniforms < 0.5) = 0.25


# ------------------------------------------------------------------------------------------ conformal: labels
def test_a_calibration_label_below_one_half_is_clipped_to_zero():
    """probit_labels returns z_i = max(Phi^-1(l_i), 0): a label whose CP bound is at most 1/2 is 0 (never negative,
    never -inf for 0 hits, which would make the score +inf and the fit refuse its scores as non-finite). Bug guarded
    against (run against it, this test failed): the clip at 0 dropped - negative labels, -inf for 0 hits."""
    from scipy.special import ndtri

    from smoothing import clopper_pearson_lower, probit_labels

    counts = np.array([0, 10, 50, 100, 1000])
    labels = probit_labels(counts, 1000, 0.001)
    assert labels[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert labels[4] == ndtri(clopper_pearson_lower(1000, 1000, 0.001)) > 0


def test_repeated_knots_are_refused():
    """The point-estimate and scale maps need strictly increasing knots: with a repeated knot np.interp's value there
    is whichever of the two values it happens to pick (a jump the tuning fit never made). Bug guarded against (run
    against it, this test failed): ``np.diff(knots) < 0`` - equal knots accepted by piecewise and conformal_lower."""
    from smoothing import conformal_lower
    from smoothing.conformal import piecewise

    with pytest.raises(ValueError, match="strictly increasing"):
        piecewise([0.5], [0.0, 1.0, 1.0], [0.0, 0.2, 2.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        conformal_lower([1.0], knots=[0.0, 1.0, 1.0], values=[0.0, 0.2, 2.0], scale=[1.0, 1.0, 1.0], edges=[0.0],
                        q_hat=[0.1, 0.1])
