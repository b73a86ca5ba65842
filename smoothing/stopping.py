"""Stopping policies for the sequential path: pure functions of a job's past samples (S_t, t) and fixed parameters.

Because the confidence sequence of :mod:`smoothing.confseq` is valid at any stopping time, *no* rule here can make a
certificate invalid: a policy only decides when to spend fewer samples. Each returns, per job, one of the codes of
:class:`Stop` (``CONTINUE`` while sampling should go on). Policies are evaluated at whatever checkpoints the caller
chooses (after every sample in simulations, after each chunk in the worker).
"""

from __future__ import annotations

import enum

import numpy as np

from smoothing._checks import check_alpha, check_counts, check_prior, check_sigma
from smoothing.confseq import lower_bound, upper_bound
from smoothing.eprocess import rejects
from smoothing.radius import probability_for_radius, radius_from_probability


class Stop(enum.IntEnum):
    """Why a job stopped. ``DEADLINE`` and ``CANCELLED`` are set by the worker, never by a policy."""

    CONTINUE = 0
    TARGET = 1  # target radius certified
    CERTIFIED = 2  # best-radius rule: more samples would improve the radius by less than the tolerance
    FUTILITY = 3  # the upper confidence bound rules out the goal
    BUDGET = 4  # sample budget spent
    DEADLINE = 5
    CANCELLED = 6


def target_radius_decision(successes, trials, *, sigma, target_radius, alpha, budget, a=0.5, b=0.5, alpha_futility=None):
    """Policy (i): certify at least ``target_radius``, as cheaply as possible.

    TARGET when H0: pA <= Phi(r/sigma) is rejected at level alpha (then L_t >= Phi(r/sigma), so the certified radius
    is >= r); FUTILITY when the upper bound U_t (level ``alpha_futility``, default alpha) falls below Phi(r/sigma),
    i.e. the target is (with high probability) out of reach; BUDGET when t >= budget. Checked in that order.
    Guarantee: none needed, the certificate's validity comes from the confidence sequence at any stopping time;
    ``alpha_futility`` only controls how often a reachable target is given up (<= alpha_futility).
    """
    s, t = check_counts(successes, trials)
    check_sigma(sigma)
    check_prior(a, b)
    check_alpha(alpha)
    p_target = np.maximum(probability_for_radius(target_radius, sigma), 0.5)
    af = alpha if alpha_futility is None else alpha_futility
    out = np.full(np.broadcast(s, t).shape, Stop.CONTINUE, dtype=np.int8)
    out[np.broadcast_to(t >= budget, out.shape)] = Stop.BUDGET
    futile = np.broadcast_to(upper_bound(s, t, af, a, b) < p_target, out.shape)
    out[futile] = Stop.FUTILITY
    hit = np.broadcast_to((t > 0) & rejects(s, np.maximum(t, 1), p_target, alpha, a, b), out.shape)
    out[hit] = Stop.TARGET
    return out if out.ndim else Stop(int(out))


def best_radius_decision(successes, trials, *, sigma, alpha, budget, a=0.5, b=0.5, growth=2.0, rel_tol=0.05, abs_tol=0.0):
    """Policy (ii): stop when more samples would no longer pay, i.e. the radius has (nearly) converged.

    Rule (a function of past samples only): project the radius the confidence sequence would give after the next
    ``growth``-fold increase in samples if the observed hit rate S_t/t persisted (plug-in projection: L at
    (growth*S_t, growth*t)). Stop as CERTIFIED when the current bound already certifies (L_t > 1/2) and the projected
    gain is below max(abs_tol, rel_tol * current radius). Stop as FUTILITY when U_t < 1/2 (no radius is reachable);
    BUDGET when t >= budget. Why this rule: the radius of an anytime bound grows roughly like sigma*ln(growth)/z per
    growth-fold more samples while far from pA and flattens as L_t approaches pA; the relative gain per doubling is
    the marginal value of the next batch of samples, which is what a latency-bound service trades against. Its cost
    in samples is measured in ``bench/smoothing_bench.py`` (docs/smoothing-benchmark.md).
    Guarantee: as for every policy, validity comes from the confidence sequence at any stopping time.
    """
    s, t = check_counts(successes, trials)
    check_sigma(sigma)
    if growth <= 1.0:
        raise ValueError(f"growth must be > 1, got {growth!r}")
    if rel_tol < 0 or abs_tol < 0:
        raise ValueError("rel_tol and abs_tol must be >= 0")
    r_now = radius_from_probability(lower_bound(s, t, alpha, a, b), sigma)
    proj_s = np.floor(s * growth)
    proj_t = np.floor(t * growth)
    r_next = radius_from_probability(lower_bound(proj_s, proj_t, alpha, a, b), sigma)
    out = np.full(np.broadcast(s, t).shape, Stop.CONTINUE, dtype=np.int8)
    out[np.broadcast_to(t >= budget, out.shape)] = Stop.BUDGET
    out[np.broadcast_to(upper_bound(s, t, alpha, a, b) < 0.5, out.shape)] = Stop.FUTILITY
    settled = (np.asarray(r_now) > 0) & (np.asarray(r_next) - r_now < np.maximum(abs_tol, rel_tol * np.asarray(r_now)))
    out[np.broadcast_to(settled, out.shape)] = Stop.CERTIFIED
    return out if out.ndim else Stop(int(out))
