"""Mutation audit, round 6a: the statistical core (smoothing.confseq's Newton inversion, verification and step-back
and its scalar twin; smoothing.eprocess; smoothing.priors' mixture and its rounding magnitude; smoothing.stopping's
policies, fast paths and checkpoint schedule; smoothing._checks).

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it; the last test is the regression test of a
real bug this round found and fixed (an int64 overflow of the gain rule's plug-in projection). Deterministic: fixed
grids of counts, no random draws.
"""

from __future__ import annotations

import numpy as np
import pytest


# ------------------------------------------------------------------------------------------ priors: magnitude
@pytest.mark.parametrize("w", [0.0, 0.1, 1.0])
def test_the_rounding_magnitude_covers_every_betaln_value_summed(w):
    """log_marginal's ``magnitude`` (the scale of the e-process's 64-ulp rounding margin) must bound the size of
    the terms summed into log m: |log B(a_k + S, b_k + F)| + |log B(a_k, b_k)| of each component k (docstring:
    "the betaln values, the log-gamma terms inside them ... and log of the weights"), in the array version and in
    the scalar twin. Bug guarded against (run against it, this test failed): _beta_term's magnitude taken as
    |num - den| (the size of the difference) instead of |num| + |den|: with tiny priors the two betaln values are
    ~7 nats each and nearly cancel, so the margin shrank ~10x and no existing test noticed."""
    from scipy.special import betaln

    from smoothing.kernels import log_marginal as log_marginal_one  # the compiled twin
    from smoothing.priors import log_marginal

    for a, b in ((1e-3, 1e-3), (0.01, 2.0), (0.5, 0.5), (29.0, 0.01), (1e4, 1e4)):
        for s, f in ((1, 0), (0, 1), (1, 1), (3, 40), (5000, 5)):
            comps = ([] if w == 1.0 else [(a, b)]) + ([] if w == 0.0 or (a, b) == (0.5, 0.5) else [(0.5, 0.5)])
            need = sum(abs(betaln(ak + s, bk + f)) + abs(betaln(ak, bk)) for ak, bk in comps)
            _, magnitude = log_marginal(np.array([s]), np.array([f]), np.array([a]), np.array([b]), w)
            _, magnitude_one = log_marginal_one(float(s), float(f), a, b, float(w))
            assert magnitude[0] >= need and magnitude_one >= need, (a, b, s, f, w, magnitude, need)


# --------------------------------------------------------------------------------------- stopping: real bug
def test_the_gain_rule_projection_does_not_overflow_beyond_two_to_the_31_draws():
    """REAL BUG (fixed in this round): the array path of validated_best_radius_codes projected the hits as
    (S * t') // t in int64; with t' = t beyond the budget and t > ~2^31.5 draws the product wrapped around, the
    projected radius became 0 and the rule answered CERTIFIED where it is BUDGET (with lambda = 0: r(S', t') - r_now
    = 0 is not < 0), while the one-job float path (Python ints) answered BUDGET: the two paths the docstrings call
    "same codes" disagreed (seen: best_radius_decision(2**33, 2**33, budget=2**31, min_gain=0) == BUDGET but
    best_radius_decision([2**33] * 2, [2**33] * 2, ...) == [CERTIFIED] * 2). This test failed before the fix
    (smoothing.stopping._projected_hits: exact projections, in Python ints where int64 would overflow)."""
    from smoothing import Stop, best_radius_decision, proposal_decision

    kw = {"sigma": 0.25, "alpha": 0.001, "budget": 2**31, "min_gain": 0.0}
    for s, t in ((2**33, 2**33), (2**33 - 5, 2**33), (2**40 - 3, 2**40)):
        assert best_radius_decision(s, t, **kw) == Stop.BUDGET
        assert best_radius_decision([s, s], [t, t], **kw).tolist() == [Stop.BUDGET] * 2
        assert proposal_decision([s, s], [t, t], proposal_radius=100.0, **kw).tolist() == [Stop.BUDGET] * 2


# ----------------------------------------------------------------------------------- stopping: lone-job path
def test_a_lone_job_runs_the_fraction_rule_when_asked():
    """A lone job takes the one-job path (smoothing.kernels.best_radius_one, through stopping._marginal_gain_codes)
    only for the marginal-gain rule; with ``fraction`` it must get the fraction rule's code, the same as in a call of
    several jobs. Bug guarded against (run against it, this test failed): the fast path taken whatever ``fraction``
    (``if s.size == 1:``), so a lone job ran the gain rule; the existing one-job fraction cases (2000/2000 and
    100/100) get the same code from both rules."""
    from smoothing import best_radius_decision

    kw = {"sigma": 0.25, "alpha": 0.001, "budget": 10_000, "kt_weight": 0.0}
    differ = 0
    for s, t in ((1000, 1000), (400, 400), (950, 1000), (3000, 3000), (120, 300)):
        for fraction in (0.5, 0.775, 0.9):
            alone = best_radius_decision(s, t, fraction=fraction, **kw)
            assert alone == best_radius_decision([s, s], [t, t], fraction=fraction, **kw)[0], (s, t, fraction)
            differ += alone != best_radius_decision([s, s], [t, t], **kw)[0]
    assert differ  # the grid tells the two rules apart
