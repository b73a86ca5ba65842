"""Cross-checks of the fixed-sample parts of :mod:`smoothing` against independent implementations and published numbers.

* Clopper-Pearson vs ``scipy.stats.beta.ppf`` and ``statsmodels.proportion_confint(method="beta")`` (rtol 1e-10),
  rounded in the conservative direction.
* ``certify`` vs the reference semantics of locuslab/smoothing ``core.py`` (/work/shared/anchors.md): argmax selection,
  nA from the estimation counts, statsmodels CP bound at alpha=2*alpha, abstain when p_lower < 1/2 (ours: <= 1/2,
  see ``test_certify_abstains_when_the_bound_is_exactly_one_half``), radius sigma * norm.ppf(p_lower).
* ``predict`` vs the reference: top-2 counts, ``scipy.stats.binomtest(nA, nA+nB, 0.5).pvalue > alpha`` -> abstain.
* Radius conversions vs ``scipy.stats.norm``; conformal rank vs exact rational arithmetic.
* The reference points of design.md ("Statistics") and anchors.md, within +-0.01.
"""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath as mp
import numpy as np
import pytest
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from smoothing import (
    ABSTAIN,
    certified_radius,
    certify,
    clopper_pearson_lower,
    clopper_pearson_upper,
    conformal_quantile,
    conformal_rank,
    level_split,
    min_calibration_size,
    predict,
    probability_for_radius,
    radius_from_probability,
)


