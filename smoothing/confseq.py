"""Anytime-valid confidence sequence for pA, obtained by inverting the Beta-mixture e-process.

L_t = inf{p0 : H0: pA <= p0 not rejected at time t} and, symmetrically, U_t = sup{p0 : H0: pA >= p0 not rejected}.
Guarantee (per input): P(exists t: L_t > pA) <= alpha, and likewise P(exists t: U_t < pA) <= alpha, for any prior
(a, b) and mixture weight ``kt_weight`` fixed before sampling (:mod:`smoothing.priors`). Because the bound holds
uniformly over t, it is valid at *any* stopping time: a target, a budget, a deadline, a futility rule or the
marginal-gain rule may end sampling without touching the guarantee.

Root finding (hand-written: thousands of bounds per model batch, one short Newton iteration each; compiled with
numba in :mod:`smoothing.kernels`, which every caller goes through). For fixed (S, t) the rejection condition on
p0 <= S/t reads g(v) >= 0 with v = log p0 and

    g(v) = log m(S, F) - log(1/alpha) - S v - F log(1 - e^v),   F = t - S,   m = the prior-predictive mixture,

which is convex and decreasing in v on (-inf, log(S/t)]. Newton's method started left of the root therefore moves
monotonically right and never passes the root: *every iterate is itself a valid (conservative) lower bound*. The
start is one tangent step off a Gaussian approximation of the root, which lands left of it from either side
(:func:`smoothing.kernels._closer_start`); Newton stops once a step moves v by <= 1e-12 relative, or quadratic
convergence predicts the next one would (then the iterate is short of the root by <= ~1e-12 relative), and the
final iterate is verified with the e-value test itself (stepped back where rounding slipped past the root) whatever
the start. The threshold carries a floating-point margin, so the reported L_t is rounded down, never up.
"""

from __future__ import annotations

import numpy as np
from smoothing._checks import check_alpha, check_counts, check_prior
from smoothing.kernels import lower_bounds
from smoothing.priors import DEFAULT_KT_WEIGHT, KT_PRIOR, check_kt_weight
from smoothing.radius import radius_from_probability


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
    """L_t of each entry of validated flat arrays: :func:`smoothing.kernels.lower_bounds` (the algorithm of the module
    docstring, compiled; guarantee as :func:`lower_bound`, entry by entry)."""
    return lower_bounds(np.asarray(s, dtype=np.int64), np.asarray(t, dtype=np.int64), np.asarray(alpha, np.float64),
                        np.asarray(a, np.float64), np.asarray(b, np.float64), float(kt_weight))

