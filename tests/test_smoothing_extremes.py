"""Extreme inputs of the smoothing core, checked against exact (mpmath) values (review of the statistical core).

* Radii in the subnormal range: a product rounded to a multiple of 5e-324 can exceed the exact radius by up to ~2x,
  which the relative rounding down (1e-10) cannot cover; such radii must be reported as 0 (abstain).
* Cohen's certify: the estimation total summed in int64 wrapped around (a positive radius for an estimate of 1/5).
* The confidence sequence L_t at the corners of its domain (t up to 2^31, S in {0, 1, t/2, t - 1, t}, alpha from
  5e-324 to 1 - 2^-53, a, b from 1e-3 to 1e300, kt_weight 0 / default / 1): exact log E_t(L_t) >= log(1/alpha) and
  L_t <= S/t, and the float path bit for bit equal to the vectorized kernel.
* The TARGET code's shortfall in radius, as target_radius_decision documents it.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import mpmath as mp
import numpy as np
import pytest
from scipy.special import ndtr

from smoothing import (DEFAULT_KT_WEIGHT, certify, lower_bound, radius_from_probability, radius_from_probit,
                       target_radius_decision)
from smoothing.confseq import _lower_bound_kernel
from smoothing.kernels import lower_bound_one as _lower_bound_one
from smoothing.kernels import radius_one as validated_radius_one  # the compiled rule's conversion
from smoothing.radius import validated_radius


def _exact_radius(p, sigma):
    with mp.workdps(50):
        return mp.mpf(sigma) * mp.sqrt(2) * mp.erfinv(2 * mp.mpf(p) - 1)


@pytest.mark.parametrize("sigma", [5e-324, 1e-323, 3e-322, 2e-310, 1e-300, 3e-308])
def test_radius_is_never_above_the_exact_one_for_tiny_sigma(sigma):
    """radius_from_probability rounds down, also where sigma * Phi^-1(p) is subnormal (or sigma itself is). Failed on
    the old code: sigma = 1e-323, p = 0.6 gave 5e-324 for an exact 2.50e-324 (ratio 1.97); sigma = 1e-300,
    p = 0.5000000000000001 gave 2.78291645e-316 for an exact 2.78291642467e-316 (ratio 1 + 8.7e-9)."""
    ps = np.array([0.5000000000000001, 0.5000000000000039, 0.6, 0.75, 0.8413447460685429, 0.9, 0.99, 0.999999,
                   1 - 2**-52])
    radii = radius_from_probability(ps, sigma)
    for p, r in zip(ps, radii):
        assert r == validated_radius_one(float(p), sigma) == validated_radius(np.array([p]), sigma)[0]
        assert mp.mpf(r) <= _exact_radius(p, sigma), (p, sigma, r)


def test_probit_radius_is_never_above_the_exact_one_when_subnormal():
    """radius_from_probit(z, sigma) <= sigma z exactly. Failed on the old code: (0.3, 1e-323) gave 5e-324 for an exact
    3e-324 (ratio 1.67)."""
    for z, sigma in [(0.3, 1e-323), (2.5, 3e-322), (1e-310, 0.7), (1e-300, 1e-10), (1.5, 2e-308)]:
        r = radius_from_probit(z, sigma)
        assert Fraction(r) <= Fraction(z) * Fraction(sigma), (z, sigma, r)


def test_certify_refuses_estimation_totals_that_overflow_int64():
    """Five classes of 2^62 estimation counts: the int64 total wrapped around to 2^62, the top class's own count, so
    Clopper-Pearson saw all hits (p_lower 0.999999999999, radius 1.76 at sigma 0.25) for an estimate of 1/5. Failed on
    the old code (it returned that certificate); totals of 2^62 and more are now refused. (Here five counts of 2^61:
counts of 2^62 are now refused on their own, with the counts' message, not the total's.)"""
    with pytest.raises(ValueError, match="total below 2\\^62"):
        certify([1, 0, 0, 0, 0], [2**61] * 5, 0.001, 0.25)  # each below the counts' limit 2^62, the total not
    with pytest.raises(ValueError):
        certify([[1, 0], [0, 1]], [[2**62, 5], [3, 4]], 0.001, 0.25)
    ok = certify([9, 1], [990, 10], 0.001, 0.25)  # ordinary counts still certify
    assert ok.class_index == 0 and ok.radius > 0


def _exact_excess(s, t, p, alpha, a, b, w):
    """Exact log E_t(p) - log(1/alpha), prior (1 - w) Beta(a, b) + w KT, by log-gamma at the working precision."""
    f, p = t - s, mp.mpf(p)

    def lbeta(x, y):
        return mp.loggamma(x) + mp.loggamma(y) - mp.loggamma(x + y)

    comps = [(1 - mp.mpf(w), mp.mpf(a), mp.mpf(b))] if w < 1 else []
    if w > 0:
        comps.append((mp.mpf(w), mp.mpf(0.5), mp.mpf(0.5)))
    terms = [mp.log(wk) + lbeta(ak + s, bk + f) - lbeta(ak, bk) for wk, ak, bk in comps]
    top = max(terms)
    log_m = top + mp.log(mp.fsum(mp.exp(x - top) for x in terms))
    return log_m - s * mp.log(p) - f * mp.log1p(-p) + mp.log(mp.mpf(alpha))


def test_lower_bound_is_exactly_valid_at_the_corners_of_its_domain():
    """Guards the confidence sequence at extreme inputs (found sound by the review: passed on the code it reviewed).
    Every returned L_t > 0 satisfies the module's definition exactly (60 digits): log E_t(L_t) >= log(1/alpha) and
    L_t <= S/t; _lower_bound_one equals the array kernel bit for bit; bounds are finite in [0, 1]."""
    ts = [1, 2, 10, 1000, 10**7, 2**31]
    alphas = [5e-324, 1e-300, 1e-15, 0.05, 0.999, 1 - 2**-53]
    priors = [1e-3, 1.0, 1e6, 1e300]
    pts = [(s, t, alpha, a, b) for t in ts for s in sorted({0, 1, t // 2, t - 1, t})
           for alpha, a, b in itertools.product(alphas, priors, priors)]
    s, t, alpha, a, b = (np.array(col) for col in zip(*pts))
    with mp.workdps(60):
        for w in (0.0, DEFAULT_KT_WEIGHT, 1.0):
            with np.errstate(all="ignore"):
                vec = _lower_bound_kernel(s.astype(np.int64), t.astype(np.int64), alpha, a, b, w)
            for i, (si, ti, al, ai, bi) in enumerate(pts):
                one = _lower_bound_one(si, ti, al, ai, bi, w)
                assert one == vec[i], (si, ti, al, ai, bi, w, one, vec[i])
                assert 0.0 <= one <= 1.0
                if one > 0:
                    assert Fraction(one) * ti <= si, (si, ti, al, ai, bi, w, one)
                    assert _exact_excess(si, ti, one, al, ai, bi, w) >= 0, (si, ti, al, ai, bi, w, one)


@pytest.mark.parametrize("s, t, alpha, a, b, target, max_shortfall", [
    # near p = 1/2: L_t's step back (>= 1e-12 |log p|) costs ~1e-12 sigma absolute, 3.4% of this tiny target
    (77376606, 154261537, 1.2493188518514945e-16, 440.8814546218009, 2384.6717191660737, 2.5685901162256708e-11,
     2e-12),
    # near p = 1: the step back's floor of 1e-15 in log p is a part 2e-6 of 1 - p: 1.5e-7 sigma, 2.5e-8 relative
    (1310913179, 1310913179, 0.29508231483168856, 4558.537091671585, 0.009500374135077273, 5.994204228636145, 3e-7),
])
def test_target_code_shortfall_is_within_the_documented_rounding(s, t, alpha, a, b, target, max_shortfall):
    """TARGET claims the certificate issued at the same (S, t) has radius >= r up to L_t's rounding. The docstring
    said "~1e-8 relative near p = 1/2"; the shortfall is ~1e-12 sigma ABSOLUTE there (3.4% of r = 2.6e-11 sigma) and
    2.5e-8 relative near p = 1 at t ~ 2^30. Documents the corrected statement (the code is unchanged: the
    certificate is valid, only smaller than the target by this rounding); sigma = 1, kt_weight = 0."""
    assert target_radius_decision(s, t, sigma=1.0, target_radius=target, alpha=alpha, budget=2**31, a=a, b=b,
                                  kt_weight=0.0) == 1
    radius = radius_from_probability(lower_bound(s, t, alpha, a, b, kt_weight=0.0), 1.0)
    assert 0 < target - radius <= max_shortfall, (target, radius)
    assert ndtr(target) > 0.5
