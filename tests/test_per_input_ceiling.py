"""The per-input ceiling of bench/per_input_ceiling.py: its upper bound and its oracle allocation.

A bound that came out too low would wrongly call a target infeasible: the first test checks it against a sound method
(it caught the earlier power-1 Wald row). The allocation test failed without mixing two multipliers (the step
function instead of the hull)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from bench import per_input_ceiling as ceiling


@pytest.mark.parametrize("p_a", [0.6, 0.8, 0.95, 0.99, 0.999, 1.0])
def test_the_upper_bound_is_above_a_sound_method_at_every_budget(p_a):
    """Fixed-n Clopper-Pearson is a sound per-input method, so its expected radius can never exceed a bound for any
    sound method. Run once against the previous row (Wald's bound at power 1, which ignored that a method may certify
    with probability < 1 for fewer samples): it failed for every pA here (e.g. pA = 0.99, n = 300: 0.416 below the sound method's 0.434)."""
    alpha, sigma = 0.001, 0.25
    ok = np.array([True])
    bound = ceiling.power_bound_radius(np.array([p_a]), ok, alpha, sigma)[0]
    sound = ceiling.expected_radius(np.array([p_a]), ok, ceiling.clopper_pearson, alpha, sigma)[0]
    assert (bound >= sound).all()


def test_the_upper_bound_is_zero_for_a_wrong_class_and_alpha_sized_below_one_half():
    """A wrong tested class counts nothing; at pA <= 1/2 no radius is certified more often than alpha."""
    alpha, sigma = 0.001, 0.25
    bound = ceiling.power_bound_radius(np.array([0.99, 0.45]), np.array([False, True]), alpha, sigma)
    assert not bound[0].any()
    cap = ceiling.RADIUS_CAP_SIGMAS * sigma
    assert bound[1, 1:] == pytest.approx(np.full(len(ceiling.GRID) - 1, alpha * cap), rel=1e-9)


def test_the_largest_power_inverts_the_binary_kl_from_above():
    """d(q || alpha) is the budget at which power q becomes possible: the inverse returns q (never less), 1 at
    log(1/alpha) and beyond, alpha at budget 0."""
    alpha = 0.001
    q = np.array([0.002, 0.1, 0.5, 0.9, 0.999])
    budget = ceiling._kl(q, np.full(len(q), alpha))
    power = ceiling._largest_power(budget, alpha)
    assert (power >= q).all() and power == pytest.approx(q, rel=1e-9)
    assert ceiling._largest_power(np.array([np.log(1 / alpha), 50.0]), alpha).tolist() == [1.0, 1.0]
    assert ceiling._largest_power(np.array([0.0]), alpha)[0] == pytest.approx(alpha, rel=1e-9)


def test_the_oracle_allocation_interpolates_the_hull_between_two_multipliers():
    """Two identical images with a concave curve: at a budget between two grid points the best mean radius is the
    straight line between them (half of the images at each), not the lower grid point."""
    grid = ceiling.GRID
    curve = np.sqrt(grid / grid[-1])  # concave in n
    radius = np.tile(curve, (2, 1))
    lo, hi = 200, 250
    assert lo in grid and hi in grid
    want = curve[list(grid).index(lo)] + 0.5 * (curve[list(grid).index(hi)] - curve[list(grid).index(lo)])
    assert ceiling.best_mean_radius(radius, (lo + hi) / 2) == pytest.approx(want, rel=1e-6)
    assert ceiling.best_mean_radius(radius, hi) == pytest.approx(curve[list(grid).index(hi)], rel=1e-9)


def test_clopper_pearson_expected_radius_at_pA_one_is_the_closed_form():
    """S = n surely: the one-sided Clopper-Pearson bound is alpha^(1/n)."""
    alpha, sigma = 0.001, 0.25
    got = ceiling.expected_radius(np.array([1.0]), np.array([True]), ceiling.clopper_pearson, alpha, sigma)[0]
    closed = sigma * norm.ppf(alpha ** (1.0 / ceiling.GRID[1:]))
    assert got[1:] == pytest.approx(np.maximum(closed, 0.0), rel=1e-9)