def _cp_grid():
    rows = []
    for n in (1, 2, 5, 10, 37, 100, 1000, 10_000, 100_000):
        ks = np.unique(np.r_[0, 1, 2, n // 3, n // 2, n - 2, n - 1, n, np.linspace(0, n, 25).astype(int)])
        rows += [(int(k), n) for k in ks if 0 <= k <= n]
    return np.array(rows).T


@pytest.mark.parametrize("alpha", [1e-10, 1e-6, 0.001, 0.025, 0.05, 0.3])
def test_clopper_pearson_matches_scipy_beta_ppf(alpha):
    """lower = Beta(k, n-k+1).ppf(alpha) (0 at k=0), upper = Beta(k+1, n-k).isf(alpha) (1 at k=n), rtol 1e-10
    (upper: 2e-9, since its confirmation keeps a 1e-9 margin on the tail; it may only be larger than the reference).
    (isf, not ppf(1 - alpha): forming 1 - alpha loses ~1e-10 relative at alpha = 1e-10.)"""
    k, n = _cp_grid()
    lo, up = clopper_pearson_lower(k, n, alpha), clopper_pearson_upper(k, n, alpha)
    with np.errstate(invalid="ignore"):
        ref_lo = np.where(k == 0, 0.0, beta_dist.ppf(alpha, np.maximum(k, 1), n - k + 1))
        ref_up = np.where(k == n, 1.0, beta_dist.isf(alpha, k + 1, np.maximum(n - k, 1)))
    np.testing.assert_allclose(lo, ref_lo, rtol=1e-10, atol=0)
    np.testing.assert_allclose(up, ref_up, rtol=2e-9, atol=0)
    assert np.all(up >= ref_up * (1 - 1e-12))  # the margin only ever moves the upper bound up


@pytest.mark.parametrize("alpha", [1e-10, 1e-6, 0.001, 0.05, 0.2])
def test_clopper_pearson_matches_statsmodels(alpha):
    """Parity with statsmodels ``proportion_confint(k, n, alpha=2*alpha, method="beta")`` (the reference's
    lower_confidence_bound) to rtol 1e-10 (upper: 2e-9, its confirmation margin), with 0 and 1 exactly at k = 0 and
    k = n."""
    k, n = _cp_grid()
    ref_lo, ref_up = proportion_confint(k, n, alpha=2 * alpha, method="beta")
    lo, up = clopper_pearson_lower(k, n, alpha), clopper_pearson_upper(k, n, alpha)
    np.testing.assert_allclose(lo, ref_lo, rtol=1e-10, atol=0)
    np.testing.assert_allclose(up, ref_up, rtol=2e-9, atol=0)
    assert np.all(up >= ref_up * (1 - 1e-12))  # the margin only ever moves the upper bound up
    assert np.all((lo == 0) == (k == 0)) and np.all(up[k == n] == 1)
    # below k = n, U is 1 only where rounding it up (relative 1e-12) reaches 1: the exact bound is within 1e-11 of 1
    assert np.all(ref_up[(up == 1) & (k < n)] > 1 - 1e-11)


@pytest.mark.parametrize("alpha", [1e-10, 1e-6, 0.001, 0.05, 0.3])
def test_clopper_pearson_is_conservative_in_exact_arithmetic(alpha):
    """The docstrings promise bounds rounded in the conservative direction. Checked exactly (mpmath, 40 digits) at the
    returned value: P(Bin(n, L) >= k) <= alpha  (so L <= exact lower bound) and P(Bin(n, U) <= k) <= alpha
    (so U >= exact upper bound)."""
    mp.mp.dps = 40
    a = mp.mpf(alpha)
    offenders = []
    for n in (1, 5, 37, 100, 1000):
        for k in sorted({0, 1, n // 2, n - 1, n}):
            lo, up = clopper_pearson_lower(k, n, alpha), clopper_pearson_upper(k, n, alpha)
            if k > 0 and mp.betainc(k, n - k + 1, 0, mp.mpf(lo), regularized=True) > a:
                offenders.append(("lower", k, n, lo))
            if k < n and mp.betainc(n - k, k + 1, 0, 1 - mp.mpf(up), regularized=True) > a:
                offenders.append(("upper", k, n, up))
    assert not offenders, f"{len(offenders)} bounds on the wrong side of the exact one at alpha={alpha}: {offenders[:4]}"


def _exact_binomial_tail(n: int, k: int, p: float):
    """P(Bin(n, p) >= k) = P(misses <= n - k), summed term by term at 60 digits (for k close to n)."""
    with mp.workdps(60):
        p = mp.mpf(p)
        term = total = p ** n
        for j in range(1, n - k + 1):
            term = term * (n - j + 1) / j * (1 - p) / p
            total += term
        return total


@pytest.mark.parametrize("n, alpha", [(2_000_000, 0.01), (10_000_000, 0.001), (100_000_000, 0.001)])
def test_clopper_pearson_lower_is_confirmed_where_the_inverse_errs(n, alpha):
    """scipy's betaincinv errs by up to ~1e-8 relative with a second parameter of exactly 1,000 (999 misses): the
    bound must still be at most the exact one, P(Bin(n, L) >= k) <= alpha, summed exactly. Run against the bound
    straight from the inverse (before 2026-12-05): the tail was 1.0000066 / 1.0000012 / 1.043 alpha; this test
    failed (found by review)."""
    k = n - 999
    lower = clopper_pearson_lower(k, n, alpha)
    assert _exact_binomial_tail(n, k, lower) <= alpha, lower
    assert lower > clopper_pearson_lower(k - 5, n, alpha)  # still a bound, not a collapse to 0


@pytest.mark.parametrize("misses", [999, 1000, 1001])
def test_clopper_pearson_upper_is_confirmed_where_the_inverse_errs(misses):
    """The upper bound U of n - m hits must satisfy P(Bin(n, U) <= n - m) <= alpha (else a p just above U is missed
    too often), at n = 1e8 where scipy's inverse errs. Exact CDF at 60 digits. Run against the upper bound straight
    from betainccinv (before 2026-12-06): 1,000 misses gave 1.00066 alpha; this test failed (found by review)."""
    n, alpha = 100_000_000, 0.001
    upper = clopper_pearson_upper(n - misses, n, alpha)
    with mp.workdps(60):
        assert mp.betainc(misses, n - misses + 1, 0, 1 - mp.mpf(upper), regularized=True) <= mp.mpf(alpha), upper
    assert upper < clopper_pearson_upper(n - misses + 5, n, alpha)  # a bound, not a collapse to 1


@pytest.mark.parametrize("hits, n, alpha", [(2, 1_000_000_000, 1e-6), (5, 1_000_000_000, 0.05),
                                             (2, 100_000_000, 1e-15), (10, 100_000_000, 0.3)])
def test_clopper_pearson_upper_holds_with_few_hits_in_many_draws(hits, n, alpha):
    """Few hits in up to 1e9 draws: scipy's betaincc (first parameter hits + 1, second ~n) errs by ~1e-11 relative,
    more than a 1e-12 confirmation margin covers. P(Bin(n, U) <= hits) <= alpha, summed exactly at 50 digits. Run
    against the 1e-12 margin (before 2026-12-06): all four failed, the tail exceeding alpha by 1.4e-11, 5.7e-12,
    2.9e-13 and 5.3e-13 relative (found by a sweep of n in 1e5..2^31, 8 hit counts, 7 alphas)."""
    upper = clopper_pearson_upper(hits, n, alpha)
    with mp.workdps(50):
        p = mp.mpf(upper)
        tail = mp.fsum(mp.binomial(n, j) * p ** j * (1 - p) ** (n - j) for j in range(hits + 1))
        assert tail <= mp.mpf(alpha), (upper, float(tail / alpha - 1))
    assert upper < clopper_pearson_upper(hits + 3, n, alpha)  # a bound, not a collapse to 1


@pytest.mark.parametrize("s, n, alpha", [(4, 12_306_095, 0.6246078747900135), (14, 1_622_554_699, 0.5435)])
def test_clopper_pearson_lower_holds_above_alpha_one_half_with_few_hits(s, n, alpha):
    """alpha > 1/2 with few hits in many draws: scipy's betainc near 1 loses ~1e-8 relative, so the forward check
    passed bounds above the exact one; the complement (betaincc) confirms it. Exact I_L(s, n - s + 1) by mpmath at
    50 digits. Run against the code before 2026-12-05: the first case failed (I_L / alpha - 1 = +4.4e-11; found by
    review); the second, reported by the review at +3.6e-8, passes there by this 50-digit check and stays as a case."""
    lower = clopper_pearson_lower(s, n, alpha)
    with mp.workdps(50):
        assert mp.betainc(s, n - s + 1, 0, mp.mpf(lower), regularized=True) <= mp.mpf(alpha), lower
    assert lower > 0.9 * clopper_pearson_lower(s, n, 0.5)  # still a bound, not a collapse to 0


def test_clopper_pearson_lower_refuses_alpha_below_its_floor():
    """Below ~1e-100 scipy's incomplete beta is off by orders of magnitude (at alpha = 7.9e-299 the bound was 0.786,
    exact 0.756: a radius 15% too large; others came back NaN). A bound, a certificate and the server's default
    alpha all refuse alpha < 1e-15. Run against the code before 2026-12-05: the bound 0.786 was returned."""
    from server.settings import Settings

    with pytest.raises(ValueError, match="at least 1e-15"):
        clopper_pearson_lower(2920, 2953, 7.884796164750672e-299)
    with pytest.raises(ValueError, match="at least 1e-15"):
        certify(np.array([0, 2953]), np.array([0, 2953]), 1e-16, 0.25)
    with pytest.raises(ValueError, match="at least 1e-15"):
        Settings(default_alpha=1e-16)
    assert clopper_pearson_lower(2920, 2953, 1e-15) > 0.9


def test_clopper_pearson_scalar_and_vector_agree():
    """Scalars in -> Python floats out; vectorized results equal element-wise calls."""
    k = np.array([0, 3, 7, 10])
    vec = clopper_pearson_lower(k, 10, 0.05)
    assert isinstance(clopper_pearson_lower(3, 10, 0.05), float)
    assert [clopper_pearson_lower(int(x), 10, 0.05) for x in k] == list(vec)


def reference_certify(sel, est, alpha, sigma):
    """locuslab/smoothing core.py CERTIFY given the two count vectors (anchors.md), with the abstain rule made strict
    (p_lower <= 1/2; the reference has < 1/2, which differs only where the bound is exactly 1/2)."""
    c_a = int(sel.argmax())
    n_a, n = int(est[c_a]), int(est.sum())
    p_a_bar = proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0]
    if p_a_bar <= 0.5:
        return ABSTAIN, 0.0, p_a_bar
    return c_a, sigma * norm.ppf(p_a_bar), p_a_bar


@pytest.mark.parametrize("alpha,sigma", [(0.001, 0.25), (0.01, 0.5), (0.1, 1.0)])
def test_certify_parity_with_reference(alpha, sigma):
    """Per row: same class (or abstain), p_lower (1e-9 relative) and radius (1e-9 relative or 1e-10 absolute) equal to
    the reference and never larger; the batched call equals row-by-row calls."""
    rng = np.random.default_rng(17)
    k, rows = 5, 400
    top = rng.uniform(0.3, 0.8, rows)  # pA around the abstention threshold 1/2 so both outcomes occur
    probs = np.c_[top, (1 - top)[:, None] * rng.dirichlet(np.ones(k - 1), size=rows)]
    sel = np.stack([rng.multinomial(20, p) for p in probs])
    sel[:20, 1] = sel[:20, 0]  # ties in the selection counts: the first index must win
    est = np.stack([rng.multinomial(int(rng.choice([50, 1000, 10_000])), p) for p in probs])
    cert = certify(sel, est, alpha, sigma)
    n_certified = 0
    for i in range(rows):
        cls, radius, p_lower = reference_certify(sel[i], est[i], alpha, sigma)
        assert cert.class_index[i] == cls, i
        assert cert.certified[i] == (cls != ABSTAIN)
        assert cert.p_lower[i] <= p_lower and cert.p_lower[i] == pytest.approx(p_lower, rel=1e-9, abs=0)
        # near p = 1/2 the 1e-12 relative rounding of p_lower moves Phi^-1 by up to ~1e-11 absolute
        assert cert.radius[i] <= radius + 1e-15 and cert.radius[i] == pytest.approx(radius, rel=1e-9, abs=1e-10)
        n_certified += cls != ABSTAIN
        one = certify(sel[i], est[i], alpha, sigma)
        assert (one.class_index, one.radius) == (cert.class_index[i], cert.radius[i])
    assert 50 < n_certified < rows - 50, "the sample must contain both certified and abstaining rows"


def test_certify_abstains_when_the_bound_is_exactly_one_half():
    """p_lower == 1/2 only says pA >= 1/2: a tie pA = pB = 1/2 is not excluded, so the class is not certified even at
    radius 0 (abstain), as on the sequential path (L_t > 1/2). alpha = 0.2500000000005001 makes the bound of 2 hits in 2
    trials exactly 0.5 after the conservative rounding. Run against the bug once (2026-12-04): with the reference's
    rule (abstain only when p_lower < 1/2) it failed (class 0 certified at radius 0.0)."""
    alpha = 0.2500000000005001
    assert clopper_pearson_lower(2, 2, alpha) == 0.5
    cert = certify(np.array([1, 0]), np.array([2, 0]), alpha, 0.25)
    assert cert.p_lower == 0.5
    assert cert.class_index == ABSTAIN and not cert.certified and cert.radius == 0.0
    above = certify(np.array([1, 0]), np.array([2, 0]), np.nextafter(alpha, 1.0), 0.25)
    assert above.p_lower > 0.5 and above.certified and above.class_index == 0  # just above 1/2: certified


def test_certify_selection_is_independent_of_estimation_argmax():
    """The class comes from the selection counts even when the estimation counts favour another class."""
    cert = certify(np.array([6, 4]), np.array([100, 900]), 0.001, 0.25)
    assert cert.class_index == ABSTAIN and not cert.certified and cert.radius == 0.0  # class 0 has only 100/1000
    cert = certify(np.array([4, 6]), np.array([100, 900]), 0.001, 0.25)
    assert cert.class_index == 1 and cert.certified and cert.radius > 0


def reference_predict(counts, alpha):
    top2 = counts.argsort()[::-1][:2]
    n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]])
    return ABSTAIN if binomtest(n_a, n_a + n_b, p=0.5).pvalue > alpha else int(top2[0])


