"""Stopping policies: their decisions follow their documented rules exactly (target radius, best radius with the
marginal-gain and the fraction rules, per-job parameters, the one- and two-job float paths), and the checkpoint
schedule they are evaluated at. That stopping with them never breaks the certificate (end-to-end validity, Monte Carlo
and exact, and the clean-class fixed-n route): tests/test_smoothing_stopping_validity.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from smoothing import (
    DEFAULT_KT_WEIGHT,
    DEFAULT_MIN_GAIN,
    KT_PRIOR,
    Stop,
    best_radius_decision,
    certified_radius,
    checkpoint_schedule,
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
@pytest.mark.parametrize("a,b,w", [(*KT_PRIOR, 0.0), (180.0, 20.0, 0.0), (180.0, 20.0, DEFAULT_KT_WEIGHT)])
def test_target_radius_decision_follows_its_rule(radius, alpha, alpha_futility, a, b, w):
    """TARGET exactly where rejects(S, t, Phi(r/sigma)) (equivalently L_t >= Phi(r/sigma)), and then the certified
    radius is >= r; else FUTILITY exactly where U_t (at alpha_futility) < Phi(r/sigma); else BUDGET exactly at
    t >= budget; else CONTINUE."""
    s, t = _grid()
    budget = 300
    d = target_radius_decision(s, t, sigma=SIGMA, target_radius=radius, alpha=alpha, budget=budget, a=a, b=b,
                               alpha_futility=alpha_futility, kt_weight=w)
    p_target = max(probability_for_radius(radius, SIGMA), 0.5)
    t1 = np.maximum(t, 1)
    target = (t > 0) & rejects(s, t1, p_target, alpha, a, b, kt_weight=w)
    assert np.array_equal(d == Stop.TARGET, target)
    assert np.array_equal(target, (t > 0) & (lower_bound(s, t, alpha, a, b, kt_weight=w) >= p_target))
    assert np.all(certified_radius(s[target], t[target], alpha, SIGMA, a, b, kt_weight=w) >= radius * (1 - 1e-9))
    af = alpha if alpha_futility is None else alpha_futility
    futile = ~target & (upper_bound(s, t, af, a, b, kt_weight=w) < p_target)
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


def _best_rule(s, t, alpha, budget, a, b, w, min_gain=None, fraction=None, min_futility_trials=200):
    """The rules of best_radius_decision's docstring, re-implemented from the confidence-sequence functions."""
    t1 = np.maximum(t, 1)

    def radius(hits, draws):
        return radius_from_probability(lower_bound(hits, draws, alpha, a, b, kt_weight=w), SIGMA)

    def verifies(hits, draws, r):  # as the target-radius policy verifies its target: the e-value test at Phi(r / sigma)
        p = np.maximum(probability_for_radius(r, SIGMA), 0.5)
        return (p < 1.0) & rejects(hits, draws, np.minimum(p, np.nextafter(1.0, 0.0)), alpha, a, b, kt_weight=w)

    r_now = radius(s, t1)
    if fraction is None:
        t_next = np.minimum(2 * t1, budget)
        goal = r_now + min_gain * np.maximum(t_next - t, 1)
        settled = (r_now > 0) & ~verifies((s * t_next) // t1, t_next, goal)
    else:
        settled = (r_now > 0) & (r_now >= fraction * radius((s * budget) // t1, np.full_like(s, budget)))
    r_budget = radius((s * budget) // t1, np.full_like(s, budget))
    futile = (t > 0) & (r_now <= 0) & ((upper_bound(s, t1, alpha, a, b, kt_weight=w) < 0.5)
                                       | ((t >= min_futility_trials) & (r_budget <= 0)))
    return np.where(settled & (t > 0), Stop.CERTIFIED,
                    np.where(futile, Stop.FUTILITY, np.where(t >= budget, Stop.BUDGET, Stop.CONTINUE)))


@pytest.mark.parametrize("alpha,a,b,w", [(0.001, *KT_PRIOR, 0.0), (0.05, 180.0, 20.0, 0.0),
                                         (0.001, 29.0, 0.01, DEFAULT_KT_WEIGHT)])
def test_best_radius_decision_follows_its_rule(alpha, a, b, w):
    """Decision == the documented rule on a grid (CERTIFIED > FUTILITY > BUDGET > CONTINUE), for the marginal-gain
    rule (several lambda) and the fraction rule, and CERTIFIED only where the current certified radius is positive."""
    s, t = _grid(300)
    kw = {"sigma": SIGMA, "alpha": alpha, "budget": 2000, "a": a, "b": b, "kt_weight": w}
    for lam in (1e-5, 1e-4, 1e-3):
        d = best_radius_decision(s, t, min_gain=lam, **kw)
        assert np.array_equal(d, _best_rule(s, t, alpha, 2000, a, b, w, min_gain=lam)), lam
        assert {Stop.CERTIFIED, Stop.CONTINUE} <= set(d.tolist()), lam
    for fraction in (0.5, 0.75, 0.9):
        d = best_radius_decision(s, t, fraction=fraction, **kw)
        assert np.array_equal(d, _best_rule(s, t, alpha, 2000, a, b, w, fraction=fraction)), fraction
    assert np.all(certified_radius(s[d == Stop.CERTIFIED], t[d == Stop.CERTIFIED], alpha, SIGMA, a, b,
                                   kt_weight=w) > 0)
    assert np.array_equal(best_radius_decision(s, t, **kw), best_radius_decision(s, t, min_gain=DEFAULT_MIN_GAIN, **kw))


def test_best_radius_decision_with_per_job_parameters_follows_its_rule():
    """One call over jobs with their own alpha, prior, budget and lambda (as the engine makes it: the policy gathers
    all its bounds of all jobs into one kernel call) == the documented rule job by job. Run once against two bugs
    of that gathering: the mirrored prior of the upper bound not swapped (a, b kept), and the bounds of one job read
    with another job's parameters (index off by one): both fail here."""
    rng = np.random.default_rng(11)
    s, t = _grid(300)
    n = s.size
    alpha = rng.choice([0.1, 0.01, 0.001], n)
    a, b = rng.choice([0.5, 3.0, 29.0], n), rng.choice([0.5, 0.01, 7.0], n)
    budget, lam = rng.choice([400, 2000], n), rng.choice([1e-5, 1e-4, 1e-3], n)
    d = best_radius_decision(s, t, sigma=SIGMA, alpha=alpha, budget=budget, a=a, b=b, min_gain=lam,
                             kt_weight=DEFAULT_KT_WEIGHT)
    want = np.full(n, -1)
    params = np.stack([alpha, a, b, budget, lam], axis=1)
    for row in np.unique(params, axis=0):  # the rule, per group of jobs sharing their parameters
        jobs = np.flatnonzero(np.all(params == row, axis=1))
        want[jobs] = _best_rule(s[jobs], t[jobs], row[0], int(row[3]), row[1], row[2], DEFAULT_KT_WEIGHT,
                                min_gain=row[4])
    assert np.array_equal(d, want)
    assert {Stop.CERTIFIED, Stop.FUTILITY, Stop.CONTINUE} <= set(want.tolist())


def test_one_bound_radius_equals_the_array_radius():
    """The compiled rule converts its bounds with smoothing.kernels.radius_one: bit-identical to the array
    conversion on a grid that includes 0, 1/2, the ulps next to it and 1 (infinite probit: radius 0). Run once
    against a float conversion that skipped the rounding down (1 - RADIUS_ROUNDING): fails."""
    from smoothing.kernels import radius_one as validated_radius_one
    from smoothing.radius import validated_radius

    p = np.concatenate([[0.0, 0.5, np.nextafter(0.5, 1.0), np.nextafter(1.0, 0.0), 1.0],
                        np.random.default_rng(14).uniform(0.0, 1.0, 2000), 1.0 - np.logspace(-16, -1, 200)])
    for sigma in (0.12, 0.25, 1.0):
        want = validated_radius(p, np.full(p.size, sigma))
        got = np.array([validated_radius_one(float(x), sigma) for x in p])
        assert np.array_equal(got, want), sigma


@pytest.mark.parametrize("cut", [-1e9, 0.5, 2.0])
def test_best_radius_decision_follows_its_rule_whatever_the_futility_prediction(monkeypatch, cut):
    """The futility bounds are computed in the first kernel call for the jobs predicted to have no radius
    (smoothing.stopping._rough_lower <= _LOW_PREDICTION, 1/2), and in a second call for the others found without
    one. With the cut at -1e9 nothing is predicted (all go to the second call), at 2 every job is: the codes must be
    the rule's in each case. Run once against a bug of the merge (the mirrored bound and the budget projection of
    the predicted jobs swapped): fails."""
    import smoothing.stopping as stopping

    monkeypatch.setattr(stopping, "_LOW_PREDICTION", cut)
    rng = np.random.default_rng(13)
    s, t = _grid(300)
    alpha, a = rng.choice([0.1, 0.001], s.size), rng.choice([0.5, 29.0], s.size)
    d = best_radius_decision(s, t, sigma=SIGMA, alpha=alpha, budget=2000, a=a, b=0.5, min_gain=1e-4)
    assert np.array_equal(d, _best_rule(s, t, alpha, 2000, a, 0.5, DEFAULT_KT_WEIGHT, min_gain=1e-4))
    assert Stop.FUTILITY in set(d.tolist())


def test_best_radius_decision_for_one_or_two_jobs_follows_its_rule():
    """A lone job's decision (the path of a per-input request alone in the engine) runs the compiled rule with its
    projections in Python ints; two jobs run it with numpy projections (smoothing.stopping._marginal_gain_codes;
    before the rule was compiled, these were a float path and an array path). Calls of one and of two jobs must
    give the documented rule's codes, FUTILITY included, as the rule evaluated in one vectorized call over all jobs
    gives them. Run once against
    each of three bugs (in the former float path): the prior's a and b swapped in the float bound's marginal
    likelihood, the mirrored prior left unmirrored in the one-job futility bound, the one-job gain divided by t'
    instead of t' - t: each fails."""
    rng = np.random.default_rng(12)
    s, t = _grid(300)
    pick = rng.choice(s.size, 600, replace=False)
    s, t = s[pick], t[pick]
    alpha, a, b = rng.choice([0.1, 0.001], s.size), rng.choice([0.5, 29.0], s.size), rng.choice([0.5, 7.0], s.size)
    # the reference in ONE call over all 600 jobs: its bounds come from the vectorized kernel
    want = _best_rule(s, t, alpha, 2000, a, b, DEFAULT_KT_WEIGHT, min_gain=1e-4)
    for width in (1, 2):
        got = np.concatenate([best_radius_decision(s[i:i + width], t[i:i + width], sigma=SIGMA, alpha=alpha[i:i + width],
                                                   budget=2000, a=a[i:i + width], b=b[i:i + width], min_gain=1e-4)
                              for i in range(0, s.size, width)])
        assert np.array_equal(got, want), width
    assert {Stop.CERTIFIED, Stop.FUTILITY, Stop.CONTINUE} <= set(want.tolist())


def test_best_radius_decision_easy_and_hard_cases():
    """Picked by computing (alpha = 0.001, sigma = 0.25, budget 10k, KT): with S = t = 1000 the radius is 0.574 and
    2000/2000 would give 0.634, i.e. 6.0e-5 per sample: stop at lambda = 1e-4, continue at 1e-5; S = t = 100 (0.330)
    would gain 8.3e-4 per sample up to 200 (0.413): continue at 1e-4; 10/100 hits: U < 1/2, futile; 40/100: the projection says no, but fewer than
    min_futility_trials samples: continue; 120/300: U = 0.53 but the projection certifies nothing: futile."""
    kw = {"sigma": SIGMA, "alpha": 0.001, "budget": 10_000, "kt_weight": 0.0}
    assert best_radius_decision(1000, 1000, min_gain=1e-4, **kw) == Stop.CERTIFIED
    assert best_radius_decision(1000, 1000, min_gain=1e-5, **kw) == Stop.CONTINUE
    assert best_radius_decision(100, 100, min_gain=1e-4, **kw) == Stop.CONTINUE
    assert best_radius_decision(10, 100, **kw) == Stop.FUTILITY
    assert best_radius_decision(40, 100, **kw) == Stop.CONTINUE
    assert best_radius_decision(120, 300, **kw) == Stop.FUTILITY
    assert best_radius_decision(2000, 2000, fraction=0.775, **kw) == Stop.CERTIFIED  # the fraction rule: 84 %
    assert best_radius_decision(100, 100, fraction=0.775, **kw) == Stop.CONTINUE  # 44 %


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
