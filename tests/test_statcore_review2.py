"""Statistical core, second review (rev5c): the engine's own decision and certificate code at a measurable alpha, and
the confidence sequence against mpmath on an extreme grid.

* Exact (dynamic program over S at the engine's checkpoints, ``checkpoint_schedule(budget)`` with its defaults):
  jobs decided by ``models.decisions._policy_at`` (what the engine and its decision tables call) on a real
  :class:`models.jobs.JobTable`, answered by ``models.decisions.certificates``, for the target, proposal (the
  per-input path's lambda) and best-radius policies. The probability that the answered radius exceeds the true radius
  sigma Phi^-1(pA) is <= alpha (0.1 and 0.05, so that a breach is visible) and <= the probability that the confidence
  sequence has excluded pA at a checkpoint up to the stop (the envelope of every valid stopping rule). Negative
  control: answering the fixed-n Clopper-Pearson bound at the same data-dependent stop breaks both.
* ``lower_bound`` / ``upper_bound`` never beyond the exact (50-digit) root, scalar == vector, on a seeded grid beyond
  the existing exact tests' (alpha up to 0.9, kt_weight 0.5 and 1, priors 1e-3 .. 1e4, t up to 2^31 - 1).
"""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
from scipy.stats import binom, norm

from models.decisions import _policy_at, certificates
from models.jobs import SEQUENTIAL, JobSpec, JobTable
from smoothing import (
    KT_PRIOR,
    PER_INPUT_MIN_GAIN,
    checkpoint_schedule,
    clopper_pearson_lower,
    lower_bound,
    radius_from_probability,
    upper_bound,
)

SIGMA = 0.25
BUDGET = 4000  # the server's auto budget


class _Job:
    def __init__(self, spec):
        self.spec, self.order, self.slot = spec, 0, -1


def _engine_violation(p_a, alpha, prior, policy, *, cp_at_stop=False):
    """(P(answered radius > true radius), P(stopped by the budget), envelope) for a Bernoulli(pA) job under the
    engine's decision and certificate code; one table slot per reachable S (all of them share the job's spec)."""
    true_radius = SIGMA * norm.ppf(p_a)
    spec = JobSpec(np.zeros((1, 1, 1), np.float32), alpha, BUDGET, float("inf"), tested_class=1, prior=prior,
                   target_radius=true_radius if policy == "target" else None,
                   proposal_radius=true_radius if policy == "proposal" else None,
                   min_gain=PER_INPUT_MIN_GAIN if policy == "proposal" else None)
    schedule = checkpoint_schedule(BUDGET)
    table = JobTable((1, 1, 1), 2, capacity=BUDGET + 1)
    slots = table.admit_many([_Job(spec) for _ in range(BUDGET + 1)], [SEQUENTIAL] * (BUDGET + 1),
                             [schedule] * (BUDGET + 1))
    fresh, crossed, prev = np.array([1.0]), np.array([0.0]), 0
    violated = stopped = envelope = 0.0
    for c in (int(x) for x in schedule):
        step = binom.pmf(np.arange(c - prev + 1), c - prev, p_a)
        fresh, crossed, prev = np.convolve(fresh, step), np.convolve(crossed, step), c
        s, at = np.arange(c + 1), slots[:c + 1]
        over = np.asarray(lower_bound(s, c, alpha, *prior)) > p_a  # the sequence (engine's KT weight) excludes pA
        crossed[over] += fresh[over]
        fresh[over] = 0.0
        stop = _policy_at(table, at, s, np.full(c + 1, c), SIGMA) != 0
        table.est_counts[at, 1], table.est_counts[at, 0], table.est_done[at] = s, c - s, c
        if cp_at_stop:
            cls, radius = np.ones(c + 1, int), radius_from_probability(clopper_pearson_lower(s, c, alpha), SIGMA)
        else:
            cls, radius, _ = certificates(table, at, SIGMA)
        wrong = stop & (cls == 1) & (radius > true_radius)
        violated += float(fresh[wrong].sum() + crossed[wrong].sum())
        stopped += float(fresh[stop].sum() + crossed[stop].sum())
        envelope += float(crossed[stop].sum())
        fresh[stop] = crossed[stop] = 0.0
    return violated, stopped, envelope


ENGINE_CASES = [
    # (pA, alpha, prior, policy): target / proposal at the true radius (the null boundary), best radius at defaults
    (0.9, 0.1, KT_PRIOR, "target"),
    (0.7, 0.1, KT_PRIOR, "target"),
    (0.95, 0.1, (29.0, 0.5), "proposal"),
    (0.8, 0.05, (29.0, 0.5), "proposal"),
    (0.9, 0.1, KT_PRIOR, "best"),
    (0.99, 0.05, (29.0, 0.01), "best"),
    (0.7, 0.1, (50.0, 1.0), "best"),  # a wrong, optimistic meta prior
]