@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_predict_parity_with_binomtest(alpha):
    """PREDICT equals the reference on random count vectors (including many ties and near ties), per row and batched."""
    rng = np.random.default_rng(23)
    counts = np.stack([rng.multinomial(int(rng.choice([2, 10, 100, 1000])), rng.dirichlet(np.full(4, 0.7)))
                       for _ in range(500)])
    counts[:50, 1] = counts[:50, 0]  # exact ties
    counts[50:100, 1] = np.maximum(counts[50:100, 0] - 1, 0)  # near ties
    counts = counts[np.sort(counts, axis=1)[:, -2:].sum(axis=1) > 0]  # binomtest needs nA + nB >= 1 (see below)
    ref = np.array([reference_predict(c, alpha) for c in counts])
    assert np.array_equal(predict(counts, alpha), ref)
    assert all(predict(counts[i], alpha) == ref[i] for i in range(0, len(counts), 7))
    assert 0 < np.sum(ref == ABSTAIN) < len(counts) - 50


def test_predict_abstains_without_any_top_two_counts():
    assert predict(np.array([0, 0, 0]), 0.05) == ABSTAIN


def test_radius_conversions_match_scipy_norm():
    """radius = sigma * norm.ppf(p) for p > 1/2 (rounded down by <= 1e-10 relative), 0 at p <= 1/2 and at p = 1;
    probability_for_radius = norm.cdf(r / sigma)."""
    p = np.r_[0.0, 0.3, 0.5, np.nextafter(0.5, 1), 0.6, 0.9, 0.999, 0.999999, 1 - 1e-15]
    for sigma in (0.12, 0.25, 1.0):
        r = radius_from_probability(p, sigma)
        ref = np.where(p > 0.5, sigma * norm.ppf(np.clip(p, 0.5, 1)), 0.0)
        assert np.all(r <= ref) and np.allclose(r, ref, rtol=1e-9, atol=0)
        assert radius_from_probability(1.0, sigma) == 0.0
        radii = np.array([0.0, 0.1, 0.5, 1.0])
        np.testing.assert_allclose(probability_for_radius(radii, sigma), norm.cdf(radii / sigma), rtol=1e-14)


