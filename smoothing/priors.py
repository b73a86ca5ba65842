"""Priors of the mixture e-process: the KT prior, a per-input Beta prior, and their fixed-weight mixture.

The e-process of :mod:`smoothing.eprocess` divides the prior-predictive probability of the observed hit sequence,

    m(S, F) = sum_k w_k B(a_k + S, b_k + F) / B(a_k, b_k),

by the null likelihood p0^S (1 - p0)^F. With ``kt_weight`` = w the prior is (1 - w) Beta(a, b) + w KT: the
caller's (e.g. meta-learned) prior is one component and the Kerman-Tolman / Krichevsky-Trofimov prior the other, so a
wrong per-input prior costs at most log(1 / w) nats of evidence against KT alone (a factor 1/w on the threshold
1/alpha), while a right one keeps its head start up to log(1 / (1 - w)) nats. w = 0 is the plain Beta(a, b) prior,
w = 1 is KT.

Validity (design.md "Statistics"): a mixture with weights and components fixed before sampling is a prior like any
other: each component's ratio is a nonnegative martingale with mean 1 under pA = p0, so is their convex combination
(Ville's inequality applies to it); and the ratio E_t(p0) / E_t(p) = (p / p0)^S ((1 - p) / (1 - p0))^F does not
depend on the prior at all, so the composite-null argument (E_t(p0) >= 1/alpha and S_t >= p0 t imply E_t(p) >=
1/alpha for every p <= p0) holds for the mixture unchanged. The per-input (a, b) must be fixed from the clean input.

Hand-written: a log-sum-exp over at most two ``betaln`` terms; no library offers it vectorized over jobs.
"""

from __future__ import annotations

import numpy as np
from scipy.special import betaln

#: Kerman-Tolman / Krichevsky-Trofimov prior Beta(1/2, 1/2): the one place its parameters are named in smoothing.
KT_PRIOR = (0.5, 0.5)

#: Default weight of the KT component mixed with the caller's Beta(a, b) prior. Chosen on held-out dev streams (the
#: bundle's calibration split, never the test set) by minimax regret over a right and a wrong (permuted) meta prior:
#: docs/smoothing-benchmark.md, section 3 (``python -m bench.smoothing_bench --full``). Any value in [0, 1] keeps
#: validity; it only moves power between priors.
DEFAULT_KT_WEIGHT = 0.1


def check_kt_weight(kt_weight) -> float:
    """``kt_weight`` as a float in [0, 1] (ValueError otherwise; a boolean or a string is not a weight)."""
    if isinstance(kt_weight, (bool, np.bool_, str, bytes)):
        raise ValueError(f"kt_weight must be a number in [0, 1], got {kt_weight!r}")
    try:
        w = float(kt_weight)
    except (TypeError, ValueError):
        raise ValueError(f"kt_weight must be a number in [0, 1], got {kt_weight!r}") from None
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"kt_weight must be a number in [0, 1], got {kt_weight!r}")
    return w


def _lgamma_scale(t, a, b):
    n = t + a + b
    return n * np.log1p(n)


def log_marginal(s, f, a, b, kt_weight):
    """(log m(S, F), magnitude) for the mixture (1 - kt_weight) Beta(a, b) + kt_weight KT; unvalidated arrays.

    ``magnitude`` bounds the size of the floating-point terms summed into log m (the betaln values, the log-gamma
    terms inside them, ~ (t + a + b) log(t + a + b), and log of the weights): the e-process's rounding margin is a
    multiple of it. A job whose (a, b) is KT itself gets the single KT term (the mixture equals KT exactly), and the
    KT term is computed once for it, not twice.
    """
    s, f, a, b = np.broadcast_arrays(np.asarray(s, np.float64), np.asarray(f, np.float64), a, b)
    w = float(kt_weight)
    if w == 0.0:
        return _beta_term(s, f, a, b)
    kt_a, kt_b = KT_PRIOR
    kt, kt_magnitude = _beta_term(s, f, kt_a, kt_b)
    if w == 1.0:
        return kt, kt_magnitude
    mix, magnitude = np.array(kt, ndmin=1), np.array(kt_magnitude, ndmin=1)  # copies, writable even for scalars
    other = np.atleast_1d(~((a == kt_a) & (b == kt_b)))
    if np.any(other):
        s1, f1, a1, b1 = (np.atleast_1d(x)[other] for x in (s, f, a, b))
        own, own_magnitude = _beta_term(s1, f1, a1, b1)
        mix[other] = np.logaddexp(np.log1p(-w) + own, np.log(w) + mix[other])
        magnitude[other] += own_magnitude + abs(np.log(w)) + abs(np.log1p(-w))
    return mix.reshape(s.shape), magnitude.reshape(s.shape)


def _beta_term(s, f, a, b):
    """(log B(a + S, b + F) - log B(a, b), magnitude of the terms) for one Beta component."""
    num, den = betaln(a + s, b + f), betaln(a, b)
    return num - den, np.abs(num) + np.abs(den) + _lgamma_scale(s + f, a, b)
