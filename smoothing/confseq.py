"""Anytime-valid confidence sequence for pA, obtained by inverting the Beta-mixture e-process.

L_t = inf{p0 : H0: pA <= p0 not rejected at time t} and, symmetrically, U_t = sup{p0 : H0: pA >= p0 not rejected}.
Guarantee (per input): P(exists t: L_t > pA) <= alpha, and likewise P(exists t: U_t < pA) <= alpha, for any prior
(a, b) and mixture weight ``kt_weight`` fixed before sampling (:mod:`smoothing.priors`). Because the bound holds
uniformly over t, it is valid at *any* stopping time: a target, a budget, a deadline, a futility rule or the
marginal-gain rule may end sampling without touching the guarantee.

Root finding (hand-written: the kernel must be vectorized over thousands of jobs per model batch, which scipy's
scalar root finders are not). For fixed (S, t) the rejection condition on p0 <= S/t reads g(v) >= 0 with v = log p0 and

    g(v) = log m(S, F) - log(1/alpha) - S v - F log(1 - e^v),   F = t - S,   m = the prior-predictive mixture,

which is convex and decreasing in v on (-inf, log(S/t)]. Newton's method started left of the root therefore moves
monotonically right and never passes the root: *every iterate is itself a valid (conservative) lower bound*. The
start is one tangent step off a Gaussian approximation of the root, which lands left of it from either side
(:func:`_closer_start`); the final iterate is verified with the e-value test whatever the start.
The threshold carries a floating-point margin, so the reported L_t is rounded down, never up.
"""

from __future__ import annotations

import numpy as np
from smoothing._checks import check_alpha, check_counts, check_prior
from smoothing.eprocess import _ULP_MARGIN, log_e_excess
from smoothing.priors import DEFAULT_KT_WEIGHT, KT_PRIOR, check_kt_weight, log_marginal, log_marginal_one
from smoothing.radius import radius_from_probability

_LOG_P_FLOOR = np.log(1e-300)  # bounds below this are reported as 0
_MAX_NEWTON = 60
#: Newton stops once a step moves v = log p0 by at most this, relative. Convergence is quadratic wherever the root
#: lies left of log p_hat (the next step would be ~1e-24), linear with ratio 1/2 where it is log p_hat itself; either
#: way the iterate is left of the root (conservative, short of it by <= ~1e-12 relative) and verified afterwards.
_NEWTON_RTOL = 1e-12
#: Up to this many entries the kernel runs entry by entry on Python floats (:func:`_lower_bound_one`: ~15 us per
#: entry instead of ~170 us of numpy calls on tiny arrays, which is what a one-job policy decision would pay); a
#: larger call with no more live entries than this runs only its Newton iterations on floats.
_SCALAR_NEWTON_MAX = 8


def lower_bound(successes, trials, alpha, a=KT_PRIOR[0], b=KT_PRIOR[1], *, kt_weight=DEFAULT_KT_WEIGHT):
    """Anytime-valid lower confidence bound L_t on pA from S_t hits in t draws.

    Prior: (1 - kt_weight) Beta(a, b) + kt_weight KT (:mod:`smoothing.priors`; for a = b = 1/2 simply KT).
    Guarantee (per input, anytime-valid at level alpha): P(exists t: L_t > pA) <= alpha for any prior ((a, b) and
    ``kt_weight``) fixed before sampling. Returns 0 where S_t = 0 or t = 0. Rounded down (see module docstring).
    Vectorized over (S, t, alpha, a, b) by broadcasting.
    """
    s, t = check_counts(successes, trials)
    alpha = check_alpha(alpha)
    a, b = check_prior(a, b)
    w = check_kt_weight(kt_weight)
    s, t, alpha, a, b = np.broadcast_arrays(s, t, alpha, a, b)
    out = _lower_bound_kernel(s.ravel(), t.ravel(), alpha.ravel(), a.ravel(), b.ravel(), w).reshape(s.shape)
    return out if out.ndim else float(out)


def validated_lower_bound(s, t, alpha, a, b, kt_weight):
    """:func:`lower_bound` (same guarantee, same values) for arguments already validated by the caller: int64 counts
    and float arrays of one common shape, ``kt_weight`` a float in [0, 1]. The stopping policies validate once and
    then evaluate several bounds per job; skipping the repeated checks matters at hundreds of jobs per engine step."""
    shape = np.shape(s)
    return _lower_bound_kernel(np.ravel(s), np.ravel(t), np.ravel(alpha), np.ravel(a), np.ravel(b),
                               kt_weight).reshape(shape)


