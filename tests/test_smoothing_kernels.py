"""The compiled kernels (smoothing.kernels): every bound is a p0 the exact e-value test rejects, whichever path (one
entry, an array, the public API) computed it; the rule's codes agree between one job and many; and the module works
where numba can write no cache.

The soundness tests proper of the bound (never beyond the exact root on a grid, consistent with ``rejects``, tight)
live in tests/test_smoothing_confseq_exact.py and run on these kernels. Bugs planted in smoothing/kernels.py and
what failed (each run once): the verification skipped (``lower_bound_one`` returning the Newton iterate unchecked):
test_lower_bound_is_consistent_with_rejects and the same-bits test here (bounds the e-value test does not reject);
the 64-ulp margin dropped from ``_log_e_excess``: test_lower_bound_is_consistent_with_rejects and
test_rejects_never_rejects_where_exact_arithmetic_does_not; the Newton start stepped the wrong way (v0 + g/g'):
the tightness, brute-force and consistency tests there and tests/test_confseq_newton_start.py.
"""

from __future__ import annotations

import subprocess
import sys

import mpmath as mp
import numpy as np

from smoothing import best_radius_decision, lower_bound, rejects
from smoothing.kernels import best_radius_codes, lower_bound_one, lower_bounds
from tests.test_smoothing_confseq_exact import _exact_excess


def _seeded_entries(n: int, seed: int):
    rng = np.random.default_rng(seed)
    t = rng.integers(1, 20_000, n)
    s = rng.binomial(t, rng.choice([0.3, 0.6, 0.9, 0.99, 0.999, 1.0], n))
    alpha = rng.choice([1e-6, 1e-3, 0.05, 0.3], n)
    a, b = rng.choice([0.5, 0.05, 3.0, 40.0], n), rng.choice([0.5, 0.2, 1.0, 9.0], n)
    return s.astype(np.int64), t.astype(np.int64), alpha, a, b


def test_every_reported_bound_lies_in_the_exact_rejection_region():
    """L_t > 0 implies the exact (mpmath, 40 digits) e-value test rejects H0: pA <= L_t, for 300 seeded entries with
    priors, alphas and KT weights of every kind: L_t is left of the exact root, so P(exists t: L_t > pA) <= alpha
    holds for the reported values themselves. Run against a wrong mixture (the weights of the prior and of KT
    swapped in ``log_marginal``) and against a wrong Beta normalizer (B(a + 1/2, b) for B(a, b)): fails on both
    (the kernel's own verification accepts them: it checks the bound against the same wrong marginal)."""
    mp.mp.dps = 40
    s, t, alpha, a, b = _seeded_entries(300, seed=11)
    for w in (0.0, 0.1, 1.0):
        bounds = lower_bounds(s, t, alpha, a, b, w)
        for i in np.flatnonzero(bounds > 0):
            assert _exact_excess(int(s[i]), int(t[i]), mp.mpf(bounds[i]), alpha[i], a[i], b[i], w) >= 0, (
                int(s[i]), int(t[i]), alpha[i], a[i], b[i], w, bounds[i])


def test_one_entry_the_array_and_the_public_api_give_the_same_bits():
    """A job's bound must not depend on how many jobs share its call, nor on the entry point: lower_bound_one,
    lower_bounds and smoothing.lower_bound agree bit for bit, and smoothing.rejects accepts every one of them."""
    s, t, alpha, a, b = _seeded_entries(400, seed=12)
    together = lower_bounds(s, t, alpha, a, b, 0.1)
    alone = np.array([lower_bound_one(int(s[i]), int(t[i]), alpha[i], a[i], b[i], 0.1) for i in range(len(s))])
    public = lower_bound(s, t, alpha, a, b, kt_weight=0.1)
    assert np.array_equal(together, alone) and np.array_equal(together, public)
    hit = together > 0
    assert rejects(s[hit], t[hit], together[hit], alpha[hit], a[hit], b[hit], kt_weight=0.1).all()


