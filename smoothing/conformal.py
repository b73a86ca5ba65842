"""Split-conformal calibration of the RRISE surrogate (one forward pass -> a conservative radius).

Calibration: for each calibration image i (never seen by the surrogate's training), the surrogate gives its class
c_i and probability p_hat_i; n Monte-Carlo noise samples of the base model give the count k_i of class c_i, and
l_i = Clopper-Pearson lower bound (alpha_1) of k_i / n. Score s_i = p_hat_i - l_i; q_hat = the
ceil((m+1)(1-delta))-th smallest of the m scores. Deployment: radius sigma * Phi^-1(p_hat - q_hat) when
p_hat - q_hat > 1/2.

Guarantee (marginal, over exchangeable calibration and test inputs and the Monte-Carlo noise):
P(p_hat - q_hat > pA(c)) <= P(s_test > q_hat) + P(l_test > pA(c)) <= delta + alpha_1 = alpha_cal, hence
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


def rrise_scores(p_hat, class_counts, num_samples, alpha_1):
    """Nonconformity scores s_i = p_hat_i - CP_lower(k_i, n; alpha_1) for the surrogate's class c_i.

    ``p_hat``: surrogate probability of its top class; ``class_counts``: Monte-Carlo count of that same class out of
    ``num_samples`` noise samples of the base model. The class must be fixed by the surrogate before the counts are
    looked at (it is, when taken from the surrogate's forward pass).
    """
    p = np.asarray(p_hat, dtype=np.float64)
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError("p_hat must be probabilities in [0, 1]")
    return p - np.asarray(clopper_pearson_lower(class_counts, num_samples, alpha_1))


def rrise_lower(p_hat, q_hat: float):
    """Calibrated lower bound p_hat - q_hat (clipped to [0, 1]); marginally valid at delta + alpha_1 (see module)."""
    p = np.asarray(p_hat, dtype=np.float64)
    out = np.clip(p - q_hat, 0.0, 1.0) if math.isfinite(q_hat) else np.zeros_like(p)
    return out if out.ndim else float(out)


def rrise_radius(p_hat, q_hat: float, sigma):
    """Deployed surrogate radius sigma * Phi^-1(p_hat - q_hat), 0 (abstain) when p_hat - q_hat <= 1/2.

    Guarantee (marginal, level alpha_cal = delta + alpha_1 of the calibration that produced q_hat): over
    exchangeable inputs, P(returned radius > the smoothed classifier's true radius for the surrogate's class)
    <= alpha_cal. Rounded down.
    """
    check_sigma(sigma)
    return radius_from_probability(rrise_lower(p_hat, q_hat), sigma)