def upper_bound(successes, trials, alpha, a=KT_PRIOR[0], b=KT_PRIOR[1], *, kt_weight=DEFAULT_KT_WEIGHT):
    """Anytime-valid upper confidence bound U_t on pA (used for futility stopping).

    Guarantee (per input, anytime-valid at level alpha): P(exists t: U_t < pA) <= alpha. Obtained by symmetry:
    U_t(S, t; a, b) = 1 - L_t(t - S, t; b, a) (the mixture with KT mirrors to itself, KT being symmetric). Returns 1
    where S_t = t. Rounded up. Vectorized.
    """
    s, t = check_counts(successes, trials)
    alpha = check_alpha(alpha)
    a, b = check_prior(a, b)
    w = check_kt_weight(kt_weight)
    s, t, alpha, a, b = np.broadcast_arrays(s, t, alpha, a, b)
    low = _lower_bound_kernel((t - s).ravel(), t.ravel(), alpha.ravel(), b.ravel(), a.ravel(), w)
    out = upper_from_mirrored(low).reshape(s.shape)
    return out if out.ndim else float(out)


def upper_from_mirrored(mirrored_lower):
    """U_t from the mirrored lower bound L_t(t - S, t; b, a): 1 - L rounded up (the symmetry of :func:`upper_bound`;
    also used by the stopping policies, which compute the mirrored bound together with their other bounds)."""
    return np.minimum(1.0, np.nextafter(1.0 - mirrored_lower, 2.0))


def certified_radius(successes, trials, alpha, sigma, a=KT_PRIOR[0], b=KT_PRIOR[1], *, kt_weight=DEFAULT_KT_WEIGHT):
    """Certified L2 radius sigma * Phi^-1(L_t), or 0 (abstain) where L_t <= 1/2.

    Guarantee (per input, anytime-valid at level alpha): if the hits are i.i.d. Bernoulli(pA) indicators of the
    tested class under i.i.d. noise, and the class and the prior (a, b, ``kt_weight``) were fixed before the samples
    (from the clean input), then with probability >= 1 - alpha, simultaneously for all t, the smoothed classifier
    returns the tested class within the returned radius. Valid at any stopping time. Rounded down.
    """
    return radius_from_probability(lower_bound(successes, trials, alpha, a, b, kt_weight=kt_weight), sigma)


