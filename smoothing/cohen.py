"""Cohen et al. (2019) fixed-sample certification: exact parity with ``locuslab/smoothing`` ``code/core.py``.

The reference draws ``n0`` selection samples to guess the top class, then ``n`` fresh samples to bound its
probability with a one-sided Clopper-Pearson interval. The two sample sets must be independent: the class is fixed
before the estimation counts are drawn, which is what makes the bound valid for that class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import betainc, betaincc, betainccinv, betaincinv, betaln, xlog1py, xlogy
from scipy.stats import binomtest

from smoothing._checks import check_alpha, check_counts, check_nonneg_int, check_sigma
from smoothing.radius import radius_from_probability

#: Class index returned when the procedure abstains (the reference's ``Smooth.ABSTAIN``).
ABSTAIN = -1

#: The smallest alpha of a Clopper-Pearson bound: below ~1e-100 scipy's incomplete beta is off by orders of magnitude
#: (neither the inverse nor the forward confirmation can be trusted); 1e-15 leaves a wide margin, as the server does.
MIN_CP_ALPHA = 1e-15

# Relative rounding applied to each Clopper-Pearson bound in the conservative direction, so the few-ulp error of
# the incomplete-beta inverse can never make a lower bound too high or an upper bound too low.
_CP_ROUNDING = 1e-12


def clopper_pearson_lower(successes, trials, alpha):
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion.

    Guarantee (per input): if ``successes ~ Binomial(trials, p)`` then P(bound > p) <= alpha, for every p.
    Equals ``statsmodels.proportion_confint(successes, trials, alpha=2*alpha, method="beta")[0]`` (the reference's
    ``lower_confidence_bound``), rounded down by a relative 1e-12 and then confirmed by the forward incomplete beta
    (:func:`_confirmed_lower`). Returns 0 where successes == 0. Vectorized. alpha must be >= MIN_CP_ALPHA.
    """
    s, t = check_counts(successes, trials)
    a = check_alpha(alpha)
    if np.any(a < MIN_CP_ALPHA):
        raise ValueError(f"alpha must be at least {MIN_CP_ALPHA:g} for a Clopper-Pearson bound (below, the incomplete "
                         f"beta function cannot confirm it), got {alpha!r}")
    if np.any(t == 0):
        raise ValueError("trials must be >= 1 for a Clopper-Pearson bound")
    with np.errstate(invalid="ignore"):
        bound = betaincinv(s, t - s + 1, a)
    bound = _confirmed_lower(np.where(s == 0, 0.0, bound * (1.0 - _CP_ROUNDING)), s, t, a)
    return bound if bound.ndim else float(bound)


def _confirmed_lower(bound, s, t, alpha):
    """``bound`` stepped down until the forward incomplete beta confirms it: I_L(S, n - S + 1) <= alpha (1 - 1e-12),
    i.e. L is at most the exact Clopper-Pearson bound. scipy's inverse ``betaincinv`` can be off by ~1e-8 relative
    (second parameter exactly 1,000: n - S = 999 misses gave bounds above the exact one for n >= 2e6, an error rate of
    1.04 alpha at n = 1e8), while the forward ``betainc`` matched a 60-digit binomial sum to ~1e-14 there. For alpha
    > 1/2 the test runs on the complement, 1 - I_L >= (1 - alpha)(1 + 1e-9) (``betaincc``: ``betainc`` near 1 lost
    ~1e-8 relative at n >= 1e5 with few hits). Newton steps on the CDF from the right, on the unconfirmed entries
    only; one it cannot confirm, or a non-finite bound, becomes 0 (abstain)."""
    shape = np.broadcast(s, t, alpha, bound).shape
    s, t, alpha, bound = (np.array(x, dtype=np.float64).ravel() for x in np.broadcast_arrays(s, t, alpha, bound))
    bound = np.where(np.isfinite(bound), bound, 0.0)
    b, upper = t - s + 1, alpha > 0.5
    todo = np.flatnonzero(bound > 0)
    for attempt in range(60):
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            excess = _cdf_excess(s[todo], b[todo], bound[todo], alpha[todo], upper[todo])
            todo, excess = todo[~(excess <= 0)], excess[~(excess <= 0)]
            if not len(todo):
                return bound.reshape(shape)
            x, sj, bj = bound[todo], s[todo], b[todo]
            density = np.exp(xlogy(sj - 1, x) + xlog1py(bj - 1, -x) - betaln(sj, bj))
            step = excess / density * (1.0 + 1e-6 * 2.0 ** attempt)
        step = np.where(np.isfinite(step) & (step > 0), step, x)  # no usable step: go to 0
        bound[todo] = np.maximum(x - step, 0.0)
    bound[todo] = 0.0  # not confirmed after 60 steps (never seen): abstain
    return bound.reshape(shape)


