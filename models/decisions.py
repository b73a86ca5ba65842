"""Vectorized policy decisions and certificates over the engine's job table (one call per policy per step).

The statistics live in :mod:`smoothing`; this module only gathers the arrays of the jobs concerned and scatters the
answers back, so the engine never loops over jobs in Python to evaluate a policy or a bound.
"""

from __future__ import annotations

import numpy as np

from models.jobs import COHEN, SEQUENTIAL, JobTable
from smoothing import (Stop, best_radius_decision, clopper_pearson_lower, lower_bound, radius_from_probability,
                       target_radius_decision)

STOP_NAMES = {int(Stop.TARGET): "target", int(Stop.CERTIFIED): "certified", int(Stop.FUTILITY): "futility",
              int(Stop.BUDGET): "budget"}


def policy_decisions(table: JobTable, slots: np.ndarray, sigma: float) -> tuple[np.ndarray, dict[int, Exception]]:
    """Stop codes (:class:`smoothing.Stop`) of the sequential jobs in ``slots`` at their current counts: one call
    per policy (target radius, best radius). A job whose parameters make its policy raise ValueError is isolated
    (evaluated alone) and reported in the returned {slot: error} instead of failing the others."""
    codes = np.full(len(slots), int(Stop.CONTINUE), dtype=np.int8)
    failures: dict[int, Exception] = {}
    targeted = ~np.isnan(table.target[slots])
    for mask in (targeted, ~targeted):
        if not mask.any():
            continue
        group = slots[mask]
        try:
            codes[mask] = _policy(table, group, sigma)
        except ValueError:
            sub = np.empty(len(group), dtype=np.int8)
            for k, slot in enumerate(group):
                try:
                    sub[k] = _policy(table, group[k:k + 1], sigma)[0]
                except ValueError as exc:
                    failures[int(slot)] = exc
                    sub[k] = int(Stop.CONTINUE)
            codes[mask] = sub
    return codes, failures


def _policy(table: JobTable, slots: np.ndarray, sigma: float) -> np.ndarray:
    """The policy of ``slots`` (all targeted or all best-radius) at (hits, counted samples)."""
    s, t = table.hits(slots), table.est_done[slots]
    common = dict(sigma=sigma, alpha=table.alpha[slots], budget=table.budget[slots], a=table.a[slots],
                  b=table.b[slots])
    target = table.target[slots]
    if not np.isnan(target[0]):
        return np.atleast_1d(target_radius_decision(s, t, target_radius=target, **common))
    return np.atleast_1d(best_radius_decision(s, t, **common))


def certificates(table: JobTable, slots: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class or -1, radius, p_lower or NaN) of each job in ``slots`` from the samples counted so far.

    Sequential: the confidence-sequence lower bound L_t at the counted (S_t, t) with the job's prior, valid per input
    at level alpha at any stopping time. Cohen / fixed: the one-sided (1 - alpha) Clopper-Pearson bound of the
    counted estimation hits of the class fixed before them (Cohen: NaN, no bound, before its class is selected).
    No samples: p_lower 0 (sequential, fixed). Certified only where p_lower > 1/2; the radius is
    sigma Phi^-1(p_lower), rounded down by :func:`smoothing.radius_from_probability`."""
    kind, trials, cls = table.kind[slots], table.est_done[slots], table.cls[slots]
    hits = table.hits(slots)
    p = np.zeros(len(slots))
    seq = (kind == SEQUENTIAL) & (trials > 0)
    if seq.any():
        p[seq] = lower_bound(hits[seq], trials[seq], table.alpha[slots][seq], table.a[slots][seq],
                             table.b[slots][seq])
    cp = (kind != SEQUENTIAL) & (trials > 0) & (cls >= 0)
    if cp.any():
        p[cp] = clopper_pearson_lower(hits[cp], trials[cp], table.alpha[slots][cp])
    p[(kind == COHEN) & ((trials == 0) | (cls < 0))] = np.nan
    certified = p > 0.5  # False for NaN
    radius = np.zeros(len(slots))
    if certified.any():
        radius[certified] = radius_from_probability(p[certified], sigma)
    return np.where(certified, cls, -1), radius, p