def test_conformal_rank_is_exact():
    """k = ceil((m+1)(1-delta)) in exact rational arithmetic of the given float delta (no float round-off at
    integer products such as m=9, delta=0.1); q_hat is the k-th smallest score; +inf when k > m."""
    rng = np.random.default_rng(5)
    for m in (1, 9, 19, 99, 100, 999, 12_345):
        for delta in (0.5, 0.1, 0.05, 0.01, 0.001, 1 / 3):
            exact = (m + 1) * (1 - Fraction(delta))
            k = conformal_rank(m, delta)
            assert k == math.ceil(exact) and k - 1 < exact <= k
            scores = rng.standard_normal(m)
            q = conformal_quantile(scores, delta)
            assert q == (math.inf if k > m else np.sort(scores)[k - 1])


@pytest.mark.parametrize("delta", [0.5, 0.2, 0.1, 0.05, 0.01, 0.003, 0.001, 1e-4])
def test_min_calibration_size_is_minimal(delta):
    """min_calibration_size(delta) = smallest m with a finite q_hat, i.e. m >= 1/delta - 1 (design.md)."""
    m = min_calibration_size(delta)
    assert conformal_rank(m, delta) <= m
    assert m == 1 or conformal_rank(m - 1, delta) > m - 1
    assert m >= 1 / delta - 1 - 1e-9 and math.isfinite(conformal_quantile(np.arange(m, dtype=float), delta))