@pytest.mark.parametrize("p_a,alpha,prior,policy", ENGINE_CASES)
def test_engine_policy_exact_violation_at_most_alpha(p_a, alpha, prior, policy):
    """Optional stopping at the engine's checkpoints by its own decision code, certificate by its own certificate
    code: exact P(radius > true radius) <= alpha and within the confidence sequence's envelope."""
    violated, stopped, envelope = _engine_violation(p_a, alpha, prior, policy)
    assert stopped == pytest.approx(1.0, abs=1e-9), "every path must stop by the budget"
    assert violated <= alpha, (violated, alpha)
    assert violated <= envelope * (1 + 1e-9) + 1e-15, (violated, envelope)


@pytest.mark.parametrize("p_a", [0.9, 0.7])
def test_engine_harness_catches_clopper_pearson_at_the_stop(p_a):
    """Negative control: the same stops answered with the fixed-n Clopper-Pearson bound exceed alpha (0.1031 at
    pA = 0.9, 0.1020 at 0.7; the sequence: 0.0085, 0.0070) and the envelope, so the harness above sees a wrong
    certificate."""
    alpha = 0.1
    violated, _, envelope = _engine_violation(p_a, alpha, KT_PRIOR, "target", cp_at_stop=True)
    assert violated > alpha and violated > 2 * envelope, (violated, envelope)


# ------------------------------------------------------------------------------ the sequence on an extreme grid
def _exact_excess(s, t, p, alpha, a, b, w):
    """Exact log E_t(p) - log(1/alpha) of the prior (1 - w) Beta(a, b) + w KT (log-gamma, 50 digits)."""
    def log_beta(x, y):
        return mp.loggamma(x) + mp.loggamma(y) - mp.loggamma(x + y)

    terms = [mp.log(wk) + log_beta(ak + s, bk + t - s) - log_beta(ak, bk)
             for wk, ak, bk in ((1 - mp.mpf(w), mp.mpf(a), mp.mpf(b)), (mp.mpf(w), mp.mpf(0.5), mp.mpf(0.5)))
             if wk > 0]
    top = max(terms)
    log_m = top + mp.log(mp.fsum(mp.exp(x - top) for x in terms))
    p = mp.mpf(p)
    return log_m - s * mp.log(p) - (t - s) * mp.log1p(-p) + mp.log(mp.mpf(alpha))


def _extreme_points(n, seed):
    rng = np.random.default_rng(seed)
    ts = [1, 2, 17, 1000, 10**5, 10**6, 10**7, 2**31 - 1]
    out = []
    for _ in range(n):
        t = int(rng.choice(ts))
        s = int(rng.choice([1, 2, t // 2 + 1, t - 3, t - 1, t, int(rng.integers(1, t + 1))]))
        out.append((min(max(s, 1), t), t, float(rng.choice([1e-12, 1e-6, 0.01, 0.1, 0.5, 0.9])),
                    float(rng.choice([1e-3, 0.5, 30.0, 1e4])), float(rng.choice([1e-3, 0.5, 30.0, 1e4])),
                    float(rng.choice([0.0, 0.1, 0.5, 1.0]))))
    return out


def test_bounds_never_beyond_the_exact_root_on_an_extreme_grid():
    """L_t in the exact rejection region (never above the exact root), U_t likewise mirrored, L_t <= S/t, and the
    one-entry float path equals the vectorized kernel bit for bit."""
    mp.mp.dps = 50
    points = _extreme_points(160, seed=5)
    offenders = []
    for w in (0.0, 0.1, 0.5, 1.0):
        group = [p for p in points if p[5] == w]
        s, t, alpha, a, b = (np.array([p[i] for p in group]) for i in range(5))
        low = lower_bound(s, t, alpha, a, b, kt_weight=w)  # > 8 entries: the vectorized kernel
        up = upper_bound(s, t, alpha, a, b, kt_weight=w)
        for i, (si, ti, al, ai, bi, _) in enumerate(group):
            if lower_bound(si, ti, al, ai, bi, kt_weight=w) != low[i]:
                offenders.append(("scalar != vector", group[i]))
            if low[i] > si / ti or (low[i] > 0 and _exact_excess(si, ti, low[i], al, ai, bi, w) < 0):
                offenders.append(("L_t above the exact root", group[i], low[i]))
            if up[i] < 1 and _exact_excess(ti - si, ti, 1 - mp.mpf(up[i]), al, bi, ai, w) < 0:
                offenders.append(("U_t below the exact root", group[i], up[i]))
    assert len(points) == 160 and not offenders, offenders[:5]