def _lower_bound_kernel(s, t, alpha, a, b, kt_weight):
    """Flat-array Newton iteration described in the module docstring. Inputs are validated 1-d arrays."""
    if len(s) <= _SCALAR_NEWTON_MAX:
        return np.array([_lower_bound_one(int(s[i]), int(t[i]), float(alpha[i]), float(a[i]), float(b[i]), kt_weight)
                         for i in range(len(s))], dtype=np.float64)
    f = (t - s).astype(np.float64)  # exact int64 difference, rounded once: float(t - S) as _lower_bound_one (t > 2^53)
    s = s.astype(np.float64)
    out = np.zeros(s.shape, dtype=np.float64)
    live = s > 0
    if not live.any():
        return out
    s, f = s[live], f[live]
    log_threshold = -np.log(alpha[live])
    mix, magnitude = log_marginal(s, f, a[live], b[live], kt_weight)
    log_phat = np.log(s / (s + f))
    # Same margin as eprocess.rejects: with M = 64 ulp, rejection at p0 = e^v means
    #   g(v) = [mix - lt - M(magnitude + lt)] - (1 - M) (S v + F log(1 - e^v)) >= 0,
    # still convex and decreasing in v on (-inf, log p_hat].
    const = mix - log_threshold - _ULP_MARGIN * (magnitude + log_threshold)
    shrink = 1.0 - _ULP_MARGIN

    def g_and_slope(v, at=slice(None)):  # g and g' at v for the entries ``at``
        return _g_and_slope(v, const[at], s[at], f[at], shrink)

    ok = g_and_slope(np.full(s.shape, _LOG_P_FLOOR))[0] >= 0  # else even p0 = 1e-300 is not rejected: L_t = 0
    # Start at v1 = const / (shrink S), clipped to [floor, log p_hat]: as F log(1 - e^v) <= 0, g(v1) >= const -
    # shrink S v1 = 0, so v1 is left of the root (it is the root when F = 0) and closer than the floor. Where
    # rounding put it a hair right of the root, Newton does not move it (the step is taken only where g > 0) and the
    # check below steps back.
    v = np.where(ok, np.clip(const / (shrink * s), _LOG_P_FLOOR, log_phat), _LOG_P_FLOOR)
    active = np.flatnonzero(ok)  # Newton runs on the entries still moving only
    if len(active) <= _SCALAR_NEWTON_MAX:  # a few jobs: plain floats beat numpy's per-call cost ~20x
        for i in active:
            const_i, s_i, f_i, log_phat_i = float(const[i]), float(s[i]), float(f[i]), float(log_phat[i])
            start = _closer_start_one(float(v[i]), const_i, s_i, f_i, shrink, log_phat_i)
            v[i] = _newton_scalar(start, const_i, s_i, f_i, shrink, log_phat_i)
    else:
        moved = active[f[active] > 0]
        v[moved] = _closer_start(v[moved], const[moved], s[moved], f[moved], shrink, log_phat[moved])
        for _ in range(_MAX_NEWTON):
            if not len(active):
                break
            va = v[active]
            gv, slope = g_and_slope(va, active)
            step = np.where((slope < 0) & (gv > 0), -gv / slope, 0.0)
            v_new = np.minimum(va + step, log_phat[active])
            v[active] = v_new
            active = active[v_new - va > _NEWTON_RTOL * np.abs(va)]
    # Convexity keeps every iterate left of the root in exact arithmetic; rounding in a long first jump can still
    # land a few ulp past it. Verify with the very function `rejects` uses and step back where needed: a Newton step
    # taken from the right of the root of a convex decreasing function lands left of it, plus a growing margin.
    t_live = s + f
    for attempt in range(40):
        slipped = ok & (log_e_excess(s, t_live, np.exp(v), log_threshold, mix, magnitude) < 0)
        if not slipped.any():
            break
        gv, slope = g_and_slope(v)
        back = np.where(slope < 0, np.minimum(gv, 0.0) / slope, 0.0) + np.maximum(1e-12 * np.abs(v), 1e-15) * 4.0**attempt
        v = np.where(slipped, v - back, v)
    else:  # never seen in testing; report 0 (abstain) rather than an unverified bound
        ok &= log_e_excess(s, t_live, np.exp(v), log_threshold, mix, magnitude) >= 0
    out[live] = np.where(ok, np.exp(v), 0.0)
    return out


def _lower_bound_one(s: int, t: int, alpha: float, a: float, b: float, kt_weight: float) -> float:
    """:func:`_lower_bound_kernel` for one entry on Python floats: the same start, Newton iteration, verification
    with :func:`smoothing.eprocess.log_e_excess` and step-back, operation for operation, so the bound is
    bit-identical to the vectorized kernel's (tests/test_smoothing_confseq_exact.py checks it on a grid) and rounded
    down the same way (module docstring)."""
    if s <= 0:
        return 0.0
    s, f = float(s), float(t - s)
    log_threshold = -np.log(alpha)
    mix, magnitude = log_marginal_one(s, f, a, b, kt_weight)
    log_phat = np.log(s / (s + f))
    const = mix - log_threshold - _ULP_MARGIN * (magnitude + log_threshold)
    shrink = 1.0 - _ULP_MARGIN

    if not _g_and_slope(_LOG_P_FLOOR, const, s, f, shrink)[0] >= 0:
        return 0.0
    start = _closer_start_one(float(min(max(const / (shrink * s), _LOG_P_FLOOR), log_phat)), float(const), s, f,
                              shrink, float(log_phat))
    v = _newton_scalar(start, float(const), s, f, shrink, float(log_phat))
    for attempt in range(40):  # the kernel's check: verify with the e-value test, step back where rounding slipped
        if log_e_excess(s, s + f, np.exp(v), log_threshold, mix, magnitude) >= 0:
            return float(np.exp(v))
        gv, slope = _g_and_slope(v, const, s, f, shrink)
        v = v - ((min(gv, 0.0) / slope if slope < 0 else 0.0) + max(1e-12 * abs(v), 1e-15) * 4.0**attempt)
    return float(np.exp(v)) if log_e_excess(s, s + f, np.exp(v), log_threshold, mix, magnitude) >= 0 else 0.0


