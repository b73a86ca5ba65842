"""Type-I error of the Beta-mixture e-process test ``smoothing.rejects`` under continuous monitoring.

Guarantee under test (smoothing/eprocess.py, design.md "Statistics"): for every pA <= p0 and every prior (a, b) fixed
before sampling, P(exists t: rejects(S_t, t, p0, alpha, a, b)) <= alpha, monitoring after EVERY sample.

Two independent ways of measuring the probability:
* Monte Carlo: seeded Bernoulli paths, ``rejects`` evaluated on all runs after each sample, "ever rejected" tracked;
  asserted <= alpha + 3 binomial SE.
* Exact: a dynamic program over S_t gives P(ever rejected by the horizon) with no sampling error; asserted <= alpha.
The negative controls prove that the same harness detects an invalid procedure (optional stopping of a fixed-n
Clopper-Pearson test; the e-process without its composite-null condition S_t >= p0 t), and the power checks prove
that the rejection event is reachable at all, so a pass is not vacuous.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from smoothing import KT_PRIOR, clopper_pearson_lower, log_e_value, rejects

ALPHA = 0.05

# (label, p0, pA, a, b): pA == p0 (the boundary of the null) and pA < p0 (interior), for the KT prior, informative
# priors centred on the truth (strength 200) and badly wrong priors.
TYPE_I_CASES = [
    ("KT p0=pA=0.5", 0.5, 0.5, *KT_PRIOR),
    ("KT p0=pA=0.9", 0.9, 0.9, *KT_PRIOR),
    ("KT p0=0.9 pA=0.85", 0.9, 0.85, *KT_PRIOR),
    ("KT p0=pA=0.99", 0.99, 0.99, *KT_PRIOR),
    ("informative@truth p0=pA=0.9", 0.9, 0.9, 180.0, 20.0),
    ("informative@truth p0=0.9 pA=0.8", 0.9, 0.8, 160.0, 40.0),
    ("informative@truth p0=pA=0.99", 0.99, 0.99, 198.0, 2.0),
    ("wrong Beta(50,1) p0=pA=0.3", 0.3, 0.3, 50.0, 1.0),
    ("wrong Beta(50,1) p0=0.3 pA=0.2", 0.3, 0.2, 50.0, 1.0),
    ("wrong Beta(1,50) p0=pA=0.3", 0.3, 0.3, 1.0, 50.0),
    ("wrong Beta(1,50) p0=pA=0.9", 0.9, 0.9, 1.0, 50.0),
    ("wrong Beta(1,50) p0=0.9 pA=0.8", 0.9, 0.8, 1.0, 50.0),
]
CASE_IDS = [c[0] for c in TYPE_I_CASES]


@pytest.mark.parametrize("label,p0,p_a,a,b", TYPE_I_CASES, ids=CASE_IDS)
def test_type_i_error_monitoring_every_sample(size, sim, record_rate, label, p0, p_a, a, b):
    """P(rejects ever True) <= alpha + 3 SE when pA <= p0, checking after every sample (Monte Carlo)."""
    seed = 1000 + CASE_IDS.index(label)
    rate = sim.ever_rate(lambda s, t: rejects(s, t, p0, ALPHA, a, b), p_a, size.runs, size.horizon, seed)
    record_rate(rate, ALPHA, size.runs, f"{size.name} horizon={size.horizon}")
    sim.assert_rate_at_most(rate, ALPHA, size.runs, f"type-I error of rejects, {label}")


@pytest.mark.parametrize("label,p0,p_a,a,b", TYPE_I_CASES, ids=CASE_IDS)
def test_type_i_error_exact_dynamic_program(size, sim, record_rate, label, p0, p_a, a, b):
    """Exact P(exists t <= T: rejects) computed by dynamic programming over S_t is <= alpha (no sampling error)."""
    prob = sim.exact_ever_probability(lambda s, t: rejects(s, t, p0, ALPHA, a, b), p_a, size.dp_horizon)
    record_rate(prob, ALPHA, 0, f"exact T={size.dp_horizon}")
    assert prob <= ALPHA, f"{label}: exact P(ever reject by t={size.dp_horizon}) = {prob:.6f} > alpha = {ALPHA}"


def test_exact_dynamic_program_matches_monte_carlo(sim):
    """The two harnesses agree (within 4 SE) on the same event, so neither is silently measuring something else."""
    def fn(s, t):  # a config with a large, easily measured rate
        return rejects(s, t, 0.6, 0.2, 2.0, 1.0)

    exact = sim.exact_ever_probability(fn, 0.6, 200)
    mc = sim.ever_rate(fn, 0.6, 4000, 200, seed=7)
    assert exact > 0.02, "the control event should be frequent enough to compare"
    assert abs(mc - exact) <= 4 * sim.binomial_se(exact, 4000), (mc, exact)


@pytest.mark.parametrize(
    "p0,p_a,a,b,min_rate",
    [
        (0.8, 0.95, *KT_PRIOR, 0.9),
        (0.5, 0.7, *KT_PRIOR, 0.8),
        (0.8, 0.95, 190.0, 10.0, 0.9),
        (0.3, 0.6, 1.0, 50.0, 0.9),
        (0.3, 0.6, 50.0, 1.0, 0.9),
    ],
)
def test_power_sanity(size, sim, record_rate, p0, p_a, a, b, min_rate):
    """With pA well above p0 the same harness sees frequent rejections: the type-I tests are not vacuous."""
    rate = sim.ever_rate(lambda s, t: rejects(s, t, p0, ALPHA, a, b), p_a, size.runs, size.horizon, seed=42)
    record_rate(rate, min_rate, size.runs, "power (must be >=)")
    assert rate >= min_rate, f"power {rate:.3f} < {min_rate} at p0={p0}, pA={p_a}, prior=({a}, {b})"


def test_negative_control_optional_stopping_clopper_pearson(size, sim, record_rate):
    """A fixed-n Clopper-Pearson test re-checked after every sample is NOT anytime-valid: the harness must measure a
    rate far above alpha + 3 SE for it (otherwise the harness could not detect a broken e-process)."""

    def naive(s, t):
        return np.asarray(clopper_pearson_lower(s, np.full_like(s, t), ALPHA)) > 0.5

    rate = sim.ever_rate(sim.tabulated(naive), 0.5, size.runs, size.horizon, seed=3)
    record_rate(rate, ALPHA, size.runs, "negative control, must EXCEED")
    limit = ALPHA + 3 * sim.binomial_se(ALPHA, size.runs)
    assert rate > limit, f"optional-stopping CP measured only {rate:.4f} <= {limit:.4f}: harness has no power"
    assert rate > 2 * ALPHA


def test_negative_control_dropping_the_composite_null_condition(size, sim, record_rate):
    """Without the condition S_t >= p0 t, the mixture ratio E_t(p0) grows when pA < p0 and the prior sits near pA;
    the harness must flag that procedure (rate >> alpha) while the real ``rejects`` passes on the same paths."""
    p0, p_a, a, b = 0.9, 0.8, 160.0, 40.0

    def without_condition(s, t):
        return np.asarray(log_e_value(s, t, p0, a, b)) >= math.log(1 / ALPHA)

    bad = sim.ever_rate(without_condition, p_a, size.runs, size.horizon, seed=11)
    good = sim.ever_rate(lambda s, t: rejects(s, t, p0, ALPHA, a, b), p_a, size.runs, size.horizon, seed=11)
    record_rate(bad, ALPHA, size.runs, "negative control, must EXCEED")
    record_rate(good, ALPHA, size.runs, "same paths, real rejects")
    assert bad > ALPHA + 3 * sim.binomial_se(ALPHA, size.runs)
    sim.assert_rate_at_most(good, ALPHA, size.runs, "rejects on the same paths")


def test_rejects_requires_hit_rate_at_least_p0():
    """Deterministic part of the composite-null construction: never reject when S_t < p0 * t, even where the mixture
    ratio E_t(p0) is astronomically large (data and prior both far below p0)."""
    t = np.arange(1, 2000)
    for p0 in (0.1, 0.5, 0.9):
        s = np.floor(p0 * t / 2).astype(int)
        a, b = 200 * p0 / 2, 200 * (1 - p0 / 2)
        big = np.asarray(log_e_value(s, t, p0, a, b)) >= math.log(1 / 1e-6)
        assert big.sum() > 100, "the check must cover cases where E_t alone would reject"
        assert not np.any(rejects(s, t, p0, 1e-6, a, b)), p0
        assert not np.any(rejects(np.ceil(p0 * t).astype(int) - 1, t, p0, 0.5, a, b)), p0
    assert rejects(300, 300, 0.5, 0.001)  # and a clear case does reject