# design.md "Reference points" (one-sided, alpha = 0.001, sigma = 0.25, observed rate = pA) and anchors.md.
ANCHORS = [
    ("KT, pA=0.999, 1k", {"s": 999, "t": 1000}, 0.55),
    ("KT, pA=0.999, 2k", {"s": 1998, "t": 2000}, 0.60),
    ("prior@truth 200, pA=0.999, 1k", {"s": 999, "t": 1000, "a": 199.8, "b": 0.2}, 0.57),
    ("KT, pA=0.99, 1k", {"s": 990, "t": 1000}, 0.463),
    ("prior@truth 200, pA=0.99, 1k", {"s": 990, "t": 1000, "a": 198.0, "b": 2.0}, 0.478),
]


@pytest.mark.parametrize("label,kw,expected", ANCHORS, ids=[a[0] for a in ANCHORS])
def test_sequence_reference_points(label, kw, expected):
    r = certified_radius(kw["s"], kw["t"], 0.001, 0.25, kw.get("a", 0.5), kw.get("b", 0.5))
    assert abs(r - expected) <= 0.01, f"{label}: radius {r:.4f}, design.md says ~{expected}"


@pytest.mark.parametrize("n_a,n,expected", [(9990, 10_000, 0.705), (9900, 10_000, 0.553)])
def test_cohen_10k_reference_points(n_a, n, expected):
    cert = certify(np.array([100, 0]), np.array([n_a, n - n_a]), 0.001, 0.25)
    assert cert.class_index == 0 and abs(cert.radius - expected) <= 0.01, cert


@pytest.mark.parametrize("n,max_radius_over_sigma", [(1000, 2.46), (10_000, 3.20), (100_000, 3.81)])
def test_cohen_largest_possible_radius(n, max_radius_over_sigma):
    """anchors.md: the largest radius at alpha = 0.001 (all n samples hit) is 2.46 / 3.20 / 3.81 sigma."""
    cert = certify(np.array([1, 0]), np.array([n, 0]), 0.001, 1.0)
    assert abs(cert.radius - max_radius_over_sigma) <= 0.01


def test_a_levels_parts_never_exceed_it_in_exact_arithmetic():
    """delta + alpha_1 <= alpha exactly (the union bound's total is the stated level). Run against the code before
    2026-12-05: for 0.01 and 0.005 the floating-point sum exceeded alpha by ~1e-18; this test failed (found by review)."""
    rng = np.random.default_rng(5)
    for alpha in [0.1, 0.05, 0.01, 0.005, 0.001, *rng.uniform(1e-6, 0.5, 2000)]:
        delta, alpha_1 = level_split(float(alpha))
        assert Fraction(delta) + Fraction(alpha_1) <= Fraction(float(alpha)), alpha
        assert delta > 0.85 * alpha
