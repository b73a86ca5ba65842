"""Conformal calibration of the surrogate in radius (probit) units: Mondrian bins, a ladder of risk levels.

Construction (split conformal, Vovk et al. 2005; Mondrian / group-conditional conformal, Vovk 2003; the Monte-Carlo
label correction of RRISE). For an input x the surrogate's forward pass gives its class c(x) and the log-odds
g(x) = log p_hat - log(1 - p_hat) of that class (:func:`surrogate_log_odds`); everything below is a fixed function
of g, i.e. of the CLEAN input:

* point estimate z_hat(x) = h(g(x)) of Phi^-1(pA), h a non-decreasing piecewise-linear map fitted on tuning data
  (disjoint from the calibration split) and capped at the labels' largest value;
* scale u(x) = v(g(x)) > 0, the local spread of the residuals on the tuning data (normalized / locally weighted
  conformal, Lei et al. 2018), so one calibration covers both the surrogate's error and the label slack;
* bin b(x) = the interval of ``edges`` that g(x) falls in (edges fixed on the tuning data).

Label of calibration image i: n Monte-Carlo samples of the base model (n fixed in advance) give k_i hits of c_i;
l_i = one-sided Clopper-Pearson lower bound at alpha_1, and z_i = max(Phi^-1(l_i), 0). Score s_i = (z_hat_i - z_i) /
u_i. Per bin, q_b = the ceil((m_b + 1)(1 - delta))-th smallest of the m_b scores in the bin (+inf when that rank
exceeds m_b: the bin abstains). Deployed: z_lower = z_hat - q_b u, radius sigma * z_lower when z_lower > 0.

Guarantee (marginal, per bin): for a test input exchangeable with the calibration inputs of its bin, over the draw of
the test input, the calibration split and all Monte-Carlo noise,
    P(radius > sigma Phi^-1(pA) | b(x) = b) <= delta + alpha_1 = alpha (the level),
hence also unconditionally. Proof: if the radius is > 0 and exceeds the true radius, z_lower > max(Phi^-1(pA), 0);
on the event l <= pA (probability >= 1 - alpha_1) that gives z_lower > z, i.e. s > q_b (probability <= delta within
the bin). Clipping labels at 0 only lowers scores of inputs the surrogate must abstain on anyway. It is NOT a
per-input guarantee, it is not conditional on the surrogate having certified (answered), and it holds on average over
calibration draws: a given bundle's realised miss rate can exceed alpha (see :func:`training_conditional_rank` for the
PAC version, which bounds that too).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from scipy.special import ndtr, ndtri
from scipy.stats import beta as beta_dist

from smoothing._checks import _show, check_alpha
from smoothing.cohen import clopper_pearson_lower
from smoothing.radius import radius_from_probit, validated_radius_from_probit, validated_radius_of_probit_one

#: Risk levels a bundle is calibrated at (where its split is large enough), largest first.
DEFAULT_LEVELS = (0.1, 0.05, 0.01, 0.005, 0.001)
#: Share of a level spent on the Monte-Carlo labels: alpha_1 = alpha / 10, delta = alpha - alpha_1.
LABEL_SHARE = 0.1


def level_split(alpha: float) -> tuple[float, float]:
    """(delta, alpha_1) of the level ``alpha``: alpha_1 = alpha * LABEL_SHARE for the labels, delta the rest, rounded
    down where the floating-point difference would make delta + alpha_1 exceed alpha in exact arithmetic."""
    check_alpha(alpha)
    alpha_1 = float(alpha) * LABEL_SHARE
    delta = float(alpha) - alpha_1
    if Fraction(delta) + Fraction(alpha_1) > Fraction(float(alpha)):  # e.g. 0.01, 0.005: by ~1e-18
        delta = float(np.nextafter(delta, 0.0))
    return delta, alpha_1


def conformal_rank(num_scores: int, delta: float) -> int:
    """The finite-sample rank k = ceil((m+1)(1-delta)) (exact rational arithmetic on the given float delta)."""
    if num_scores < 1:
        raise ValueError(f"need at least one calibration score, got {num_scores}")
    check_alpha(delta, "delta")
    return math.ceil((num_scores + 1) * (1 - Fraction(float(delta))))


def training_conditional_rank(num_scores: int, delta: float, gamma: float) -> int:
    """The smallest rank k with P(coverage of the k-th smallest score < 1 - delta) <= gamma (PAC / training-
    conditional conformal, Vovk 2012): the coverage of the k-th order statistic of m continuous exchangeable scores is
    Beta(k, m + 1 - k). Returns m + 1 (no finite quantile) when even the largest score does not suffice."""
    if num_scores < 1:
        raise ValueError(f"need at least one calibration score, got {num_scores}")
    check_alpha(delta, "delta")
    check_alpha(gamma, "gamma")
    k = np.arange(1, num_scores + 1)
    tail = beta_dist.cdf(1.0 - delta, k, num_scores + 1 - k)
    ok = np.flatnonzero(tail <= gamma)
    rank = int(k[ok[0]]) if len(ok) else num_scores + 1
    while rank <= num_scores and not _rank_qualifies(num_scores, rank, tail[rank - 1], delta, gamma):
        rank += 1  # the double-precision tail said <= gamma, the exact one is above: one rank up (conservative)
    return rank


#: Relative distance from gamma within which :func:`_rank_qualifies` does not trust the double-precision Beta tail
#: (scipy's is accurate to ~1e-14 relative) and decides with :func:`_tail_exceeds` instead.
_TIE_WINDOW = 1e-9


def _rank_qualifies(num_scores: int, rank: int, tail: float, delta: float, gamma: float) -> bool:
    """Whether ``rank`` of ``num_scores`` meets the PAC condition, given ``tail`` = the double-precision
    P(Beta(rank, m + 1 - rank) < 1 - delta): tail <= gamma, and near a tie (within _TIE_WINDOW) also exactly. The
    one rule of :func:`training_conditional_rank` and :func:`training_conditional_min_size`."""
    if not tail <= gamma:
        return False
    return abs(tail - gamma) > _TIE_WINDOW * gamma or not _tail_exceeds(num_scores, rank, delta, gamma)


def _tail_exceeds(num_scores: int, rank: int, delta: float, gamma: float) -> bool:
    """Whether P(Beta(rank, m + 1 - rank) < 1 - delta) > gamma, decided at 80 significant digits (mpmath; delta and
    gamma taken as the exact binary values of the floats given). Used only near a tie: a tail that rounds to <= gamma
    in double precision but is above it would give a rank one too low, a PAC guarantee slightly weaker than stated.
    A tail within 1e-70 of gamma counts as equal (an exact tie, e.g. P(max of 2 uniforms < 0.5) = 0.25, qualifies:
    the condition is <= gamma). Hand-written around mpmath's regularized incomplete beta; scipy has no
    arbitrary-precision version."""
    import mpmath

    with mpmath.workdps(80):
        tail = mpmath.betainc(rank, num_scores + 1 - rank, 0, 1 - mpmath.mpf(float(delta)), regularized=True)
        return bool(tail - mpmath.mpf(float(gamma)) > mpmath.mpf(10) ** -70)


def min_calibration_size(delta: float) -> int:
    """Smallest number of calibration scores m for which the rank ceil((m+1)(1-delta)) is <= m (a finite q_hat).

    Exact, in closed form: for an integer m, ceil((m+1)(1-delta)) <= m iff (m+1)(1-delta) <= m iff m >= 1/delta - 1
    (rational arithmetic on the given float delta). A search upward from the float estimate 1/delta looped once per
    integer between that estimate and the exact value: ~10^9 steps at delta = 1e-25, so ``--levels 1e-25`` or such
    a level in a manifest hung the pipeline's up-front check, the fit and the bundle loader."""
    check_alpha(delta, "delta")
    return max(1, math.ceil(1 / Fraction(float(delta)) - 1))


