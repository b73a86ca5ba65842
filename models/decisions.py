"""Vectorized policy decisions and certificates over the engine's job table (one call per policy per step).

The statistics live in :mod:`smoothing`; this module only gathers the arrays of the jobs concerned and scatters the
answers back, so the engine never loops over jobs in Python to evaluate a policy or a bound.
"""

from __future__ import annotations

import numpy as np

from models.jobs import COHEN, SEQUENTIAL, JobTable
from smoothing import Stop, clopper_pearson_lower, lower_bound
from smoothing.radius import validated_radius
from smoothing.stopping import (validated_best_radius_codes, validated_best_radius_rows, validated_proposal_codes,
                                validated_target_codes)

STOP_NAMES = {int(Stop.TARGET): "target", int(Stop.CERTIFIED): "certified", int(Stop.FUTILITY): "futility",
              int(Stop.BUDGET): "budget"}


def policy_decisions(table: JobTable, slots: np.ndarray, sigma: float,
                     lower_out: np.ndarray | None = None) -> np.ndarray:
    """Stop codes (:class:`smoothing.Stop`) of the sequential jobs in ``slots`` at their current counts: one call
    per policy (target radius, proposal, best radius), on the job table's parameters as validated at submission
    (:func:`models.jobs.check_spec`). ``lower_out`` (optional, float64, one entry per slot) receives, for the
    best-radius and proposal jobs, the confidence-sequence bound L_t their rule computed at these counts: exactly the
    p_lower :func:`certificates` gives them now (the same kernel, prior, KT weight and alpha); target-radius jobs
    are left as they were (NaN by convention: not computed)."""
    codes = np.zeros(len(slots), dtype=np.int8)  # Stop.CONTINUE
    targeted, proposed, best = policy_groups(table, slots)
    for mask in (targeted, proposed):
        if mask.any():
            group = slots[mask]
            lower = None if lower_out is None else np.full(len(group), np.nan)
            codes[mask] = _policy_at(table, group, table.hits(group), table.est_done[group], sigma, lower)
            if lower_out is not None:
                lower_out[mask] = lower
    if best.any():  # most jobs: one compiled call that reads their counts and parameters from the table itself
        group, lower = slots[best], np.empty(int(np.count_nonzero(best)))
        codes[best] = validated_best_radius_rows(group, table.est_counts, table.cls, table.est_done, table.alpha,
                                                 table.a, table.b, table.budget, sigma, table.min_gain, lower_out=lower)
        if lower_out is not None:
            lower_out[best] = lower
    return codes


