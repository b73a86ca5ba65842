"""The per-input ceiling of bench/per_input_ceiling.py: its closed forms and its oracle allocation.

A ceiling that came out too LOW would wrongly call a target infeasible, so each check compares with an independent
computation. Run against two bugs, each test failed: the Wald bisection with the KL's arguments swapped
(KL(p0 || pA)) and the allocation without mixing two multipliers (the step function instead of the hull)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from bench import per_input_ceiling as ceiling


def test_wald_ceiling_matches_the_closed_form_for_an_image_that_always_hits():
    """pA = 1: KL(1 || p0) = -log p0, so the largest p0 at n samples is alpha^(1/n) exactly."""
    alpha, sigma = 0.001, 0.25
    radius = ceiling.wald_radius(np.array([1.0]), np.array([True]), alpha, sigma)[0]
    n = ceiling.GRID[1:]
    closed = sigma * norm.ppf(alpha ** (1.0 / n))
    assert radius[1:] == pytest.approx(np.where(closed > 0, closed, 0.0), abs=1e-9)


def test_wald_ceiling_is_zero_for_a_wrong_class_and_below_one_half():
    alpha, sigma = 0.001, 0.25
    radius = ceiling.wald_radius(np.array([0.99, 0.45]), np.array([False, True]), alpha, sigma)
    assert not radius.any()


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