def training_conditional_min_size(delta: float, gamma: float) -> int:
    """Smallest number of scores m for which :func:`training_conditional_rank` can be <= m (a finite PAC quantile):
    the largest of m scores has coverage Beta(m, 1), P(coverage < 1 - delta) = (1 - delta)^m, so m >= log(gamma) /
    log(1 - delta); the float estimate is then moved to where the rank's own rule (:func:`_rank_qualifies`, the same
    Beta CDF and tie decision) agrees (a few steps)."""
    check_alpha(delta, "delta")
    check_alpha(gamma, "gamma")
    estimate = math.log(gamma) / math.log1p(-float(delta))
    if not estimate < 2**53:  # beyond exact float integers (or overflowed, delta ~1e-320): log(1/gamma) / delta,
        return math.ceil(Fraction(-math.log(gamma)) / Fraction(float(delta)))  # never below the exact m
    m = max(1, math.ceil(estimate))
    def largest_qualifies(size):  # the largest of ``size`` scores meets the PAC condition
        return _rank_qualifies(size, size, float(beta_dist.cdf(1.0 - delta, size, 1)), delta, gamma)

    for _ in range(4):
        if not largest_qualifies(m):
            m += 1
        elif m > 1 and largest_qualifies(m - 1):
            m -= 1
    return m


