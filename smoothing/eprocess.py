"""Beta-mixture e-process for H0: pA <= p0, the test statistic of the sequential (Halt Fast) path.

Observations X_1, X_2, ... are i.i.d. Bernoulli(pA) hits (X_t = 1{f(x + e_t) = c}, c fixed before sampling).
After t observations with S_t hits the mixture likelihood ratio is

    E_t(p0) = m(S_t, t - S_t) / (p0^S_t * (1 - p0)^(t - S_t)),

with m the prior-predictive probability of the sequence under the prior of :mod:`smoothing.priors`: the mixture
(1 - w) Beta(a, b) + w Beta(1/2, 1/2), w = ``kt_weight`` (w = 0: the plain Beta(a, b) prior,
m = B(a + S, b + F) / B(a, b)). For pA = p0 it is a nonnegative martingale with E_0 = 1. For pA = p < p0, whenever
S_t >= p0 * t the ratio E_t(p0) / E_t(p) = (p / p0)^S (1-p / 1-p0)^(t-S) is <= 1 (it does not involve the prior), so
{E_t(p0) >= 1/alpha and S_t >= p0 t} implies {E_t(p) >= 1/alpha}. Ville's inequality then gives, for every
pA <= p0 and any prior (any (a, b) and any weight) fixed before sampling:

    P(exists t: E_t(p0) >= 1/alpha and S_t >= p0 t) <= alpha.

An informative prior only moves power around; it can never break this bound. Everything is evaluated in log space
(``betaln``, ``xlogy``), which is exact enough for t up to 1e7 and beyond. The test itself (:func:`rejects`) runs in
the compiled :func:`smoothing.kernels.rejects_one`, the very function the confidence sequence verifies its bounds
with, and rejects only with a margin of 64 ulp of the magnitudes involved (:data:`smoothing.kernels.ULP_MARGIN`).

Hand-written (not a library call) because no maintained package offers a vectorized, composite-null-valid
Beta-mixture e-process; the kernel is a few lines and is cross-checked in tests against direct numerical integration
and against an independent mpmath rejection region.
"""

from __future__ import annotations

import numpy as np
from scipy.special import xlog1py, xlogy

from smoothing._checks import check_alpha, check_counts, check_prior, check_probability
from smoothing.kernels import ULP_MARGIN as _ULP_MARGIN  # noqa: F401 (the margin's one definition; tests read it)
from smoothing.kernels import rejects_many
from smoothing.priors import DEFAULT_KT_WEIGHT, KT_PRIOR, check_kt_weight, log_marginal


def log_e_value(successes, trials, p0, a=KT_PRIOR[0], b=KT_PRIOR[1], *, kt_weight=DEFAULT_KT_WEIGHT):
    """log E_t(p0) of the mixture prior (see module docstring). Vectorized by broadcasting; p0 in (0, 1)."""
    s, t = check_counts(successes, trials)
    p = check_probability(p0, "p0")
    a, b = check_prior(a, b)
    mix, _ = log_marginal(s, t - s, a, b, check_kt_weight(kt_weight))
    log_e = mix - xlogy(s, p) - xlog1py(t - s, -p)
    return log_e if log_e.ndim else float(log_e)


def rejects(successes, trials, p0, alpha, a=KT_PRIOR[0], b=KT_PRIOR[1], *, kt_weight=DEFAULT_KT_WEIGHT):
    """True where H0: pA <= p0 is rejected at level alpha: log E_t(p0) >= log(1/alpha) and S_t >= p0 * t.

    Guarantee (per input, anytime-valid): for any pA <= p0 and any prior ((a, b) and ``kt_weight``) fixed before the
    samples, the probability that this returns True at ANY t (monitoring after every sample, any stopping rule) is
    <= alpha.
    """
    s, t = check_counts(successes, trials)
    p = check_probability(p0, "p0")
    a, b = check_prior(a, b)
    out = validated_rejects(s, t, p, check_alpha(alpha), a, b, check_kt_weight(kt_weight))
    return out if out.ndim else bool(out)


def validated_rejects(s, t, p0, alpha, a, b, kt_weight):
    """:func:`rejects` (same guarantee, same answers, always an array) for arguments the caller has validated: int64
    counts 0 <= s <= t, p0 in (0, 1), alpha in (0, 1), a, b > 0 (arrays broadcasting together), ``kt_weight`` a
    float in [0, 1]. The stopping policies use it on the engine's job table, whose parameters are checked once at
    submission (models.jobs.check_spec), not at every step. Compiled (:func:`smoothing.kernels.rejects_many`): the
    very test the confidence sequence verifies its bounds with, so L_t is always a rejected p0."""
    arrays = np.broadcast_arrays(np.asarray(s, np.int64), np.asarray(t, np.int64), np.asarray(p0, np.float64),
                                 np.asarray(alpha, np.float64), np.asarray(a, np.float64), np.asarray(b, np.float64))
    flat = [np.ravel(x) for x in arrays]
    return rejects_many(*flat, float(kt_weight)).reshape(arrays[0].shape)
