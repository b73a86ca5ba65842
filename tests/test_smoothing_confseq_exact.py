"""The e-process and its confidence sequence against independent computations.

Every check runs for the plain Beta(a, b) prior (kt_weight = 0) and for the default mixture with KT
(:mod:`smoothing.priors`), whose exact value is computed here from the definition.

* ``log_e_value`` vs direct numerical integration of the Beta mixture (scipy.integrate.quad) for small t.
* ``lower_bound`` vs (i) exact arithmetic (mpmath, 40 digits) evaluated AT the returned bound: L_t must lie in the
  exact rejection region (never above the exact root) and L_t (1 + 1e-8) outside it (tight); (ii) a brute-force
  bisection inversion of ``rejects``; (iii) scipy's brentq root of ``log_e_value``.
* ``upper_bound`` = 1 - lower_bound with (S, a, b) mirrored, and exactly conservative.
* ``rejects`` never rejects where exact arithmetic does not (its docstring's floating-point claim).
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
from scipy.integrate import quad
from scipy.optimize import brentq
from scipy.special import betaln

from smoothing import DEFAULT_KT_WEIGHT, KT_PRIOR, log_e_value, lower_bound, rejects, upper_bound

PRIORS = [(0.5, 0.5), (180.0, 20.0), (199.8, 0.2), (50.0, 1.0), (1.0, 50.0), (29.0, 0.01)]
WEIGHTS = (0.0, DEFAULT_KT_WEIGHT)


def _grid(size_name):
    """(S, t, alpha, a, b, w) points: every prior, t from 1 to 1e5 (1e7 in the slow variant), S near t and in between;
    the plain prior and the mixture alternate over the points (both in the slow variant)."""
    alphas = (0.05, 0.001) if size_name == "fast" else (0.05, 0.001, 1e-6, 1e-10)
    ts = [1, 2, 3, 10, 100, 806, 1000, 5000, 10_000, 100_000] + ([] if size_name == "fast" else [10**6, 10**7])
    pts = []
    for alpha in alphas:
        for a, b in PRIORS:
            for t in ts:
                for s in sorted({t, t - 1, t - 5, int(0.99 * t), int(0.9 * t), t // 2, 1}):
                    if 1 <= s <= t:
                        weights = WEIGHTS if size_name != "fast" else (WEIGHTS[len(pts) % 2],)
                        pts += [(s, t, alpha, a, b, w) for w in weights]
    return pts


def _exact_excess(s, t, p, alpha, a, b, w):
    """Exact log E_t(p) - log(1/alpha) for the prior (1 - w) Beta(a, b) + w KT, in mpmath."""
    p, f = mp.mpf(p), t - s
    comps = [(1 - mp.mpf(w), mp.mpf(a), mp.mpf(b)), (mp.mpf(w), *(mp.mpf(x) for x in KT_PRIOR))]
    m = mp.fsum(wk * mp.beta(ak + s, bk + f) / mp.beta(ak, bk) for wk, ak, bk in comps if wk > 0)
    return mp.log(m) - s * mp.log(p) - f * mp.log1p(-p) + mp.log(mp.mpf(alpha))


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("a,b", [(0.5, 0.5), (1.0, 1.0), (2.0, 7.0), (30.0, 3.0), (0.3, 4.0)])
def test_log_e_value_matches_numerical_integration(a, b, w):
    """E_t(p0) = int_0^1 p^S (1-p)^F pi(p) dp / (p0^S (1-p0)^F) with pi = (1 - w) Beta(a, b) + w Beta(1/2, 1/2): quad
    with an algebraic weight per component (handles the endpoint singularities of a, b < 1), in log space to 1e-9."""

    def component(a_, b_, s, f):
        integral, _ = quad(lambda x: 1.0, 0.0, 1.0, weight="alg", wvar=(a_ + s - 1, b_ + f - 1), epsabs=0,
                           epsrel=1e-11, limit=200)
        return integral / math.exp(betaln(a_, b_))

    for t in range(0, 31, 3):
        for s in range(t + 1):
            marginal = (1 - w) * component(a, b, s, t - s) + (w * component(*KT_PRIOR, s, t - s) if w else 0.0)
            for p0 in (0.05, 0.5, 0.9, 0.999):
                direct = math.log(marginal) - s * math.log(p0) - (t - s) * math.log1p(-p0)
                got = log_e_value(s, t, p0, a, b, kt_weight=w)
                assert got == pytest.approx(direct, abs=1e-9, rel=1e-10), (s, t, p0)


@pytest.mark.parametrize("which", ["lower", "upper"])
def test_bounds_never_beyond_the_exact_root(size, which):
    """L_t is rounded down: exact log E_t(L_t) >= log(1/alpha), i.e. L_t is never above the exact root (and
    symmetrically U_t never below its exact root). Collects every offender over the grid."""
    mp.mp.dps = 40
    offenders = []
    for s, t, alpha, a, b, w in _grid(size.name):
        if which == "lower":
            bound = lower_bound(s, t, alpha, a, b, kt_weight=w)
            excess = _exact_excess(s, t, bound, alpha, a, b, w) if bound > 0 else 0
        else:  # U(S, t; a, b) = 1 - L(t - S, t; b, a): test the mirrored e-process at q = 1 - U
            bound = upper_bound(t - s, t, alpha, a, b, kt_weight=w)
            excess = _exact_excess(s, t, 1 - mp.mpf(bound), alpha, b, a, w) if bound < 1 else 0
        if excess < 0:
            offenders.append(((s, t, alpha, a, b), bound, float(excess)))
    assert not offenders, f"{len(offenders)} bounds beyond the exact root, e.g. {offenders[:3]}"


def test_lower_bound_is_tight(size):
    """Where certificates live (L_t > 1/2), L_t is within 1e-8 (relative) of the exact root: L_t (1 + 1e-8) is outside
    the exact rejection region. Below 1/2 (no radius, tightness irrelevant) within 1e-5: there the floating-point
    margin of ~64 ulp of (t+a+b) log(t+a+b) in log E moves the root by margin / S, e.g. 1.5e-8 relative at S=1,
    t=1e5. L_t = 0 only where even p0 = 1e-300 is not rejected. Run once against a Newton stop predicted too early
    (smoothing.kernels._newton's quadratic-convergence test with 1e-6 for NEWTON_RTOL): this test failed, as did the
    consistency and brute-force tests of this module."""
    mp.mp.dps = 40
    for s, t, alpha, a, b, w in _grid(size.name):
        L = lower_bound(s, t, alpha, a, b, kt_weight=w)
        if L == 0:
            assert _exact_excess(s, t, 1e-300, alpha, a, b, w) < 0, (s, t, alpha, a, b)
            continue
        above = L * (1 + (1e-8 if L > 0.5 else 1e-5))
        assert above >= s / t or _exact_excess(s, t, above, alpha, a, b, w) < 0, ((s, t, alpha, a, b), L)


def test_lower_bound_is_consistent_with_rejects(size):
    """rejects(S, t, L_t) is True (the bound is inside the region the e-process test rejects) and
    rejects(S, t, L_t (1 + 1e-9)) is False: the confidence sequence is the inversion of ``rejects``."""
    for s, t, alpha, a, b, w in _grid(size.name):
        L = lower_bound(s, t, alpha, a, b, kt_weight=w)
        if L > 0:
            assert rejects(s, t, L, alpha, a, b, kt_weight=w), ((s, t, alpha, a, b), L)
        above = L * (1 + 1e-9) if L > 0 else 1e-300
        if above < s / t:
            assert not rejects(s, t, above, alpha, a, b, kt_weight=w), ((s, t, alpha, a, b), L)


def _bisect_rejects(s, t, alpha, a, b, w):
    """Brute force: the largest p0 in (0, S/t) that ``rejects`` rejects, by 110 bisection steps in log p0."""
    lo, hi = math.log(1e-300), math.log(s / t)
    if not rejects(s, t, 1e-300, alpha, a, b, kt_weight=w):
        return 0.0
    for _ in range(110):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejects(s, t, math.exp(mid), alpha, a, b, kt_weight=w) else (lo, mid)
    return math.exp(lo)


def test_lower_bound_matches_brute_force_inversions():
    """L_t equals (to 1e-9 relative) the bisection inversion of ``rejects`` and the brentq root of
    log_e_value(S, t, p0) = log(1/alpha), on random (S, t, alpha, a, b, kt_weight)."""
    rng = np.random.default_rng(99)
    for _ in range(80):
        t = int(rng.choice([1, 5, 20, 100, 1000, 10_000]))
        s = int(rng.integers(1, t + 1))
        alpha = float(10 ** rng.uniform(-8, math.log10(0.5)))
        a, b = (float(x) for x in 10 ** rng.uniform(-2, 2.5, size=2))
        w = float(rng.choice([0.0, DEFAULT_KT_WEIGHT, 0.5, 1.0]))
        L = lower_bound(s, t, alpha, a, b, kt_weight=w)
        ref = _bisect_rejects(s, t, alpha, a, b, w)
        assert L == pytest.approx(ref, rel=1e-9, abs=1e-300), (s, t, alpha, a, b)
        if ref > 1e-250:
            def h(p, s=s, t=t, alpha=alpha, a=a, b=b, w=w):
                return log_e_value(s, t, p, a, b, kt_weight=w) + math.log(alpha)

            root = brentq(h, 1e-300, s / t * (1 - 1e-15), xtol=1e-300, rtol=1e-15, maxiter=500)
            assert L == pytest.approx(root, rel=1e-9), (s, t, alpha, a, b)


def test_upper_bound_is_mirrored_lower_bound():
    """U(S, t; a, b) = 1 - L(t - S, t; b, a), rounded up (never below the mirrored value); U = 1 where S = t."""
    rng = np.random.default_rng(3)
    t = rng.integers(1, 5000, size=500)
    s = rng.integers(0, t + 1)
    a, b = 10 ** rng.uniform(-2, 2, size=(2, 500))
    U, L = upper_bound(s, t, 0.01, a, b), lower_bound(t - s, t, 0.01, b, a)
    assert np.all(U >= 1 - L) and np.allclose(U, 1 - L, rtol=0, atol=1e-15)
    assert np.all(upper_bound(t, t, 0.01) == 1.0)


def test_rejects_never_rejects_where_exact_arithmetic_does_not(size):
    """Docstring of eprocess: the float margin means rounding "cannot create a rejection that exact arithmetic would
    not". At the p0 just above the exact root (the hardest place), rejects must be False."""
    mp.mp.dps = 40
    offenders = []
    for s, t, alpha, a, b, w in _grid(size.name)[:: 5 if size.name == "fast" else 1]:
        L = lower_bound(s, t, alpha, a, b, kt_weight=w)
        if not 0 < L < s / t:
            continue
        lo, hi = mp.mpf(L) * (1 - mp.mpf(1e-6)), min(mp.mpf(L) * (1 + mp.mpf(1e-6)), mp.mpf(s) / t)
        if _exact_excess(s, t, lo, alpha, a, b, w) < 0 or _exact_excess(s, t, hi, alpha, a, b, w) >= 0:
            continue  # L is not within 1e-6 of the root: test_lower_bound_is_tight reports that
        for _ in range(80):  # exact root by bisection
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _exact_excess(s, t, mid, alpha, a, b, w) >= 0 else (lo, mid)
        p0 = float(hi) * (1 + 4 * np.finfo(float).eps)
        if p0 < s / t and _exact_excess(s, t, p0, alpha, a, b, w) < 0 and rejects(s, t, p0, alpha, a, b, kt_weight=w):
            offenders.append(((s, t, alpha, a, b), p0, float(_exact_excess(s, t, p0, alpha, a, b, w))))
    assert not offenders, f"{len(offenders)} rejections that exact arithmetic does not make, e.g. {offenders[:3]}"


def test_all_hits_give_a_positive_monotone_bound():
    """Regression (seen in commit 3f01d41): for S_t = t the bound was reported as 0 (abstain) for ~40% of t in
    1..20000, e.g. lower_bound(806, 806, 0.001) == 0 while lower_bound(805, 806, 0.001) ~ 0.99."""
    t = np.arange(1, 20_001)
    for alpha, a, b in [(0.001, 0.5, 0.5), (0.05, 0.5, 0.5), (0.001, 199.8, 0.2), (0.05, 1.0, 1.0)]:
        full, one_miss = lower_bound(t, t, alpha, a, b), lower_bound(t - 1, t, alpha, a, b)
        assert np.all(full >= one_miss), t[full < one_miss][:10]
        assert np.all(upper_bound(0, t, alpha, a, b) <= upper_bound(1, t, alpha, a, b)), alpha


def test_scalar_and_vectorized_newton_give_the_same_bounds(size):
    """One point (kernels.lower_bound_one) and a whole grid (the kernel) both run the compiled
    smoothing.kernels.lower_bound_one now (before: a float path and a numpy path); the exact-root tests above call
    one point at a time, so they check the one-point path. Here the whole grid in ONE call (the vectorized kernel)
    must give bit-identical bounds, lower and upper, so both paths carry those tests' guarantees. Ran once against a
    scalar
    loop with a looser stopping test than the vectorized loop's (1e-12 for 1e-15, and again 1e-9 for 1e-12 since the
    tolerance is 1e-12), and once against a float path whose rounding margin left out
    the threshold's term: both fail. It also failed on an AVX-512 machine while the float path's Newton loop used
    math.log/exp/expm1 (28 of the grid's bounds differed at w = 0: numpy's SIMD functions round differently in the
    last ulp); it uses numpy's ufuncs since."""
    pts = np.array(_grid(size.name))
    s, t = pts[:, 0].astype(np.int64), pts[:, 1].astype(np.int64)
    for w in WEIGHTS:
        for bound in (lower_bound, upper_bound):
            together = bound(s, t, pts[:, 2], pts[:, 3], pts[:, 4], kt_weight=w)
            one_by_one = np.array([bound(*p[:2].astype(np.int64), *p[2:5], kt_weight=w) for p in pts])
            differ = np.flatnonzero(together != one_by_one)
            assert not len(differ), (bound.__name__, w, pts[differ[:3]], together[differ[:3]], one_by_one[differ[:3]])