def policy_groups(table: JobTable, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks over ``slots``: the jobs under the target-radius, the proposal and the best-radius policy (a job with
    both a target and a proposal, which submit refuses, would count as targeted)."""
    targeted = ~np.isnan(table.target[slots])
    proposed = ~targeted & ~np.isnan(table.proposal[slots])
    return targeted, proposed, ~targeted & ~proposed


def certificates(table: JobTable, slots: np.ndarray, sigma: float,
                 known_lower: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class or -1, radius, p_lower or NaN) of each job in ``slots`` from the samples counted so far.

    Sequential: the confidence-sequence lower bound L_t at the counted (S_t, t) with the job's prior mixed with KT
    (smoothing's DEFAULT_KT_WEIGHT, as its policy), valid per input at level alpha at any stopping time, provided the
    tested class and the prior were fixed from the clean input before submission (JobSpec). Cohen / fixed: the
    one-sided (1 - alpha) Clopper-Pearson bound of the counted estimation hits of the class fixed before them (Cohen:
    NaN, no bound, before its class is selected), on n fixed at submission and cut only by the clock (deadline,
    shutdown), never by the outcomes.
    A sequential job that its policy stopped with samples in flight (speculation) gets the larger of L_t at its
    stop (``stop_lower``, :meth:`models.jobs.JobTable.settle`) and L_t at all its counted samples: both are values of
    its one confidence sequence, and P(exists t: L_t > pA) <= alpha, so the larger is as valid as either, and a job
    stopped as certified is never answered below the bound it stopped on (before: sometimes an abstention).
    No samples: p_lower 0 (sequential, fixed). Certified only where p_lower > 1/2; the radius is
    sigma Phi^-1(p_lower), rounded down as :func:`smoothing.radius_from_probability` rounds it (its validated entry:
    these p_lower lie in (1/2, 1] and ``sigma`` > 0 is the sampler's, checked when it was built).
    ``known_lower`` (optional, one entry per slot, NaN where unknown): a sequential job's L_t that its policy has
    just computed at these very counts (:func:`policy_decisions`' ``lower_out``, same state lock, no batch landed
    since); used as is instead of a second computation of the same bound."""
    kind, trials, cls = table.kind[slots], table.est_done[slots], table.cls[slots]
    hits = table.hits(slots)
    p = np.zeros(len(slots))
    seq = (kind == SEQUENTIAL) & (trials > 0)
    if known_lower is not None:
        known = seq & ~np.isnan(known_lower)
        p[known], seq = known_lower[known], seq & ~known
    if seq.any():
        p[seq] = lower_bound(hits[seq], trials[seq], table.alpha[slots][seq], table.a[slots][seq],
                             table.b[slots][seq])
    cp = (kind != SEQUENTIAL) & (trials > 0) & (cls >= 0)
    if cp.any():
        p[cp] = clopper_pearson_lower(hits[cp], trials[cp], table.alpha[slots][cp])
    p[(kind == COHEN) & ((trials == 0) | (cls < 0))] = np.nan
    p = np.fmax(p, table.stop_lower[slots])  # a job stopped with samples in flight keeps the bound it stopped on
    certified = p > 0.5  # False for NaN
    radius = np.zeros(len(slots))
    if certified.any():
        radius[certified] = validated_radius(p[certified], sigma)
    return np.where(certified, cls, -1), radius, p


def stop_bounds(table: JobTable, slots: np.ndarray, known: np.ndarray, sigma: float) -> np.ndarray:
    """L_t at the current counts of the sequential jobs ``slots`` that their policy has just stopped (for
    :meth:`models.jobs.JobTable.settle`): ``known`` (by slot, NaN where the policy did not compute it) or, for a job
    with samples still in flight, computed now with its own alpha and prior (:func:`certificates`)."""
    out = known[slots].copy()
    need = np.isnan(out) & (table.inflight[slots] > 0)
    if need.any():
        out[need] = certificates(table, slots[need], sigma)[2]
    return out


class DecisionTables:
    """Policy decisions computed ahead, while a job's chunk up to its checkpoint is still in the model.

    For a sequential job whose samples up to its checkpoint cp are all in flight, with S hits counted so far, the
    code at cp is tabulated for every possible hit count S + h (h = 0 .. the samples in flight), in one call per
    policy. When the chunk lands, the decision is a lookup. The policies are pure functions of (S_t, t) and the job's
    fixed parameters, so the looked-up code is exactly what a direct evaluation at landing would give; the point is
    that the work overlaps the model call instead of following it (it matters at low concurrency, where the model
    would wait for the decision). Used only while the tables stay small (``max_points`` per call)."""

    def __init__(self, max_points: int = 1024):
        self.max_points = int(max_points)
        self._tables: dict[int, tuple[int, int, int, np.ndarray]] = {}  # slot -> (generation, cp, hits then, codes)

    def precompute(self, table: JobTable, sigma: float) -> None:
        t = table
        ready = np.flatnonzero(t.running & ~t.stopping & (t.kind == SEQUENTIAL) & (t.est_done < t.cp)
                               & (t.assigned >= t.cp) & (t.inflight >= t.cp - t.est_done))
        ready = np.array([s for s in ready if self._tables.get(int(s), (-1,))[0] != t.gen[s]], dtype=np.int64)
        if not len(ready):
            return
        width = t.cp[ready] - t.est_done[ready] + 1
        if int(width.sum()) > self.max_points:
            return
        owner = np.repeat(np.arange(len(ready)), width)
        slots = ready[owner]
        hits = t.hits(ready)
        s = hits[owner] + (np.arange(len(owner)) - np.repeat(np.cumsum(width) - width, width))
        codes = np.empty(len(owner), dtype=np.int8)
        for mask in policy_groups(t, slots):
            if mask.any():
                codes[mask] = _policy_at(t, slots[mask], s[mask], t.cp[slots[mask]], sigma)
        ends = np.cumsum(width)
        for k, slot in enumerate(ready):
            self._tables[int(slot)] = (int(t.gen[slot]), int(t.cp[slot]), int(hits[k]), codes[ends[k] - width[k]:ends[k]])

    def lookup(self, table: JobTable, due: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes, found) for the jobs ``due`` at their checkpoint; found=False where no valid table exists."""
        codes = np.zeros(len(due), dtype=np.int8)
        found = np.zeros(len(due), dtype=bool)
        if not self._tables:  # nothing tabulated (e.g. a CPU sampler, where the engine does not precompute)
            return codes, found
        hits = table.hits(due)
        for k, slot in enumerate(due):
            entry = self._tables.pop(int(slot), None)
            if entry is None:
                continue
            gen, cp, base, tab = entry
            h = int(hits[k]) - base
            if gen == table.gen[slot] and cp == table.cp[slot] == table.est_done[slot] and 0 <= h < len(tab):
                codes[k], found[k] = tab[h], True
        return codes, found

    def decide(self, table: JobTable, due: np.ndarray, sigma: float,
               settled: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(codes, L_t) of ``due``: :func:`policy_decisions`, from the precomputed tables where they exist; L_t as
        its ``lower_out`` for the jobs evaluated now, NaN for those looked up (and target-radius jobs).

        ``settled`` (optional): sequential jobs stopped earlier whose last samples have just landed (their answer
        needs L_t at these counts). Their L_t is appended to the returned L_t (after ``due``'s), computed in the same
        kernel call as the policies of ``due``: one call's fixed cost (~0.2 ms) instead of a second call in
        :func:`certificates`, at hundreds of jobs per step. Their policies are evaluated for that and their codes
        discarded (a policy is a pure function of the counts: evaluating it changes no state); the bound is its
        ``lower_out``, bit for bit :func:`certificates`' bound (target-radius jobs: NaN, computed there)."""
        n = len(due)
        if settled is not None and len(settled):
            due = np.concatenate([due, settled])
        lower = np.full(len(due), np.nan)
        if not self._tables:  # nothing tabulated (always on a CPU sampler): every job evaluated now
            return policy_decisions(table, due, sigma, lower)[:n], lower
        codes, found = self.lookup(table, due)
        if not found.all():
            evaluated = np.full(int(np.count_nonzero(~found)), np.nan)
            codes[~found] = policy_decisions(table, due[~found], sigma, evaluated)
            lower[~found] = evaluated
        return codes[:n], lower


def _policy_at(table: JobTable, slots: np.ndarray, s: np.ndarray, t: np.ndarray, sigma: float,
               lower_out: np.ndarray | None = None) -> np.ndarray:
    """The policy of ``slots`` (all in one group of :func:`policy_groups`) at hits ``s`` in ``t`` samples, with each
    job's own alpha, budget and prior (the ones its certificate uses, :func:`certificates`) and, for best-radius and
    proposal jobs, its own min_gain (fixed at admission, so a tabulated code stays that job's code). The validated
    entry points of :mod:`smoothing.stopping` give the same codes as the public policies; the parameters were
    checked once, at submission. ``lower_out``: their L_t at (s, max(t, 1)) (best-radius and proposal jobs)."""
    common = (s, t, table.alpha[slots], table.a[slots], table.b[slots], table.budget[slots],
              np.repeat(float(sigma), len(slots)))
    target, proposal = table.target[slots], table.proposal[slots]
    if not np.isnan(target[0]):
        return validated_target_codes(*common, target)
    if not np.isnan(proposal[0]):
        return validated_proposal_codes(*common, table.min_gain[slots], proposal, lower_out=lower_out)
    return validated_best_radius_codes(*common, table.min_gain[slots], lower_out=lower_out)
