"""Split-conformal calibration of the RRISE surrogate (one forward pass -> a conservative radius).

Calibration: for each calibration image i (never seen by the surrogate's training), the surrogate gives its class
c_i and probability p_hat_i; n Monte-Carlo noise samples of the base model give the count k_i of class c_i, and
l_i = Clopper-Pearson lower bound (alpha_1) of k_i / n. Score s_i = (p_hat_i - l_i) / w(p_hat_i); q_hat = the
ceil((m+1)(1-delta))-th smallest of the m scores. Deployment: lower bound p_hat - q_hat * w(p_hat), radius
sigma * Phi^-1(that) when it exceeds 1/2.

Weights: w = 1 is RRISE's additive score. w(p) = 1 - p + epsilon ("normalized", locally weighted conformal) scales
the margin with the surrogate's own uncertainty: at an extreme quantile such as delta = 0.0005 the additive q_hat is
set by a few ambiguous images on which the surrogate is overconfident (p_hat ~ 0.8, pA ~ 0.4), and would be
subtracted from every image; with weights, confident images pay a small margin and uncertain ones a large one.
Any weight that is a fixed function of the clean input is allowed; epsilon is chosen on data disjoint from the
calibration split and recorded in the bundle.

Guarantee (marginal, over exchangeable calibration and test inputs and the Monte-Carlo noise), for either weight:
P(p_hat - q_hat w > pA(c)) <= P(s_test > q_hat) + P(l_test > pA(c)) <= delta + alpha_1 = alpha_cal, hence
P(deployed radius > true radius of class c) <= alpha_cal. It is NOT a per-input guarantee.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from smoothing._checks import check_alpha, check_sigma
from smoothing.cohen import clopper_pearson_lower
from smoothing.radius import radius_from_probability


def conformal_rank(num_scores: int, delta: float) -> int:
    """The finite-sample rank k = ceil((m+1)(1-delta)) (exact rational arithmetic on the given float delta)."""
    if num_scores < 1:
        raise ValueError(f"need at least one calibration score, got {num_scores}")
    check_alpha(delta, "delta")
    return math.ceil((num_scores + 1) * (1 - Fraction(float(delta))))


def min_calibration_size(delta: float) -> int:
    """Smallest number of calibration scores m for which the rank ceil((m+1)(1-delta)) is <= m (a finite q_hat)."""
    check_alpha(delta, "delta")
    m = max(1, math.floor(1 / float(delta)) - 2)
    while conformal_rank(m, delta) > m:
        m += 1
    return m


def conformal_quantile(scores, delta: float) -> float:
    """Split-conformal quantile: the ceil((m+1)(1-delta))-th smallest score, +inf when that rank exceeds m.

    Guarantee (marginal): for a new score exchangeable with the m calibration scores, P(s_new > q_hat) <= delta.
    """
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError("scores must be a non-empty array of finite numbers")
    k = conformal_rank(arr.size, delta)
    if k > arr.size:
        return math.inf
    return float(np.partition(arr, k - 1)[k - 1])


def score_weight(p_hat, epsilon: float | None):
    """w(p_hat): 1 (additive score) when epsilon is None, else 1 - p_hat + epsilon (normalized score)."""
    if epsilon is None:
        return np.ones_like(np.asarray(p_hat, dtype=np.float64))
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0 (or None for the additive score), got {epsilon!r}")
    return 1.0 - np.asarray(p_hat, dtype=np.float64) + epsilon


def rrise_scores(p_hat, class_counts, num_samples, alpha_1, epsilon: float | None = None):
    """Nonconformity scores s_i = (p_hat_i - CP_lower(k_i, n; alpha_1)) / w(p_hat_i) for the surrogate's class c_i.

    ``p_hat``: surrogate probability of its top class; ``class_counts``: Monte-Carlo count of that same class out of
    ``num_samples`` noise samples of the base model. The class must be fixed by the surrogate before the counts are
    looked at (it is, when taken from the surrogate's forward pass).
    """
    p = np.asarray(p_hat, dtype=np.float64)
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError("p_hat must be probabilities in [0, 1]")
    return (p - np.asarray(clopper_pearson_lower(class_counts, num_samples, alpha_1))) / score_weight(p, epsilon)


def rrise_lower(p_hat, q_hat: float, epsilon: float | None = None):
    """Calibrated lower bound p_hat - q_hat * w(p_hat), clipped to [0, 1]; marginally valid at delta + alpha_1.

    Must be called with the epsilon the scores were computed with (the bundle records it).
    """
    p = np.asarray(p_hat, dtype=np.float64)
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError("p_hat must be probabilities in [0, 1]")
    if math.isfinite(q_hat):
        out = np.clip(p - q_hat * score_weight(p, epsilon), 0.0, 1.0)
    else:
        out = np.zeros_like(p)
    return out if out.ndim else float(out)


def rrise_radius(p_hat, q_hat: float, sigma, epsilon: float | None = None):
    """Deployed surrogate radius sigma * Phi^-1(p_hat - q_hat * w(p_hat)), 0 (abstain) when that is <= 1/2.

    Guarantee (marginal, level alpha_cal = delta + alpha_1 of the calibration that produced q_hat): over
    exchangeable inputs, P(returned radius > the smoothed classifier's true radius for the surrogate's class)
    <= alpha_cal. Rounded down.
    """
    check_sigma(sigma)
    return radius_from_probability(rrise_lower(p_hat, q_hat, epsilon), sigma)