def _cdf_excess(s, b, x, alpha, upper):
    """How far I_x(S, b) exceeds what confirms a lower bound x (<= 0: confirmed; NaN: not): I_x - alpha (1 - 1e-12),
    or where ``upper`` (alpha > 1/2) (1 - alpha)(1 + 1e-9) - (1 - I_x) from the accurate complement."""
    out = np.empty(len(x))
    lo, hi = ~upper, upper
    out[lo] = betainc(s[lo], b[lo], x[lo]) - alpha[lo] * (1.0 - 1e-12)
    out[hi] = (1.0 - alpha[hi]) * (1.0 + 1e-9) - betaincc(s[hi], b[hi], x[hi])
    return out


def clopper_pearson_upper(successes, trials, alpha):
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion.

    Guarantee (per input): if ``successes ~ Binomial(trials, p)`` with ``trials`` fixed before sampling (or cut by a
    rule independent of the outcomes), then P(bound < p) <= alpha, for every p. scipy's inverse is confirmed by the
    forward function and stepped up where it fails (:func:`_confirmed_upper`; the inverse alone gave an error rate
    of 1.0007 alpha at n = 1e8 with 1,000 misses), after a relative 1e-12 rounding up. Returns 1 where successes ==
    trials. alpha >= MIN_CP_ALPHA. Vectorized.
    """
    s, t = check_counts(successes, trials)
    a = check_alpha(alpha)
    if np.any(a < MIN_CP_ALPHA):
        raise ValueError(f"alpha must be at least {MIN_CP_ALPHA:g} for a Clopper-Pearson bound (below, the incomplete "
                         f"beta function cannot confirm it), got {alpha!r}")
    if np.any(t == 0):
        raise ValueError("trials must be >= 1 for a Clopper-Pearson bound")
    with np.errstate(invalid="ignore"):
        bound = betainccinv(s + 1, t - s, a)  # I_x = 1 - alpha without forming 1 - alpha (precision at tiny alpha)
    bound = _confirmed_upper(np.where(s == t, 1.0, np.minimum(1.0, bound * (1.0 + _CP_ROUNDING))), s, t, a)
    return bound if bound.ndim else float(bound)


def _confirmed_upper(bound, s, t, alpha):
    """``bound`` stepped up until the forward function confirms it: P(Bin(n, U) <= S) = 1 - I_U(S + 1, n - S) <= alpha
    (1 - 1e-9) (``betaincc``), or for alpha > 1/2 I_U(S + 1, n - S) >= (1 - alpha)(1 + 1e-9), as
    :func:`_confirmed_lower` does for the lower bound. The margin is 1e-9, not the lower bound's 1e-12: ``betaincc``
    with a small first parameter and a second near 1e9 errs by up to ~1.4e-11 relative (S = 2 hits in 1e9 draws at
    alpha = 1e-6 passed a 1e-12 margin with an exact tail of alpha (1 + 1.4e-11)). Newton steps on the CDF from the
    left on the unconfirmed entries only; one it cannot confirm, or a non-finite bound, becomes 1 (no information)."""
    shape = np.broadcast(s, t, alpha, bound).shape
    s, t, alpha, bound = (np.array(x, dtype=np.float64).ravel() for x in np.broadcast_arrays(s, t, alpha, bound))
    bound = np.where(np.isfinite(bound), bound, 1.0)
    a, b, upper = s + 1, t - s, alpha > 0.5
    todo = np.flatnonzero(bound < 1)
    for attempt in range(60):
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            x, aj, bj, al, up = bound[todo], a[todo], b[todo], alpha[todo], upper[todo]
            excess = np.where(up, (1.0 - al) * (1.0 + 1e-9) - betainc(aj, bj, x),
                              betaincc(aj, bj, x) - al * (1.0 - 1e-9))
            keep = ~(excess <= 0)
            todo, excess, x, aj, bj = todo[keep], excess[keep], x[keep], aj[keep], bj[keep]
            if not len(todo):
                return bound.reshape(shape)
            density = np.exp(xlogy(aj - 1, x) + xlog1py(bj - 1, -x) - betaln(aj, bj))
            step = excess / density * (1.0 + 1e-6 * 2.0 ** attempt)
        step = np.where(np.isfinite(step) & (step > 0), step, 1.0 - x)  # no usable step: go to 1
        bound[todo] = np.minimum(x + step, 1.0)
    bound[todo] = 1.0  # not confirmed after 60 steps (never seen): no information
    return bound.reshape(shape)


@dataclass(frozen=True)
class CohenCertificate:
    """Result of :func:`certify`: arrays (or scalars) of predicted class, radius, the bound, and certified flags."""

    class_index: np.ndarray  # ABSTAIN (-1) where the procedure abstains
    radius: np.ndarray  # 0.0 where it abstains
    p_lower: np.ndarray  # Clopper-Pearson lower bound on P(f(x+e) = class) from the estimation counts
    certified: np.ndarray  # bool


def certify(selection_counts, estimation_counts, alpha, sigma, *, trials=None) -> CohenCertificate:
    """CERTIFY of Cohen et al.: class from the selection counts, radius from the estimation counts.

    ``selection_counts`` and ``estimation_counts`` have shape (..., K): per-class counts from two *independent*
    sets of noise samples (n0 and n). The class is ``argmax`` of the selection counts (first index on ties, as the
    reference), ``p_lower`` the one-sided (1 - alpha) Clopper-Pearson bound of its estimation count out of n.
    ``trials``: n, the estimation samples drawn (default: the estimation counts' sum). Pass it where a sample may
    count for no class (a noisy copy whose logits hold a NaN, models.sampling.tally_chunks): such a sample is a miss,
    and leaving it out of n would bound P(class | a class) >= pA instead of pA.
    Abstain (class -1, radius 0) when p_lower <= 1/2, else radius = sigma * Phi^-1(p_lower). (Strict: the reference
    abstains only when p_lower < 1/2 and so certifies the class at radius 0 when p_lower == 1/2, where pA = pB = 1/2 -
    a tie, under which the smoothed classifier need not return that class - is not excluded. The sequential and
    fixed-n routes use the same strict rule.)

    Guarantee (per input): with probability >= 1 - alpha over the estimation samples, the smoothed classifier g
    returns the reported class at every point within the reported radius (or the procedure abstains).
    """
    sel = check_nonneg_int(selection_counts, "selection_counts")
    est = check_nonneg_int(estimation_counts, "estimation_counts")
    if sel.ndim == 0 or sel.shape != est.shape:
        raise ValueError(
            f"selection_counts and estimation_counts must both have shape (..., num_classes); got {sel.shape} and {est.shape}"
        )
    check_sigma(sigma)
    # n = est.sum() in int64 wraps around past 2^63 (5 classes of 2^62 counts summed to 2^62 = the top class's count:
    # all hits, radius 1.76 sigma for an estimate of 1/5); refuse totals the counts' own limit (2^62) does not allow
    if np.any(est.sum(axis=-1, dtype=np.float64) >= 2.0**62):
        raise ValueError("estimation_counts must total below 2^62 per input")
    n = est.sum(axis=-1)
    if trials is not None:
        n = check_nonneg_int(trials, "trials")
        if np.any(n < est.sum(axis=-1)):
            raise ValueError("trials must be at least the estimation counts' sum (every counted sample was drawn)")
    c_hat = np.argmax(sel, axis=-1)
    n_a = np.take_along_axis(est, c_hat[..., None], axis=-1)[..., 0]
    p_lower = np.asarray(clopper_pearson_lower(n_a, n, alpha))
    certified = p_lower > 0.5  # strict (see docstring); the reference's `pABar < 0.5 -> abstain` differs only at 1/2
    radius = np.where(certified, radius_from_probability(p_lower, sigma), 0.0)
    cls = np.where(certified, c_hat, ABSTAIN)
    return CohenCertificate(_scalar(cls), _scalar(radius), _scalar(p_lower), _scalar(certified))


def predict(counts, alpha):
    """PREDICT of Cohen et al.: top-2 classes, two-sided binomial test of n_A vs n_B at p = 1/2.

    ``counts`` has shape (K,) or (M, K). Returns the top class, or ABSTAIN (-1) where the test's p-value > alpha.
    Guarantee (per input): the returned class differs from the smoothed classifier's class with probability
    <= alpha (Cohen et al., Proposition 1). Ties are broken as the reference: ``argsort`` order, reversed.
    """
    c = check_nonneg_int(counts, "counts")
    a = float(check_alpha(alpha))
    if c.ndim not in (1, 2) or c.shape[-1] < 2:
        raise ValueError(f"counts must have shape (num_classes,) or (batch, num_classes) with >= 2 classes; got {c.shape}")
    rows = c.reshape(-1, c.shape[-1])
    out = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        top2 = np.argsort(row, kind="stable")[::-1][:2]
        n_a, n_b = int(row[top2[0]]), int(row[top2[1]])
        if n_a + n_b == 0 or binomtest(n_a, n_a + n_b, p=0.5).pvalue > a:
            out[i] = ABSTAIN
        else:
            out[i] = top2[0]
    return int(out[0]) if c.ndim == 1 else out


def _scalar(x):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x
