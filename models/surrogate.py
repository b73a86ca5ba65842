"""The calibrated surrogate's answer for clean images: class, point estimate, and the conformal certificate at the
risk level a request's alpha selects (the bundle's ladder: the largest calibrated level <= alpha).

Shared by the certification service (one image per request) and the offline evaluation (a batch), so the served and
the evaluated surrogate certificates are the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.bundle import Calibration
from models.defaults import AUTO_MIN_SURROGATE_Z
from smoothing import surrogate_log_odds
from smoothing.conformal import (surrogate_log_odds_one, validated_conformal_certificate,
                                 validated_conformal_certificate_one)


@dataclass(frozen=True)
class SurrogateAnswers:
    """Per image: the surrogate's class, its log-odds, the point estimate z_hat of Phi^-1(pA) (uncalibrated: a
    proposal, never a certificate), and the calibrated p_lower / radius at ``level`` (None: alpha below every
    calibrated level; then radius 0 and p_lower None)."""

    class_index: np.ndarray
    log_odds: np.ndarray
    z_hat: np.ndarray
    p_lower: np.ndarray | None
    radius: np.ndarray
    level: float | None


def surrogate_answers(logits: np.ndarray, calibration: Calibration, sigma: float, alpha: float) -> SurrogateAnswers:
    """The surrogate's answers for a batch of logits (N, K) at the request level ``alpha``.

    Guarantee of ``radius`` (smoothing.conformal_certificate): marginal, per Mondrian bin, at the selected level
    (delta + alpha_1 <= alpha): over inputs exchangeable with the calibration inputs of their bin and over the
    calibration draw, P(radius > the smoothed classifier's true radius for ``class_index``) <= level. Not per input
    and not conditional on the surrogate having certified.

    A row with a non-finite logit (NaN, or +-inf from a float32 overflow or a log(softmax) graph) abstains: radius 0,
    p_lower 0, z_hat 0 (no proposal), log-odds NaN. The calibration has no score for such an output (its fit refuses
    them), and abstaining is never wrong; ``auto`` then samples (fallback surrogate_abstained) instead of a 500."""
    z = np.asarray(logits, dtype=np.float64)
    bad = ~np.all(np.isfinite(z), axis=1) if z.ndim == 2 else np.zeros(0, dtype=bool)
    cls, g = surrogate_log_odds(np.where(bad[:, None], 0.0, z) if bad.any() else z)
    level = calibration.level_for(alpha)
    point = level or calibration.levels[-1]  # the point estimate exists at every alpha (it only guides sampling)
    z_hat = np.interp(g, point.arrays["knots"], point.arrays["values"])  # smoothing.conformal.piecewise, checked
    if level is None:
        p_lower, radius = None, np.zeros(len(cls))
    else:  # smoothing.conformal_certificate on the level's arrays, checked once when the bundle loaded
        p_lower, radius = validated_conformal_certificate(g, float(sigma), **level.arrays)
    if bad.any():
        g, z_hat, radius = np.where(bad, np.nan, g), np.where(bad, 0.0, z_hat), np.where(bad, 0.0, radius)
        p_lower = None if p_lower is None else np.where(bad, 0.0, p_lower)
    return SurrogateAnswers(cls, g, z_hat, p_lower, radius, None if level is None else level.alpha)


@dataclass(frozen=True)
class SurrogateAnswer:
    """One image's :class:`SurrogateAnswers` row."""

    class_index: int
    z_hat: float
    p_lower: float | None
    radius: float
    level: float | None


def surrogate_answer(logits: np.ndarray, calibration: Calibration, sigma: float, alpha: float) -> SurrogateAnswer:
    """:func:`surrogate_answers` for one image's logits (1, K); same guarantee, same values bit for bit. Finite
    logits take the one-value kernels (smoothing.conformal's ``*_one``: 30-40 us instead of ~170 us per request on
    the event loop, on a 2-core machine); anything else (a non-finite logit, which abstains) takes the batch path."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2 and z.shape[0] == 1 and z.shape[1] >= 2 and np.isfinite(z).all():
        cls, g = surrogate_log_odds_one(z[0])
        level = calibration.level_for(alpha)
        point = level or calibration.levels[-1]
        z_hat = float(np.interp(g, point.arrays["knots"], point.arrays["values"]))
        if level is None:
            return SurrogateAnswer(cls, z_hat, None, 0.0, None)
        p_lower, radius = validated_conformal_certificate_one(g, float(sigma), **level.arrays)
        return SurrogateAnswer(cls, z_hat, p_lower, radius, level.alpha)
    a = surrogate_answers(z, calibration, sigma, alpha)
    return SurrogateAnswer(int(a.class_index[0]), float(a.z_hat[0]),
                           None if a.p_lower is None else float(a.p_lower[0]), float(a.radius[0]), a.level)


def auto_uses_surrogate(radius, sigma: float, min_z: float = AUTO_MIN_SURROGATE_Z):
    """Whether ``auto`` answers with the surrogate's certificate of calibrated ``radius`` (else the per-input path):
    it certifies (radius > 0) and radius >= min_z * sigma. A routing rule on the clean image only (no noise sample
    exists yet), so it changes neither guarantee: the per-input path holds for every input, and the surrogate's
    marginal statement was never conditional on its having answered. Vectorized."""
    r = np.asarray(radius, dtype=np.float64)
    out = (r > 0) & (r >= min_z * sigma)
    return out if out.ndim else bool(out)