def conformal_quantile(scores, delta: float, *, gamma: float | None = None) -> float:
    """Split-conformal quantile: the k-th smallest score, +inf when k exceeds m. k = ceil((m+1)(1-delta)) (marginal:
    P(s_new > q) <= delta over the calibration draw and s_new) or, with ``gamma``, the larger of that rank and the
    training-conditional rank (P over the calibration draw that P(s_new > q | calibration) > delta is <= gamma), so
    that both guarantees hold: the certificate states the marginal one, and for gamma >~ 0.45 the training-conditional
    rank alone can be below the marginal rank (m = 18, delta = 0.09, gamma = 0.9: rank 16, miss rate 3/19 = 0.16)."""
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError("scores must be a non-empty array of finite numbers")
    k = conformal_rank(arr.size, delta)
    if gamma is not None:
        k = max(k, training_conditional_rank(arr.size, delta, gamma))
    if k > arr.size:
        return math.inf
    return float(np.partition(arr, k - 1)[k - 1])


def surrogate_log_odds(logits) -> tuple[np.ndarray, np.ndarray]:
    """(class (N,), log-odds (N,)) of the surrogate's top class from its logits (N, K): g = z_c - logsumexp(z_-c),
    computed without forming 1 - p_hat (which rounds to 0 for confident inputs)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2 or not np.all(np.isfinite(z)):
        raise ValueError(f"logits must be a finite (N, K) array with K >= 2, got shape {z.shape}")
    c = z.argmax(axis=1)
    rows = np.arange(len(z))
    others = z.copy()
    others[rows, c] = -np.inf
    top = others.max(axis=1)  # finite: K >= 2 finite logits leave one
    # log-sum-exp by hand: scipy's (array-API dispatch) costs ~0.25 ms per request on the surrogate path, this ~10 us
    return c, z[rows, c] - (top + np.log(np.exp(others - top[:, None]).sum(axis=1)))


def surrogate_log_odds_one(row) -> tuple[int, float]:
    """:func:`surrogate_log_odds` of ONE finite logit row (K,), K >= 2, already validated (the served surrogate's
    answer, once per request): the same numpy operations on the row, so (class, log-odds) are bit for bit the batch's
    row (tests/test_surrogate_one.py), at a fraction of the cost of the 2-d path's fancy indexing."""
    c = int(row.argmax())
    others = row.copy()
    others[c] = -np.inf
    top = others.max()
    return c, float(row[c] - (top + np.log(np.exp(others - top).sum())))