def _g_and_slope(v, const, s, f, shrink):
    """(g(v), g'(v)) of the module docstring's g, on arrays or on Python floats alike (numpy's ufuncs: the same bits
    either way). g' < 0 left of the MLE. :func:`_newton_scalar` inlines it (with its check that 1 - p0 > 0)."""
    one_minus = -np.expm1(v)  # 1 - p0, accurate when p0 is close to 1
    return const - shrink * (s * v + f * np.log(one_minus)), -shrink * (s - f * np.exp(v) / one_minus)


def _newton_scalar(v, const, s, f, shrink, log_phat):
    """The Newton iteration of :func:`_lower_bound_kernel` for one entry, on Python floats (same g, g', step rule,
    cap at log p_hat and stopping test as the vectorized loop). Not a soundness step: the kernel verifies the result
    with the e-value test afterwards, whichever loop produced it.

    The transcendental functions are numpy's ufuncs, not :mod:`math`'s: on CPUs with AVX-512 numpy's SIMD log, exp
    and expm1 differ from the C library's in the last ulp for ~1-5% of arguments, and the Newton path then stops at
    a different iterate (~1e-12 relative apart), so a job's bound would depend on how many other jobs shared its
    kernel call. numpy's ufuncs give the same bits for one float as for that element of an array (~0.1 us a call)."""
    for _ in range(_MAX_NEWTON):
        one_minus = -np.expm1(v)  # 1 - p0
        if one_minus <= 0.0:  # v = log p_hat = 0 (S = t): the start is already the root
            return v
        g = const - shrink * (s * v + f * np.log(one_minus))
        slope = -shrink * (s - f * np.exp(v) / one_minus)
        v_new = min(v + (-g / slope if slope < 0.0 and g > 0.0 else 0.0), log_phat)
        if not v_new - v > _NEWTON_RTOL * abs(v):
            return v_new
        v = v_new
    return v


def _closer_start(v1, const, s, f, shrink, log_phat):
    """A Newton start closer to the root than ``v1`` (entries with F > 0 and g(floor) >= 0; ``v1`` = the kernel's
    start, left of the root), cutting the iterations from ~7 to ~4. Not a soundness step: whatever it returns, the
    kernel verifies the final iterate with the e-value test.

    Where t KL(p_hat || p) = gap (gap = -g(log p_hat)) has a root, the Gaussian (Wilson) approximation
    t (p_hat - p)^2 = 2 gap p (1 - p) gives p0 close to it, on either side. One Newton step from v0 = log p0 < log
    p_hat then lands left of the root: from the left it moves right and stops short of the root (convexity), and
    from the right the tangent of the convex decreasing g lies below g, so its zero is left of the root. The result
    is clipped to [v1, log p_hat], which keeps it left of the root. Where the approximation gives nothing usable
    (gap <= 0, p0 = 0, v0 not left of log p_hat, a non-negative slope) the start stays ``v1``.
    :func:`_closer_start_one` does the same operations on Python floats (bit-identical: numpy's ufuncs, as
    :func:`_newton_scalar`)."""
    t = s + f
    gap = shrink * (s * log_phat + f * np.log(f / t)) - const
    centre = s + np.maximum(gap, 0.0)
    width = t + 2.0 * np.maximum(gap, 0.0)  # >= t > 0
    p0 = (centre - np.sqrt(np.maximum(centre * centre - width * s * (s / t), 0.0))) / width
    v0 = np.maximum(np.log(np.maximum(p0, 1e-300)), v1)
    g0, slope0 = _g_and_slope(v0, const, s, f, shrink)
    use = (gap > 0) & (v0 < log_phat) & (slope0 < 0)
    return np.where(use, np.minimum(np.maximum(v0 - g0 / np.where(use, slope0, -1.0), v1), log_phat), v1)


def _closer_start_one(v1, const, s, f, shrink, log_phat):
    """:func:`_closer_start` for one entry on Python floats, operation for operation (F = 0: ``v1``, the root)."""
    if f <= 0.0:
        return v1
    t = s + f
    gap = shrink * (s * log_phat + f * np.log(f / t)) - const
    if not gap > 0:
        return v1
    centre = s + gap
    width = t + 2.0 * gap
    p0 = (centre - np.sqrt(max(centre * centre - width * s * (s / t), 0.0))) / width
    v0 = max(float(np.log(max(p0, 1e-300))), v1)
    g0, slope0 = _g_and_slope(v0, const, s, f, shrink)
    if not (v0 < log_phat and slope0 < 0):
        return v1
    return float(min(max(v0 - g0 / slope0, v1), log_phat))