def test_the_rule_gives_a_lone_job_the_code_it_gets_among_others():
    """best_radius_decision on one job (Python-int projections, the scalar kernel) and on many (numpy projections,
    the array kernel) give the same codes; the array kernel's L_t output is the bound itself."""
    s, t, alpha, a, b = _seeded_entries(200, seed=13)
    kw = {"sigma": 0.25, "budget": 20_000, "min_gain": 5e-5}
    many = best_radius_decision(s, t, alpha=alpha, a=a, b=b, **kw)
    one = [best_radius_decision(int(s[i]), int(t[i]), alpha=alpha[i], a=a[i], b=b[i], **kw) for i in range(len(s))]
    assert [int(c) for c in one] == many.tolist()
    assert len(set(many.tolist())) >= 3  # the grid reaches several codes
    t_safe = np.maximum(t, 1)
    t_proj = np.minimum(2 * t_safe, np.maximum(20_000, t_safe))
    lower = np.empty(len(s))
    best_radius_codes(s, t, s * t_proj // t_safe, t_proj, s * 20_000 // t_safe, np.full(len(s), 20_000), alpha, a, b,
                      np.full(len(s), 0.25), np.full(len(s), 5e-5), 0.1, 200, lower)
    assert np.array_equal(lower, lower_bounds(s, t_safe, alpha, a, b, 0.1))


def test_the_kernels_work_where_numba_can_write_no_cache():
    """With no cache locator usable (a read-only file system), numba.njit(cache=True) raises at decoration; the
    module then compiles in the process instead of failing to import. Checked in a fresh interpreter with numba's
    locators emptied; without the fallback its import raises RuntimeError."""
    code = ("import numba.core.caching as c; c.CacheImpl._locator_classes = []; "
            "from smoothing.kernels import lower_bound_one; print(lower_bound_one(90, 100, 0.001, 0.5, 0.5, 0.1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout) == lower_bound_one(90, 100, 0.001, 0.5, 0.5, 0.1)


def test_the_rule_read_from_a_count_table_gives_each_job_its_own_code_and_bound():
    """validated_best_radius_rows (the engine's call: counts, class, trials and parameters read from the job table
    by row) == validated_best_radius_codes on the same jobs gathered by numpy, codes and L_t, for a shuffled subset
    of rows with their own alpha, prior, budget and lambda, jobs with no samples yet and a job with no class (Cohen
    before selection: 0 hits). Run once against three bugs in smoothing.kernels.best_radius_rows, each failed here:
    a row's parameters read at its position j instead of its row r; the projection t' = 2 t_s (the budget cap
    dropped); S_B projected over t instead of max(t, 1) (a ZeroDivisionError at t = 0)."""
    from smoothing.stopping import validated_best_radius_codes, validated_best_radius_rows

    rng = np.random.default_rng(29)
    n, k = 600, 4
    budget = rng.choice([500, 2_000, 10_000], n)
    trials = np.minimum(rng.integers(0, 12_000, n), budget)
    trials[:20] = 0
    cls = rng.integers(0, k, n)
    cls[20:30] = -1
    counts = np.zeros((n, k), dtype=np.int64)
    hits = rng.binomial(trials, rng.choice([0.4, 0.7, 0.95, 0.999, 1.0], n))
    counts[np.arange(n), np.maximum(cls, 0)] = hits
    counts[np.arange(n), (np.maximum(cls, 0) + 1) % k] = trials - hits
    alpha, a, b = rng.choice([0.1, 0.001], n), rng.choice([0.5, 3.0, 29.0], n), rng.choice([0.5, 0.01, 7.0], n)
    min_gain = rng.choice([0.0, 5e-5, 2e-4], n)
    rows = rng.permutation(n)[:450]
    lower = np.empty(len(rows))
    codes = validated_best_radius_rows(rows, counts, cls, trials, alpha, a, b, budget, 0.25, min_gain,
                                       lower_out=lower)
    s = np.where(cls[rows] >= 0, counts[rows, np.maximum(cls[rows], 0)], 0)
    expected_lower = np.empty(len(rows))
    expected = validated_best_radius_codes(s, trials[rows], alpha[rows], a[rows], b[rows], budget[rows],
                                           np.full(len(rows), 0.25), min_gain[rows], lower_out=expected_lower)
    assert np.array_equal(codes, expected)
    assert np.array_equal(lower, expected_lower)
    assert len(set(codes.tolist())) >= 3  # several codes reached
