"""Stopping policies: their decisions follow their documented rules exactly, and stopping with them never breaks the
certificate (the confidence sequence is valid at any stopping time).

End-to-end validity: seeded sequential runs evaluated at checkpoints (the worker's geometric schedule, and a dense
one), stop at the first decision != CONTINUE, issue certified_radius(S, t); the issued radius exceeds the true radius
sigma * Phi^-1(pA) in at most alpha (+3 SE) of the runs. A naive procedure in the same harness is caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from smoothing import (
    KT_PRIOR,
    Stop,
    best_radius_decision,
    certified_radius,
    checkpoint_schedule,
    clopper_pearson_lower,
    lower_bound,
    probability_for_radius,
    radius_from_probability,
    rejects,
    target_radius_decision,
    upper_bound,
)

SIGMA = 0.25


def _grid(t_max=400):
    t = np.concatenate([np.arange(0, t_max + 1), [1000, 2000, 5000]])
    pairs = [(s, tt) for tt in t for s in (range(tt + 1) if tt <= t_max else range(int(0.9 * tt), tt + 1))]
    s, t = np.array(pairs).T
    return s, t


@pytest.mark.parametrize("radius", [0.0, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("alpha,alpha_futility", [(0.001, None), (0.05, 0.2)])
@pytest.mark.parametrize("a,b", [KT_PRIOR, (180.0, 20.0)])
def test_target_radius_decision_follows_its_rule(radius, alpha, alpha_futility, a, b):
    """TARGET exactly where rejects(S, t, Phi(r/sigma)) (equivalently L_t >= Phi(r/sigma)), and then the certified
    radius is >= r; else FUTILITY exactly where U_t (at alpha_futility) < Phi(r/sigma); else BUDGET exactly at
    t >= budget; else CONTINUE."""
    s, t = _grid()
    budget = 300
    d = target_radius_decision(s, t, sigma=SIGMA, target_radius=radius, alpha=alpha, budget=budget, a=a, b=b,
                               alpha_futility=alpha_futility)
    p_target = max(probability_for_radius(radius, SIGMA), 0.5)
    t1 = np.maximum(t, 1)
    target = (t > 0) & rejects(s, t1, p_target, alpha, a, b)
    assert np.array_equal(d == Stop.TARGET, target)
    assert np.array_equal(target, (t > 0) & (lower_bound(s, t, alpha, a, b) >= p_target))
    assert np.all(certified_radius(s[target], t[target], alpha, SIGMA, a, b) >= radius * (1 - 1e-9))
    futile = ~target & (upper_bound(s, t, alpha if alpha_futility is None else alpha_futility, a, b) < p_target)
    assert np.array_equal(d == Stop.FUTILITY, futile)
    assert np.array_equal(d == Stop.BUDGET, ~target & ~futile & (t >= budget))
    assert np.array_equal(d == Stop.CONTINUE, ~target & ~futile & (t < budget))
    assert target.any() and (d == Stop.CONTINUE).any()


def test_target_radius_decision_scalar_cases():
    """Hand-picked cases: 2000/2000 hits certify r = 0.5 at alpha = 0.001; 50/50 do not yet; 600/1000 hits make
    r = 0.5 (needs pA >= 0.977) futile; the budget ends an undecided job."""
    kw = {"sigma": SIGMA, "target_radius": 0.5, "alpha": 0.001, "budget": 1000}
    assert target_radius_decision(2000, 2000, **kw) == Stop.TARGET
    assert target_radius_decision(50, 50, **kw) == Stop.CONTINUE
    assert target_radius_decision(600, 1000, **kw) == Stop.FUTILITY
    assert target_radius_decision(990, 1000, **kw) == Stop.BUDGET


@pytest.mark.parametrize("radius", [2.2, 3.0, 10.0])
def test_unreachable_target_radius_is_a_decision_not_an_error(radius):
    """A target beyond what any finite sample can certify (Phi(r/sigma) rounds to 1.0 for r >= ~8.3 sigma) is a
    valid request: it must never be reported reached, it is futile once any sample misses, and it must not raise."""
    kw = {"sigma": SIGMA, "target_radius": radius, "alpha": 0.001, "budget": 1000}
    assert target_radius_decision(900, 1000, **kw) in (Stop.FUTILITY, Stop.BUDGET)
    assert target_radius_decision(100, 100, **kw) in (Stop.CONTINUE, Stop.FUTILITY)


def _best_rule(s, t, alpha, budget, a, b, fraction=0.75, min_futility_trials=200):
    """The rule of best_radius_decision's docstring, re-implemented from the confidence-sequence functions."""
    t1 = np.maximum(t, 1)
    r_now = radius_from_probability(lower_bound(s, t1, alpha, a, b), SIGMA)
    r_budget = radius_from_probability(lower_bound((s * budget) // t1, np.full_like(s, budget), alpha, a, b), SIGMA)
    settled = (t > 0) & (r_now > 0) & (r_now >= fraction * r_budget)
    futile = (t > 0) & ((upper_bound(s, t1, alpha, a, b) < 0.5) | ((t >= min_futility_trials) & (r_budget <= 0)))
    return np.where(settled, Stop.CERTIFIED, np.where(futile, Stop.FUTILITY,
                                                      np.where(t >= budget, Stop.BUDGET, Stop.CONTINUE)))


@pytest.mark.parametrize("alpha,a,b", [(0.001, *KT_PRIOR), (0.05, 180.0, 20.0)])
def test_best_radius_decision_follows_its_rule(alpha, a, b):
    """Decision == the documented rule on a grid (CERTIFIED > FUTILITY > BUDGET > CONTINUE), and CERTIFIED only where
    the current certified radius is positive."""
    s, t = _grid(300)
    for fraction in (0.5, 0.75, 0.9):
        d = best_radius_decision(s, t, sigma=SIGMA, alpha=alpha, budget=2000, a=a, b=b, fraction=fraction)
        assert np.array_equal(d, _best_rule(s, t, alpha, 2000, a, b, fraction=fraction)), fraction
    assert np.all(certified_radius(s[d == Stop.CERTIFIED], t[d == Stop.CERTIFIED], alpha, SIGMA, a, b) > 0)
    assert {Stop.CERTIFIED, Stop.FUTILITY, Stop.CONTINUE} <= set(d.tolist())


def test_best_radius_decision_easy_and_hard_cases():
    """Picked by computing (alpha = 0.001, sigma = 0.25, budget 10k, default fraction): S = t = 2000 has radius 0.634
    of a projected 0.758 (84 %): stop; S = t = 100 has 0.330 (44 %): continue; 10/100 hits: U < 1/2, futile;
    120/300 hits: U = 0.53 but the projection certifies nothing after >= 200 samples: futile."""
    kw = {"sigma": SIGMA, "alpha": 0.001, "budget": 10_000}
    assert best_radius_decision(2000, 2000, **kw) == Stop.CERTIFIED
    assert best_radius_decision(100, 100, **kw) == Stop.CONTINUE
    assert best_radius_decision(10, 100, **kw) == Stop.FUTILITY
    assert best_radius_decision(40, 100, **kw) == Stop.CONTINUE  # projection says no, but < min_futility_trials
    assert best_radius_decision(120, 300, **kw) == Stop.FUTILITY


def test_checkpoint_schedule():
    """Strictly increasing, starts at min(first, budget), ends exactly at budget, grows by <= growth (+1)."""
    for budget in (1, 10, 64, 65, 1000, 123_457):
        for first, growth in ((64, 1.25), (1, 2.0), (16, 1.1)):
            c = checkpoint_schedule(budget, first=first, growth=growth)
            assert c[0] == min(first, budget) and c[-1] == budget and np.all(np.diff(c) > 0)
            assert np.all(c[1:] <= np.maximum(np.ceil(c[:-1] * growth), c[:-1] + 1))
    for bad in ({"budget": 0}, {"first": 0}, {"growth": 1.0}):
        with pytest.raises(ValueError):
            checkpoint_schedule(**{"budget": 10, **bad})


def _simulate(decide, p_a, runs, checkpoints, seed):
    """Sequential runs: S at each checkpoint (binomial increments), stop at the first decision != CONTINUE.
    Returns (S, t, code) at the stopping checkpoint of every run."""
    rng = np.random.default_rng(seed)
    steps = np.diff(np.concatenate([[0], checkpoints]))
    s_path = np.cumsum(rng.binomial(steps[None, :], p_a, size=(runs, len(steps))), axis=1)
    stop_col = np.full(runs, -1)
    codes = np.zeros(runs, dtype=np.int64)
    for j, c in enumerate(checkpoints):
        live = stop_col < 0
        if not live.any():
            break
        d = np.asarray(decide(s_path[live, j], np.full(live.sum(), c)))
        idx = np.flatnonzero(live)[d != Stop.CONTINUE]
        stop_col[idx], codes[idx] = j, d[d != Stop.CONTINUE]
    assert np.all(stop_col >= 0), "every run must stop by the budget"
    return s_path[np.arange(runs), stop_col], checkpoints[stop_col], codes


POLICY_CASES = [
    # (label, pA, prior, policy, target radius as a multiple of the true radius)
    ("target=true radius, KT, pA=0.9", 0.9, KT_PRIOR, "target", 1.0),
    ("target=true radius, informative, pA=0.99", 0.99, (198.0, 2.0), "target", 1.0),
    ("target=0.8 true radius, KT, pA=0.7", 0.7, KT_PRIOR, "target", 0.8),
    ("best radius, KT, pA=0.9", 0.9, KT_PRIOR, "best", None),
    ("best radius, wrong prior Beta(50,1), pA=0.7", 0.7, (50.0, 1.0), "best", None),
    ("best radius, informative, pA=0.99", 0.99, (198.0, 2.0), "best", None),
]
ALPHA = 0.05


@pytest.mark.parametrize("schedule", ["geometric", "dense"])
@pytest.mark.parametrize("label,p_a,prior,policy,target_mult", POLICY_CASES, ids=[c[0] for c in POLICY_CASES])
def test_policy_end_to_end_validity(size, sim, record_rate, schedule, label, p_a, prior, policy, target_mult):
    """P(certified radius at the stopping time > true radius sigma Phi^-1(pA)) <= alpha + 3 SE for each policy."""
    a, b = prior
    budget = 1000 if size.name == "fast" else 5000
    checkpoints = (checkpoint_schedule(budget, first=16, growth=1.25) if schedule == "geometric"
                   else np.arange(10, budget + 1, 10))
    true_radius = SIGMA * norm.ppf(p_a)
    if policy == "target":
        def decide(s, t):
            return target_radius_decision(s, t, sigma=SIGMA, target_radius=target_mult * true_radius, alpha=ALPHA,
                                          budget=budget, a=a, b=b)
    else:
        def decide(s, t):
            return best_radius_decision(s, t, sigma=SIGMA, alpha=ALPHA, budget=budget, a=a, b=b)
    seed = 6000 + 10 * [c[0] for c in POLICY_CASES].index(label) + (schedule == "dense")
    s, t, codes = _simulate(decide, p_a, size.reps, checkpoints, seed)
    issued = certified_radius(s, t, ALPHA, SIGMA, a, b)
    rate = float(np.mean(issued > true_radius))
    record_rate(rate, ALPHA, size.reps, f"{schedule} budget={budget}")
    sim.assert_rate_at_most(rate, ALPHA, size.reps, f"{label}, {schedule} checkpoints")
    assert np.mean(issued > 0) > 0.3, "the policy must certify something, or the check is vacuous"
    if policy == "target" and target_mult < 1:  # reachable target: futility errs with probability <= alpha
        sim.assert_rate_at_most(float(np.mean(codes == Stop.FUTILITY)), ALPHA, size.reps, "futility on reachable")


def test_policy_harness_catches_a_naive_procedure(sim):
    """Negative control: stop as soon as the fixed-n Clopper-Pearson bound clears the true pA's radius (optional
    stopping) and issue that bound's radius: the harness measures a violation rate far above alpha."""
    p_a, budget = 0.9, 1000
    checkpoints = np.arange(10, budget + 1, 10)
    true_radius = SIGMA * norm.ppf(p_a)

    def naive(s, t):
        hit = np.asarray(clopper_pearson_lower(s, t, ALPHA)) > p_a
        return np.where(hit, Stop.TARGET, np.where(t >= budget, Stop.BUDGET, Stop.CONTINUE))

    s, t, _ = _simulate(naive, p_a, 2000, checkpoints, seed=77)
    issued = radius_from_probability(clopper_pearson_lower(s, t, ALPHA), SIGMA)
    rate = float(np.mean(issued > true_radius))
    assert rate > ALPHA + 3 * sim.binomial_se(ALPHA, 2000), rate
