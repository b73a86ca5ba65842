"""Argument gaps in the public functions of :mod:`smoothing` (found by review; none affected soundness): inputs that
were accepted silently, or refused only by numpy's or Python's own message, are now refused with a ValueError that
names the argument and says what was expected."""

from __future__ import annotations

import math

import numpy as np
import pytest

import smoothing as sm

POLICY = {"sigma": 0.25, "alpha": 0.01, "budget": 1000}
PLAN = {"sigma": 0.25, "alpha": 0.01}


# ------------------------------------------------------------------------------------ 1. check_counts: one limit
@pytest.mark.parametrize("count", [2**62, 2**62 + 1, 2**63 - 1, np.uint64(2**63), np.uint64(2**64 - 1)],
                         ids=["2^62", "2^62+1", "2^63-1", "uint 2^63", "uint 2^64-1"])
def test_integer_counts_from_2_62_are_refused_like_float_counts(count):
    """Float counts were refused from 2^62 ("must be below 2^62") but integer counts were accepted up to 2^63 - 1
    (and a uint64 count >= 2^63 wrapped to a negative int64, refused as "must be >= 0"): one limit now, one message.
    Failed on the unfixed code: yes."""
    with pytest.raises(ValueError, match=r"trials must be below 2\^62"):
        sm.lower_bound(5, count, 0.05)
    with pytest.raises(ValueError, match=r"successes must be below 2\^62"):
        sm.best_radius_decision(count, count, **POLICY)
    with pytest.raises(ValueError, match=r"estimation_counts must be below 2\^62"):
        sm.certify([1, 0], [count, 0], 0.001, 0.25)
    assert sm.lower_bound(5, 2**62 - 1, 0.05) >= 0.0  # just below the limit: accepted, as a float count is


# ------------------------------------------------------------------------------------ 2. planned_sample_size
@pytest.mark.parametrize("kw,pattern", [
    ({"budget": 100, "min_gain": np.array([1e-4, 2e-4])}, r"min_gain must be a finite number >= 0"),
    ({"budget": 100, "min_gain": True}, r"min_gain must be a finite number >= 0"),
    ({"budget": 100, "min_gain": "1e-4"}, r"min_gain must be a finite number >= 0"),
    ({"budget": np.array([100, 200])}, r"budget must be one whole number"),
    ({"budget": True}, r"budget must be whole numbers"),
], ids=["gain array", "gain bool", "gain str", "budget array", "budget bool"])
def test_planned_sample_size_refuses_array_bool_and_str_gain_and_budget(kw, pattern):
    """An array min_gain raised numpy's "truth value of an array ... is ambiguous", a string min_gain numpy's
    "ufunc 'isfinite' not supported", a bool min_gain was taken as 1.0, and an array budget raised numpy's "only
    length-1 arrays can be converted" (a bool budget was already refused clearly; kept here as a guard).
    Failed on the unfixed code: yes."""
    with pytest.raises(ValueError, match=pattern):
        sm.planned_sample_size(2.0, 3.0, **PLAN, **kw)


@pytest.mark.parametrize("min_gain,budget", [(0.0, 2**31), (0.0, 2**21), (1e-9, 2**31)])
def test_planned_sample_size_refuses_a_scan_it_cannot_prune(min_gain, budget, monkeypatch):
    """With min_gain = 0 (or a tiny one) nothing prunes the scan of candidates, and each candidate n tabulates n + 1
    CP radii (and a predictive row of that length per input): min_gain = 0 at budget 2^31 went on to tabulate up to
    2^31 entries (~17 GB, hours). Refused now before any table is built, naming both arguments (the table builder
    is stubbed to fail, so the old scan is not run here). Failed on the unfixed code: yes (AssertionError from the
    stub: the scan started, no ValueError)."""
    import smoothing.fixed as fixed

    def no_table(*args):
        raise AssertionError("a table was built: the scan started instead of a refusal")

    monkeypatch.setattr(fixed, "_cp_radius_table", no_table)
    with pytest.raises(ValueError, match=r"min_gain.*budget.*2\^20"):
        sm.planned_sample_size(2.0, 3.0, **PLAN, budget=budget, min_gain=min_gain)


def test_planned_sample_size_keeps_its_plans_for_normal_inputs():
    """The guard refuses only scans that could reach candidates beyond 2^20 samples: the default lambda at the
    largest budget the server allows (2^31), and min_gain = 0 at a modest budget, plan as before (fixed values
    computed by the unfixed code). Failed on the unfixed code: no (a guard that the fix changes no plan)."""
    assert sm.planned_sample_size(2.0, 3.0, **PLAN, budget=2**31) == sm.planned_sample_size(2.0, 3.0, **PLAN,
                                                                                             budget=10**6)
    assert sm.planned_sample_size(29.0, 0.01, **PLAN, budget=2000, min_gain=0.0) == 2000


