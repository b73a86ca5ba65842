"""Anytime-valid confidence sequence for pA, obtained by inverting the Beta-mixture e-process.

L_t = inf{p0 : H0: pA <= p0 not rejected at time t} and, symmetrically, U_t = sup{p0 : H0: pA >= p0 not rejected}.
Guarantee (per input): P(exists t: L_t > pA) <= alpha, and likewise P(exists t: U_t < pA) <= alpha, for any prior
(a, b) fixed before sampling. Because the bound holds uniformly over t, it is valid at *any* stopping time: a
target, a budget, a deadline or a futility rule may end sampling without touching the guarantee.

Root finding (hand-written: the kernel must be vectorized over thousands of jobs per model batch, which scipy's
scalar root finders are not). For fixed (S, t) the rejection condition on p0 <= S/t reads g(v) >= 0 with v = log p0 and

    g(v) = betaln(a+S, b+F) - betaln(a, b) - log(1/alpha) - S v - F log(1 - e^v),   F = t - S,

which is convex and decreasing in v on (-inf, log(S/t)]. Newton's method started left of the root therefore moves
monotonically right and never passes the root: *every iterate is itself a valid (conservative) lower bound*.
The threshold carries a floating-point margin, so the reported L_t is rounded down, never up.
"""

from __future__ import annotations

import numpy as np
from scipy.special import betaln

from smoothing._checks import check_alpha, check_counts, check_prior
from smoothing.eprocess import _ULP_MARGIN
from smoothing.radius import radius_from_probability

_LOG_P_FLOOR = np.log(1e-300)  # bounds below this are reported as 0
_MAX_NEWTON = 60


def lower_bound(successes, trials, alpha, a=0.5, b=0.5):
    """Anytime-valid lower confidence bound L_t on pA from S_t hits in t draws.

    Guarantee (per input, anytime-valid at level alpha): P(exists t: L_t > pA) <= alpha for any prior (a, b) fixed
    before sampling. Returns 0 where S_t = 0 or t = 0. Rounded down (see module docstring). Vectorized.
    """
    s, t = check_counts(successes, trials)
    alpha = check_alpha(alpha)
    a, b = check_prior(a, b)
    s, t, alpha, a, b = np.broadcast_arrays(s, t, alpha, a, b)
    out = _lower_bound_kernel(s.ravel(), t.ravel(), alpha.ravel(), a.ravel(), b.ravel()).reshape(s.shape)
    return out if out.ndim else float(out)


def upper_bound(successes, trials, alpha, a=0.5, b=0.5):
    """Anytime-valid upper confidence bound U_t on pA (used for futility stopping).

    Guarantee (per input, anytime-valid at level alpha): P(exists t: U_t < pA) <= alpha. Obtained by symmetry:
    U_t(S, t; a, b) = 1 - L_t(t - S, t; b, a). Returns 1 where S_t = t. Rounded up. Vectorized.
    """
    s, t = check_counts(successes, trials)
    alpha = check_alpha(alpha)
    a, b = check_prior(a, b)
    s, t, alpha, a, b = np.broadcast_arrays(s, t, alpha, a, b)
    low = _lower_bound_kernel((t - s).ravel(), t.ravel(), alpha.ravel(), b.ravel(), a.ravel())
    out = np.minimum(1.0, np.nextafter(1.0 - low, 2.0)).reshape(s.shape)
    return out if out.ndim else float(out)


def certified_radius(successes, trials, alpha, sigma, a=0.5, b=0.5):
    """Certified L2 radius sigma * Phi^-1(L_t), or 0 (abstain) where L_t <= 1/2.

    Guarantee (per input, anytime-valid at level alpha): with probability >= 1 - alpha, simultaneously for all t,
    the smoothed classifier returns the tested class within the returned radius. Valid at any stopping time.
    """
    return radius_from_probability(lower_bound(successes, trials, alpha, a, b), sigma)


def _lower_bound_kernel(s, t, alpha, a, b):
    """Flat-array Newton iteration described in the module docstring. Inputs are validated 1-d arrays."""
    s = s.astype(np.float64)
    f = t.astype(np.float64) - s
    out = np.zeros(s.shape, dtype=np.float64)
    live = s > 0
    if not np.any(live):
        return out
    s, f = s[live], f[live]
    log_threshold = -np.log(alpha[live])
    mix = betaln(a[live] + s, b[live] + f)
    prior = betaln(a[live], b[live])
    log_phat = np.log(s / (s + f))
    # Margin from the magnitudes at the MLE (the largest the null term gets near the root).
    scale = np.abs(mix) + np.abs(prior) + s * np.abs(log_phat) + f * np.abs(np.log(-np.expm1(np.minimum(log_phat, -1e-300)))) + log_threshold
    const = mix - prior - log_threshold - _ULP_MARGIN * scale

    def g(v):
        return const - s * v - f * np.log(-np.expm1(v))

    v = np.full(s.shape, _LOG_P_FLOOR)
    ok = g(v) >= 0  # else even p0 = 1e-300 is not rejected: L_t reported as 0
    for _ in range(_MAX_NEWTON):
        one_minus = -np.expm1(v)  # 1 - p0, accurate when p0 is close to 1
        gv = const - s * v - f * np.log(one_minus)
        slope = -s + f * np.exp(v) / one_minus  # < 0 left of the MLE
        step = np.where(ok & (slope < 0) & (gv > 0), -gv / slope, 0.0)
        v_new = np.minimum(v + step, log_phat)
        if np.all(v_new - v <= 1e-15 * np.abs(v)):
            v = v_new
            break
        v = v_new
    # Convexity keeps every iterate left of the root; verify in floating point and back off where it slipped.
    for _ in range(8):
        slipped = ok & (g(v) < 0)
        if not np.any(slipped):
            break
        v = np.where(slipped, v - np.maximum(1e-12 * np.abs(v), 1e-15), v)
    ok &= g(v) >= 0
    out[live] = np.where(ok, np.exp(v), 0.0)
    return out