def probit_labels(class_counts, num_samples, alpha_1) -> np.ndarray:
    """Labels z_i = max(Phi^-1(l_i), 0), l_i the one-sided (1 - alpha_1) Clopper-Pearson lower bound of k_i / n.

    ``class_counts``: Monte-Carlo count of the surrogate's class out of ``num_samples`` (fixed in advance) noise
    samples of the base model; the class must be fixed (by the surrogate's clean forward pass) before the counts.
    P(l_i > pA_i) <= alpha_1 per image."""
    lower = np.asarray(clopper_pearson_lower(class_counts, num_samples, alpha_1), dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.maximum(ndtri(lower), 0.0)


def piecewise(g, knots, values) -> np.ndarray:
    """The piecewise-linear map through (knots, values), constant beyond the end knots (np.interp)."""
    knots, values = _checked_knots(knots, values)
    return np.interp(np.asarray(g, dtype=np.float64), knots, values)


def _checked_knots(knots, values) -> tuple[np.ndarray, np.ndarray]:
    knots, values = np.asarray(knots, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if knots.ndim != 1 or knots.shape != values.shape or knots.size < 1 or np.any(np.diff(knots) <= 0):
        raise ValueError("knots must be strictly increasing and as many as values")
    return knots, values


def bin_index(g, edges) -> np.ndarray:
    """Bin of each log-odds value: 0 below edges[0], i where edges[i-1] <= g < edges[i], len(edges) above."""
    return np.searchsorted(_checked_edges(edges), np.asarray(g, dtype=np.float64), side="right")


def _checked_edges(edges) -> np.ndarray:
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or np.any(np.diff(edges) <= 0):
        raise ValueError("bin edges must be a strictly increasing 1-d array")
    return edges


def mondrian_quantiles(scores, bins, num_bins: int, delta: float, *, gamma: float | None = None) -> np.ndarray:
    """Per-bin conformal quantiles (num_bins,): bin b's quantile of the scores whose ``bins`` entry is b (+inf for a
    bin with too few scores). Guarantee (per bin): P(s_new > q_b | new input in bin b) <= delta (marginal) or the
    training-conditional version with ``gamma``; see :func:`conformal_quantile`. ``bins``: integer bin indices
    (whole floats allowed); a fractional or NaN label (its score would fall in no bin), a boolean or a string is
    refused."""
    s, b = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(bins).ravel()
    if b.dtype.kind not in "iuf" or (b.dtype.kind == "f" and not np.all(np.isfinite(b) & (b == np.round(b)))):
        raise ValueError(f"bins must be integer bin indices, got {_show(bins)}")
    if s.shape != b.shape:
        raise ValueError(f"scores and bins differ in length ({s.size} vs {b.size})")
    if b.size and (b.min() < 0 or b.max() >= num_bins):
        raise ValueError(f"bin indices must lie in [0, {num_bins})")
    return np.array([conformal_quantile(s[b == i], delta, gamma=gamma) if np.any(b == i) else math.inf
                     for i in range(num_bins)])


def conformal_lower(g, *, knots, values, scale, edges, q_hat) -> np.ndarray:
    """z_lower = h(g) - q_b v(g) (-inf where the bin's quantile is infinite); ``scale`` are v's values at ``knots``."""
    edges = _checked_edges(edges)  # the checks of bin_index and piecewise, in their order
    knots, values = _checked_knots(knots, values)
    scale = _checked_knots(knots, scale)[1]
    g, q_hat = np.asarray(g, dtype=np.float64), np.asarray(q_hat, dtype=np.float64)
    _check_level(g, knots, values, scale, edges, q_hat)
    return _lower_of_checked(g, knots, values, scale, edges, q_hat)


def _check_level(g, knots, values, scale, edges, q_hat) -> None:
    """ValueError unless the arrays are what :func:`validated_conformal_certificate` assumes (and what a fit and the
    bundle's schema give): finite knots, values and edges, every scale finite and > 0, one quantile per bin (finite,
    or +inf: the bin abstains), log-odds that are numbers (+-inf allowed). Unchecked, a negative scale turned the
    quantile's correction around (a radius above the point estimate's), a NaN map or log-odds gave p_lower NaN, and
    a q_hat shorter than the bins raised IndexError (a longer one was silently cut)."""
    if not (np.all(np.isfinite(knots)) and np.all(np.isfinite(values)) and np.all(np.isfinite(edges))):
        raise ValueError("knots, values and bin edges must be finite numbers")
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise ValueError(f"every scale must be a finite number > 0 (scores are divided by it), got {scale.tolist()}")
    if q_hat.shape != (edges.size + 1,) or np.any(np.isnan(q_hat)) or np.any(q_hat == -np.inf):
        raise ValueError(f"q_hat must hold one quantile per bin ({edges.size + 1} for {edges.size} bin edges), each "
                         f"finite or +inf (the bin abstains), got {q_hat.tolist()}")
    if np.any(np.isnan(g)):
        raise ValueError("log-odds g must be numbers (+-inf allowed), got NaN")


#: Absolute rounding allowance of z_lower = h(g) - q v(g), relative to the magnitudes of the level's maps (not of
#: z_lower): where h(g) and q v(g) nearly cancel, the few-ulp errors of np.interp and of the product are large relative
#: to z_lower, which RADIUS_ROUNDING (relative to the radius) does not cover.
LOWER_ROUNDING = 1e-12


def _lower_of_checked(g, knots, values, scale, edges, q_hat) -> np.ndarray:
    """:func:`conformal_lower` on float64 arrays already checked (:func:`bin_index`, then :func:`piecewise` twice);
    lowered by LOWER_ROUNDING x (max |values| + |q| max scale), so floating-point error never raises it above the
    exact value of h(g) - q v(g) for the float g."""
    q = q_hat[np.searchsorted(edges, g, side="right")]
    z_hat, u = np.interp(g, knots, values), np.interp(g, knots, scale)
    with np.errstate(invalid="ignore"):
        slack = LOWER_ROUNDING * (np.abs(values).max() + np.abs(q) * scale.max())
        return np.where(np.isfinite(q), z_hat - q * u - slack, -np.inf)


#: Margins of :func:`_p_lower` over scipy's ndtr, which is NOT correctly rounded and has no documented error bound.
#: Measured against 160-bit mpmath on ~40,000 seeded z in [-38.5, 9]: |error| <= 1.7 x 2^-53 for z >= 0 (1.26 ulp
#: near z = 1.4, so "one ulp down" was above Phi(z) for 142 of 20,000 z in [0.9, 1.6]) and relative error <=
#: (8 + z^2) 2^-52 for z < 0 (the tail is exp(-z^2/2) of a rounded z^2: ~2,000 ulp at z = -37). The margins are twice
#: that or more; for z >= 0 the absolute one (5 x 2^-53 with the rounding) stays below the 8 ulp of p_lower that
#: certification.verify allows for the server's rounding, so a radius signed next to it is never refused there.
PHI_ABS_MARGIN = 4 * 2.0**-53
PHI_REL_MARGIN = 2.0**-52  # times 16 + 2 z^2, for z < 0
_SMALLEST_NORMAL = float(np.finfo(np.float64).tiny)


def _p_lower(z) -> np.ndarray:
    """Phi(z) rounded down with a margin for ndtr's own error: ndtr(z) - 4 x 2^-53 for z >= 0 (exact: ndtr(z) >= 1/2
    there), ndtr(z) (1 - (16 + 2 z^2) 2^-52) one ulp down for z < 0, 0 below the smallest normal float (where ndtr's
    relative error is unbounded). Guaranteed: p_lower <= Phi(z) exactly, for the float z, wherever ndtr's error is
    within those margins (:data:`PHI_ABS_MARGIN`: measured, not proved; each margin is >= 2x the measured error).
    NaN stays NaN."""
    z = np.asarray(z, dtype=np.float64)
    v = ndtr(z)
    with np.errstate(invalid="ignore", over="ignore"):
        rel = np.minimum((16.0 + 2.0 * z * z) * PHI_REL_MARGIN, 1.0)  # z = -inf: 0 * (1 - 1), not 0 * -inf
        p = np.where(z >= 0.0, v - PHI_ABS_MARGIN, np.nextafter(v * (1.0 - rel), 0.0))
    return np.where(p < _SMALLEST_NORMAL, 0.0, p)


def _p_lower_one(z: float) -> float:
    """:func:`_p_lower` of one float z, on Python floats: the same operations in the same order (bit-identical; same
    guarantee)."""
    v = float(ndtr(z))
    if z >= 0.0:
        p = v - PHI_ABS_MARGIN
    else:
        p = math.nextafter(v * (1.0 - min((16.0 + 2.0 * z * z) * PHI_REL_MARGIN, 1.0)), 0.0)
    return 0.0 if p < _SMALLEST_NORMAL else p


def _certificate(z, radius) -> tuple[np.ndarray, np.ndarray]:
    """(p_lower, radius) with radius 0 where p_lower is not above 1/2: for 0 < z_lower < ~1.2e-15, Phi(z_lower)
    less :data:`PHI_ABS_MARGIN` is 1/2 or below, and a radius next to it contradicts it (certification.verify refuses
    such a certificate as inconsistent); that radius is below 2e-15 sigma, so abstaining there loses nothing."""
    p = _p_lower(z)
    return p, np.where(p > 0.5, radius, 0.0)


def conformal_certificate(g, sigma, **calibration) -> tuple[np.ndarray, np.ndarray]:
    """(p_lower, radius) of the calibrated surrogate for log-odds ``g`` at one level's ``calibration`` (the keyword
    arguments of :func:`conformal_lower`).

    Guarantee (marginal, per bin; module docstring): over inputs exchangeable with the calibration inputs of their
    bin and over the calibration draw, P(radius > the smoothed classifier's true radius for the surrogate's class)
    <= the level (delta + alpha_1); not per input, not conditional on certifying. radius = sigma z_lower rounded
    down, 0 (abstain) where z_lower <= 0; p_lower = Phi(z_lower) rounded down with a margin for ndtr's error
    (:func:`_p_lower`; 0 where the bin abstains)."""
    z = conformal_lower(g, **calibration)
    return _certificate(z, radius_from_probit(z, sigma))


def validated_conformal_certificate_one(g: float, sigma: float, *, knots, values, scale, edges,
                                        q_hat) -> tuple[float, float]:
    """:func:`validated_conformal_certificate` (same guarantee) for ONE log-odds value, on Python floats: the same
    operations in the same order as :func:`_lower_of_checked`, :func:`_p_lower` and the radius of
    :func:`smoothing.radius.validated_radius_from_probit`, so (p_lower, radius) are bit for bit the array path's
    (tests/test_surrogate_one.py compares them over seeded grids); the served surrogate answers one image per request
    and the array path's numpy calls on one-element arrays cost ~10x more than the answer itself.

    Guarantee (marginal, per bin; module docstring): over inputs exchangeable with the calibration inputs of their
    bin and over the calibration draw, P(radius > the smoothed classifier's true radius for the surrogate's class)
    <= the level; not per input, not conditional on certifying. Rounded down as the array path."""
    q = float(q_hat[int(np.searchsorted(edges, g, side="right"))])
    if math.isfinite(q):
        z_hat, u = float(np.interp(g, knots, values)), float(np.interp(g, knots, scale))
        slack = LOWER_ROUNDING * (float(np.abs(values).max()) + abs(q) * float(scale.max()))
        z = z_hat - q * u - slack
    else:  # the bin abstains
        z = -math.inf
    p = _p_lower_one(z)
    return p, (validated_radius_of_probit_one(z, sigma) if p > 0.5 else 0.0)  # as _certificate


def validated_conformal_certificate(g, sigma, *, knots, values, scale, edges, q_hat) -> tuple[np.ndarray, np.ndarray]:
    """:func:`conformal_certificate` (same guarantee, same values, bit for bit) for float64 arrays the caller has
    validated: ``knots`` strictly increasing with as many ``values`` and ``scale`` (> 0), ``edges`` strictly
    increasing, one ``q_hat`` per bin (+inf: the bin abstains), log-odds ``g``, ``sigma`` > 0. The served surrogate
    answers every request from one bundle's calibration, which models.bundle checks when the bundle loads; checking
    it again per request cost more than the answer itself.

    Guarantee (marginal, per bin; module docstring): over inputs exchangeable with the calibration inputs of their
    bin and over the calibration draw, P(radius > the smoothed classifier's true radius for the surrogate's class)
    <= the level; not per input, not conditional on certifying."""
    z = _lower_of_checked(g, knots, values, scale, edges, q_hat)
    return _certificate(z, validated_radius_from_probit(z, sigma))