# ------------------------------------------------------------------------------------ 3. checkpoint_schedule
@pytest.mark.parametrize("growth", [math.nan, math.inf, -math.inf, True, "1.1", np.array([1.1, 1.2])],
                         ids=repr)
def test_checkpoint_schedule_refuses_non_finite_or_small_growth(growth):
    """growth NaN passed ``growth <= 1.0`` (False for NaN) and the loop raised "cannot convert float NaN to integer";
    inf raised OverflowError; a string raised Python's TypeError; True (== 1) and arrays gave other messages
    (growth <= 1 was already refused clearly: "growth > 1", tests/test_smoothing_arguments.py).
    Failed on the unfixed code: yes."""
    with pytest.raises(ValueError, match=r"growth must be a finite number > 1"):
        sm.checkpoint_schedule(100, growth=growth)


# ------------------------------------------------------------------------------------ 4. min_futility_trials
@pytest.mark.parametrize("bad", [-1, 2.5, True, math.nan, "200", np.array([200, 300]), None], ids=repr)
def test_best_radius_decision_validates_min_futility_trials(bad):
    """min_futility_trials was passed on unchecked: -1 or NaN (or a bool) silently changed the futility rule
    (t >= NaN is never true), 2.5 was compared as a float, a string raised Python's TypeError.
    Failed on the unfixed code: yes."""
    with pytest.raises(ValueError, match=r"min_futility_trials must be"):
        sm.best_radius_decision(5, 400, min_futility_trials=bad, **POLICY)
    with pytest.raises(ValueError, match=r"min_futility_trials must be"):
        sm.best_radius_decision(np.array([5, 6]), np.array([400, 400]), min_futility_trials=bad, **POLICY)


def test_best_radius_decision_accepts_whole_min_futility_trials():
    """0, an int and a whole float (as budget and the counts accept) keep working. Failed on the unfixed code: no."""
    for ok in (0, 200, 200.0, np.int64(50)):
        assert sm.best_radius_decision(5, 400, min_futility_trials=ok, **POLICY) == sm.Stop.FUTILITY


# ------------------------------------------------------------------------------------ 5. radius conversions
@pytest.mark.parametrize("call,pattern", [
    (lambda: sm.radius_from_probit("1.5", 0.25), r"z_lower must be a number"),
    (lambda: sm.radius_from_probit(True, 0.25), r"z_lower must be a number"),
    (lambda: sm.radius_from_probit(np.array([True, False]), 0.25), r"z_lower must be a number"),
    (lambda: sm.probability_for_radius("1.5", 0.25), r"radius must be a number"),
    (lambda: sm.probability_for_radius(True, 0.25), r"radius must be a number"),
], ids=["probit str", "probit bool", "probit bool array", "radius str", "radius bool"])
def test_radius_conversions_refuse_strings_and_bools(call, pattern):
    """radius_from_probit("1.5", 0.25) returned 0.375 and radius_from_probit(True, 0.25) 0.25; probability_for_radius
    took "1.5" as 1.5 and True as 1.0 - unlike every other public function (smoothing._checks refuses them).
    Failed on the unfixed code: yes."""
    with pytest.raises(ValueError, match=pattern):
        call()
    assert sm.radius_from_probit(2, 0.25) > 0 and sm.probability_for_radius(0, 0.25) == 0.5  # ints still numbers


# ------------------------------------------------------------------------------------ 6. mondrian_quantiles
@pytest.mark.parametrize("bins", [
    [0.5] * 30 + [1] * 30, [math.nan] * 30 + [1] * 30, [True] * 30 + [False] * 30, ["0"] * 30 + ["1"] * 30,
], ids=["half", "nan", "bool", "str"])
def test_mondrian_quantiles_refuses_non_integer_bin_labels(bins):
    """A label 0.5 or NaN equals no bin index, so those scores were silently dropped (bin 0 got +inf, 'too few
    scores'); bool labels were taken as 0/1 and string labels raised numpy's comparison TypeError.
    Failed on the unfixed code: yes."""
    scores = np.random.default_rng(0).uniform(size=60)
    with pytest.raises(ValueError, match=r"bins must be integer bin indices"):
        sm.mondrian_quantiles(scores, bins, 2, 0.1)


def test_mondrian_quantiles_accepts_whole_float_labels():
    """Whole floats are bin indices (as whole-float counts are counts): the same quantiles as int labels.
    Failed on the unfixed code: no."""
    scores = np.random.default_rng(1).uniform(size=60)
    labels = np.repeat([0, 1], 30)
    np.testing.assert_array_equal(sm.mondrian_quantiles(scores, labels.astype(float), 2, 0.1),
                                  sm.mondrian_quantiles(scores, labels, 2, 0.1))
