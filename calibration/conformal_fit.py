"""Fitting the surrogate's conformal calibration (:mod:`smoothing.conformal`) from Monte-Carlo labels.

The calibration split (a seeded random subset of the training pool, kept in index order) is cut in two disjoint
parts before any label is read: a seeded random ``tune_size`` of its images and the rest (:func:`tuning_positions`;
the cut is recorded in the provenance as ``tuning_cut``). Not its first images: in index order those are the
lowest pool indices, and a pool stored in order (an .npz sorted by class) would then tune on some classes and
calibrate on others, whose scores are not exchangeable with a test input's. Bundles fitted before 2026-12-05 (the
shipped one) record no ``tuning_cut``: their first ``num_tuning`` images tuned.

* TUNING fits every knob: the point-estimate map h (isotonic regression of the probit labels on the surrogate's
  log-odds, capped at the largest label), the scale map v (the local mean absolute residual, floored), and the
  Mondrian bin edges (quantiles of the log-odds);
* CALIBRATION gives only the per-bin conformal quantiles. Nothing fitted on it is tuned, so its scores are
  exchangeable with a new input's and the guarantee of :mod:`smoothing.conformal` holds.

One such fit per risk level of the ladder (each level has its own label share alpha_1 = alpha / 10 and its own
number of bins: as many as keep >= ``bin_slack`` x the minimum calibration size in each, at most ``max_bins``; with
``gamma``, the size the training-conditional rank needs, :func:`level_min_images`). Levels whose calibration part is
too small for even one bin are left out.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from scipy.optimize import isotonic_regression
from scipy.special import expit, ndtri

from smoothing import clopper_pearson_lower
from smoothing.conformal import (DEFAULT_LEVELS, bin_index, level_split, min_calibration_size, mondrian_quantiles,
                                 piecewise, probit_labels, training_conditional_min_size)

TUNING_STREAM = 71205  # the tuning cut draws from default_rng([split seed, TUNING_STREAM])
SCALE_FLOOR = 0.05  # probit units: no bin may claim a spread below this (about 0.0125 in radius at sigma 0.25)
BIN_SLACK = 1.05  # a level gets as many bins as keep >= BIN_SLACK x its minimum calibration size in each


def level_min_images(alpha: float, bin_slack: float = BIN_SLACK, gamma: float | None = None) -> int:
    """Calibration images (besides the tuning ones) that level ``alpha`` needs to be fitted at all (one bin):
    ceil(bin_slack x the minimum number of scores for a finite quantile: min_calibration_size(delta), with ``gamma``
    the larger training_conditional_min_size(delta, gamma)); :func:`fit_level` leaves the level out below it. The one
    rule behind the fit, its refusal message and the pipeline's check before any work. (With gamma it used the
    marginal minimum: a level kept, advertised, and abstaining in every bin, which one bin would have certified.)"""
    delta = level_split(alpha)[0]
    need = min_calibration_size(delta)
    if gamma is not None:
        need = max(need, training_conditional_min_size(delta, gamma))
    # the float product as the fit has always used it; exact where need is beyond floats (a level below ~1e-307)
    return math.ceil(bin_slack * need) if need < 2**1000 else math.ceil(Fraction(bin_slack) * need)


def fit_calibration(g_tune, hits_tune, g_cal, hits_cal, num_samples: int, *, levels=DEFAULT_LEVELS,
                    max_bins: int = 8, num_knots: int = 48, bin_slack: float = BIN_SLACK, gamma: float | None = None,
                    scale: str = "spread", point: str = "isotonic") -> dict:
    """The bundle's ``calibration`` block: one fitted level per alpha of ``levels`` that the split supports.

    ``g_*``: the surrogate's log-odds of its class; ``hits_*``: Monte-Carlo count of that class out of
    ``num_samples``; ``scale``: "spread" (normalized scores) or "unit" (additive probit scores); ``point``:
    "isotonic" (h fitted to the tuning labels) or "raw" (h = Phi^-1 of the surrogate's own probability, capped)."""
    g_tune, g_cal = np.asarray(g_tune, np.float64), np.asarray(g_cal, np.float64)
    fitted = []
    for alpha in sorted(levels, reverse=True):
        level = fit_level(g_tune, hits_tune, g_cal, hits_cal, num_samples, alpha, max_bins=max_bins,
                          num_knots=num_knots, bin_slack=bin_slack, gamma=gamma, scale=scale, point=point)
        if level is not None:
            fitted.append(level)
    if not fitted:
        raise ValueError(f"{len(g_cal)} calibration images are too few for any level of {list(levels)} "
                         f"(level {max(levels)} needs {level_min_images(max(levels), bin_slack, gamma)})")
    return {"method": "probit-mondrian", "guarantee": "marginal" if gamma is None else "training-conditional",
            "gamma": gamma, "samples_per_image": int(num_samples), "num_calibration": int(len(g_cal)),
            "num_tuning": int(len(g_tune)), "levels": fitted}


def fit_level(g_tune, hits_tune, g_cal, hits_cal, num_samples, alpha, *, max_bins, num_knots, bin_slack, gamma,
              scale, point="isotonic") -> dict | None:
    """One level: maps and edges from the tuning part, per-bin quantiles from the calibration part (None: too few)."""
    delta, alpha_1 = level_split(alpha)
    num_bins = min(max_bins, int(len(g_cal) // level_min_images(alpha, bin_slack, gamma)))
    if num_bins < 1:
        return None
    z_tune = probit_labels(hits_tune, num_samples, alpha_1)
    cap = float(ndtri(clopper_pearson_lower(num_samples, num_samples, alpha_1)))  # the largest possible label
    knots, values = point_map(g_tune, z_tune, num_knots, cap)
    if point == "raw":  # the surrogate's own probability, p = sigmoid(g), in probit units (for comparison)
        values = np.clip(ndtri(expit(knots)), 0.0, cap)
    spread = (scale_map(g_tune, z_tune - piecewise(g_tune, knots, values), knots) if scale == "spread"
              else np.ones_like(knots))
    edges = bin_edges(g_tune, num_bins)
    z_cal = probit_labels(hits_cal, num_samples, alpha_1)
    scores = (piecewise(g_cal, knots, values) - z_cal) / piecewise(g_cal, knots, spread)
    bins = bin_index(g_cal, edges)
    q = mondrian_quantiles(scores, bins, len(edges) + 1, delta, gamma=gamma)
    return {"alpha": float(alpha), "delta": delta, "alpha_1": alpha_1, "knots": knots.tolist(),
            "values": values.tolist(), "scale": spread.tolist(), "edges": edges.tolist(),
            "q_hat": [float(v) if math.isfinite(v) else None for v in q],
            "bin_sizes": np.bincount(bins, minlength=len(edges) + 1).tolist()}


def point_map(g, z, num_knots: int, cap: float) -> tuple[np.ndarray, np.ndarray]:
    """h: the isotonic (non-decreasing) regression of labels z on log-odds g, read off at ``num_knots`` quantiles
    of g and capped at ``cap``; a fixed function of the clean input once fitted."""
    order = np.argsort(g, kind="stable")
    fit = isotonic_regression(np.asarray(z, np.float64)[order]).x
    knots = np.unique(np.quantile(g, np.linspace(0, 1, num_knots)))
    values = np.interp(knots, np.asarray(g)[order], fit)
    return knots, np.clip(np.maximum.accumulate(values), 0.0, cap)


def scale_map(g, residual, knots, *, window: float = 0.1) -> np.ndarray:
    """v: the mean absolute residual of the ``window`` share of tuning points nearest in log-odds rank to each knot,
    floored at SCALE_FLOOR (normalized conformal scores; any fixed positive function keeps validity)."""
    order = np.argsort(g, kind="stable")
    g_sorted, r_sorted = np.asarray(g)[order], np.abs(np.asarray(residual))[order]
    half = max(5, int(window * len(g_sorted) / 2))
    at = np.clip(np.searchsorted(g_sorted, knots), 0, len(g_sorted) - 1)
    spread = np.array([r_sorted[max(0, i - half): i + half + 1].mean() for i in at])
    return np.maximum(spread, SCALE_FLOOR)


def bin_edges(g, num_bins: int) -> np.ndarray:
    """Interior edges at the j / num_bins quantiles of the tuning log-odds (duplicates from ties dropped)."""
    if num_bins <= 1:
        return np.zeros(0)
    return np.unique(np.quantile(g, np.arange(1, num_bins) / num_bins))


def tuning_cut(split_seed: int) -> dict:
    """The provenance record of a seeded tuning cut (what :func:`tuning_positions` reads back)."""
    return {"method": "seeded-permutation", "seed": int(split_seed), "stream": TUNING_STREAM}


def tuning_positions(num_images: int, num_tuning: int, record: dict | None) -> np.ndarray:
    """Sorted positions, among the ``num_images`` labelled calibration images, of the ``num_tuning`` that tuned, as
    ``record`` says (the provenance entry of the run that fitted the calibration, see :func:`calibration_record`):
    its ``tuning_cut``, or the first ``num_tuning`` for a record without one (fitted before 2026-12-05). The one
    place that knows the cut: the fit and every bench that needs the tuning images go through it."""
    if not 0 < num_tuning < num_images:
        raise ValueError(f"tune_size must lie in (0, {num_images}), got {num_tuning}")
    cut = (record or {}).get("tuning_cut")
    if cut is None:
        return np.arange(num_tuning)
    if cut.get("method") != "seeded-permutation":
        raise ValueError(f"unknown tuning cut {cut!r}")
    rng = np.random.default_rng([int(cut["seed"]), int(cut["stream"])])
    return np.sort(rng.permutation(num_images)[:num_tuning])


def calibration_record(provenance: dict | None) -> dict:
    """The provenance entry of the run that fitted a bundle's current calibration block: its latest recalibration,
    else the build itself (the top-level provenance)."""
    provenance = provenance or {}
    return provenance.get("recalibration") or provenance


def tuning_indices(provenance: dict | None, num_tuning: int, num_calibration: int, num_train: int) -> np.ndarray | None:
    """Pool indices of the tuning images of a bundle's calibration block (fitted on ``num_tuning + num_calibration``
    images of a pool of ``num_train``), as its provenance records them: a seeded random subset of the calibration
    split (``Splits.limited``) cut by :func:`tuning_positions`; for a record without ``tuning_cut`` (before
    2026-12-05), the split's first images, as subsets were taken then. None where no splits are recorded or
    make_splits does not rebuild them (a --base build that kept declared training images out)."""
    from calibration.data import make_splits

    provenance = provenance or {}
    record = calibration_record(provenance)
    rec = record.get("splits")
    if not rec:
        return None
    splits = make_splits(num_train, calibration=rec["calibration"], surrogate_train=rec["surrogate_train"],
                         seed=rec["seed"])
    if (splits if record is not provenance else splits.limited(provenance.get("limit"))).record() != rec:
        return None
    n = num_tuning + num_calibration
    used = splits.calibration[:n] if "tuning_cut" not in record else splits.limited(n).calibration
    if len(used) != n:
        raise ValueError(f"the calibration split has {len(used)} images, the calibration was fitted on {n}")
    return used[tuning_positions(n, num_tuning, record)]


def calibrate_surrogate(surrogate, images, counts, num_samples: int, *, tune_size: int, cut: dict | str,
                        **options) -> dict:
    """The calibration block of ``surrogate`` (a backend with ``forward``) from full Monte-Carlo class counts
    (N, K) of ``images``: a seeded random ``tune_size`` of the images tune (``cut``, from :func:`tuning_cut`,
    fixed before the labels are read; ``"first"``: the first ``tune_size``, the cut of bundles fitted before
    2026-12-05, recorded as no ``tuning_cut``), the rest calibrate. The surrogate's class is taken from its clean
    forward pass, then its count is read."""
    from smoothing import surrogate_log_odds

    if cut != "first" and (not isinstance(cut, dict) or cut.get("method") != "seeded-permutation"):
        raise ValueError(f"cut must be a seeded tuning cut (tuning_cut(split_seed)) or 'first', got {cut!r}")
    if len(counts) != len(images):
        raise ValueError(f"{len(counts)} count rows for {len(images)} images")
    tune = tuning_positions(len(images), tune_size, None if cut == "first" else {"tuning_cut": cut})
    cal = np.setdiff1d(np.arange(len(images)), tune)
    cls, g = surrogate_log_odds(surrogate.forward(images))
    hits = np.asarray(counts)[np.arange(len(cls)), cls]
    return fit_calibration(g[tune], hits[tune], g[cal], hits[cal], num_samples, **options)


def describe(block: dict) -> str:
    """One line per level: alpha, bins, bin sizes, quantiles (for logs)."""
    rows = []
    for lv in block["levels"]:
        q = ", ".join("inf" if v is None else f"{v:.3f}" for v in lv["q_hat"])
        rows.append(f"alpha={lv['alpha']:g}: {len(lv['q_hat'])} bins of {lv['bin_sizes']} scores, q_hat [{q}]")
    return "\n".join(rows)
