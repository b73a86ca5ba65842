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
(``betaln``, ``xlogy``), which is exact enough for t up to 1e7 and beyond, and vectorized over jobs.

Hand-written (not a library call) because no maintained package offers a vectorized, composite-null-valid
Beta-mixture e-process; the kernel is a few lines and is cross-checked in tests against direct numerical integration
and against an independent mpmath rejection region.
"""

from __future__ import annotations

import numpy as np
from scipy.special import xlog1py, xlogy

from smoothing._checks import check_alpha, check_counts, check_prior, check_probability
from smoothing.priors import DEFAULT_KT_WEIGHT, KT_PRIOR, check_kt_weight, log_marginal

# Relative safety margin on the log-threshold: a rejection is declared only when log E exceeds log(1/alpha) by more
# than 64 ulp of the magnitudes involved, so floating-point error cannot create a rejection that exact arithmetic
# would not. The magnitudes include those of the log-gamma terms inside betaln, ~ (t + a + b) log(t + a + b): its
# absolute error grows with them (measured: 1.6e-10 at t = 1e5, 1.3e-8 at t = 1e7), not with betaln's own value.
_ULP_MARGIN = 64 * np.finfo(np.float64).eps


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
    submission (models.jobs.check_spec), not at every step."""
    log_threshold = -np.log(alpha)
    mix, magnitude = log_marginal(s, t - s, a, b, kt_weight)
    return (log_e_excess(s, t, p0, log_threshold, mix, magnitude) >= 0) & (s >= p0 * t)


def log_e_excess(s, t, p, log_threshold, mix, magnitude):
    """log E_t(p0) - log(1/alpha) - margin; >= 0 exactly where the e-value test rejects (given S_t >= p0 t).

    ``mix`` = log m(S, F) and ``magnitude`` come from :func:`smoothing.priors.log_marginal` (p0-independent, so the
    confidence sequence computes them once per job). The margin is 64 ulp of all magnitudes summed, so
    floating-point error cannot create a rejection that exact arithmetic would not. Unvalidated inputs: internal
    kernel shared by :func:`rejects` and the confidence sequence.
    """
    f = t - s
    log_null = xlogy(s, p) + xlog1py(f, -p)  # <= 0
    return mix - log_null - log_threshold - _ULP_MARGIN * (magnitude - log_null + log_threshold)
