"""Conversions between a lower bound on the top-class probability and a certified L2 radius.

Cohen et al. (2019), Theorem 1 with p_B = 1 - p_A: if P(f(x + e) = c) >= p > 1/2 for e ~ N(0, sigma^2 I), then the
smoothed classifier returns c everywhere within L2 distance sigma * Phi^-1(p) of x.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri

from smoothing._checks import _floats, check_probability, check_sigma

#: Relative amount by which every certified radius is shrunk, so that rounding inside ``ndtri`` (a few ulp)
#: can never make a reported radius larger than the exact one.
RADIUS_ROUNDING = 1e-10
#: Radii below the smallest normal float are reported as 0 (abstain): in the subnormal range a product is rounded to
#: a multiple of 5e-324, up to ~2x its exact value, which no relative rounding can cover (sigma = 1e-323, p = 0.6 gave
#: 5e-324 for an exact 2.5e-324).
_MIN_RADIUS = float(np.finfo(np.float64).tiny)


def radius_from_probability(p_lower, sigma):
    """Certified L2 radius sigma * Phi^-1(p_lower), or 0.0 (abstain) where p_lower <= 1/2.

    Guarantee: inherits the one of ``p_lower``. If ``p_lower`` is a lower bound on P(f(x+e) = c) holding with
    probability 1 - alpha (per input or marginally), the returned radius is certified with the same probability and in
    the same sense. The value is rounded down (relative 1e-10) so floating-point error never enlarges it.
    """
    r = validated_radius(check_probability(p_lower, "p_lower", open_interval=False), check_sigma(sigma))
    return r if r.ndim else float(r)


def radius_from_probit(z_lower, sigma):
    """Certified L2 radius sigma * z_lower for a lower bound z_lower on Phi^-1(pA), 0.0 (abstain) where z_lower <= 0.

    Guarantee: inherits the one of ``z_lower`` (as :func:`radius_from_probability`). Rounded down (relative 1e-10);
    an infinite bound (p_lower == 1, which no finite sample gives) certifies nothing rather than infinity.
    ``z_lower``: numbers (booleans, strings and complex values are refused, as everywhere in smoothing).
    """
    r = _radius_of_probit(_floats(z_lower, "z_lower"), check_sigma(sigma))
    return r if r.ndim else float(r)


def validated_radius_from_probit(z_lower, sigma):
    """:func:`radius_from_probit` (same guarantee, same values) for a float64 array ``z_lower`` and a ``sigma`` > 0
    the caller has validated (the served surrogate's calibrated answer, once per request)."""
    return _radius_of_probit(z_lower, sigma)


def validated_radius(p_lower, sigma):
    """:func:`radius_from_probability` (same guarantee, same values, always an array) for arguments the caller has
    already validated: float arrays, p_lower in [0, 1], sigma > 0. The stopping policies convert several bounds per
    job per engine step, where the repeated checks cost more than the conversion. (ndtri(1) = inf raises no
    floating-point flag, so no errstate is needed: the infinite radius is mapped to 0 below.)"""
    return _radius_of_probit(ndtri(np.where(p_lower > 0.5, p_lower, 0.5)), sigma)


def validated_radius_of_probit_one(z: float, sigma: float) -> float:
    """:func:`validated_radius_from_probit` of one probit bound on Python floats (the same operations in the same
    order as its array path, bit-identical; the served surrogate's one-image certificate uses it)."""
    r = sigma * z * (1.0 - RADIUS_ROUNDING) if z > 0 else 0.0
    return float(r) if np.isfinite(r) and r >= _MIN_RADIUS else 0.0


def _radius_of_probit(z, sigma):
    r = np.where(z > 0, sigma * np.where(z > 0, z, 0.0) * (1.0 - RADIUS_ROUNDING), 0.0)
    return np.where(np.isfinite(r) & (r >= _MIN_RADIUS), r, 0.0)


def probability_for_radius(radius, sigma):
    """The probability Phi(radius / sigma) that a lower bound must exceed to certify ``radius`` (finite numbers >= 0;
    booleans, strings and complex values are refused)."""
    r = _floats(radius, "radius")
    if r.size == 0 or not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    p = ndtr(r / check_sigma(sigma))
    return p if p.ndim else float(p)
