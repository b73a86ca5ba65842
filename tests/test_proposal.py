"""The proposal policy (smoothing.proposal_decision), alone and as the engine's decision tables tabulate it.

A proposal job stops as soon as the radius proposed from the clean input (the surrogate's shrunk point estimate) is
verified by the certificate's own e-process, and otherwise behaves exactly like a best-radius job. What must hold:
* the policy's codes: TARGET exactly where H0: pA <= Phi(r/sigma) is rejected, else best_radius_decision's code;
* a 'target' stop certifies the proposal under the job's OWN prior (the one its certificate uses);
* a 'target' answer for a proposal above the true radius is given with probability <= alpha (exact);
* per-job min_gain (JobSpec.min_gain, the marginal-gain rule's lambda of best-radius and proposal jobs): the policy is
  vectorized over jobs with their own parameters, and the precomputed decision tables give each job its own policy
  at its own lambda.
Proposal jobs in the real engine (real onnxruntime session of the default bundle): tests/test_proposal_engine.py.
Each soundness test names the bug it was run against (by editing the code once) and says that it failed then.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from smoothing import (
    DEFAULT_MIN_GAIN,
    KT_PRIOR,
    Stop,
    best_radius_decision,
    certified_radius,
    checkpoint_schedule,
    lower_bound,
    probability_for_radius,
    rejects,
)
from smoothing.stopping import DEFAULT_PROPOSAL_SHRINK, proposal_decision, proposal_radius
from tests import proposal_helpers
from tests.proposal_helpers import SIGMA, K, _spec

images = proposal_helpers.images  # the module-scoped fixture
LOG_1000 = math.log(1000.0)


def _kt_log_e(s: int, t: int, p0: float) -> float:
    """log E_t(p0) of the KT e-process from math.lgamma (independent of smoothing): log m(S, F) - log p0^S (1-p0)^F,
    m(S, F) = B(S + 1/2, F + 1/2) / B(1/2, 1/2)."""
    f = t - s
    log_m = math.lgamma(s + 0.5) + math.lgamma(f + 0.5) - math.lgamma(t + 1) - math.log(math.pi)
    return log_m - s * math.log(p0) - (f * math.log1p(-p0) if f else 0.0)


# ------------------------------------------------------------------------------------------------ the pure policy
def test_proposal_decision_hand_computed_cases():
    """KT prior, alpha = 0.001 (log 1/alpha = 6.908), sigma = 0.25. log E from math.lgamma:
    64/64 at r = 0.1 (p0 = Phi(0.4) = 0.655): 24.38 -> TARGET; at r = 0 (p0 = 1/2): 41.71 -> TARGET;
    64/64 at r = 0.5 (p0 = Phi(2) = 0.977): -1.18, not verified; the gain rule goes on -> CONTINUE;
    2048/2048 at budget 2048, r = 0.5: 42.75 -> TARGET (before BUDGET / CERTIFIED); r = 1.0 (p0 = 0.99997): -4.32, not
    verified; at the budget the gain rule settles -> CERTIFIED; r = 3.0 = 12 sigma (Phi == 1 in floating point): never
    verified -> CERTIFIED; 10/64 at r = 0.1: S < p0 t, not verified, U < 1/2 -> FUTILITY;
    55/100 at budget 100, r = 0.1: -0.16, not verified; nothing certified, t < 200 -> BUDGET."""
    kw = {"sigma": SIGMA, "alpha": 0.001, "a": KT_PRIOR[0], "b": KT_PRIOR[1]}
    cases = [(64, 64, 0.1, 2048, Stop.TARGET, 24.38), (64, 64, 0.0, 2048, Stop.TARGET, 41.71),
             (64, 64, 0.5, 2048, Stop.CONTINUE, -1.18), (2048, 2048, 0.5, 2048, Stop.TARGET, 42.75),
             (2048, 2048, 1.0, 2048, Stop.CERTIFIED, -4.32), (2048, 2048, 3.0, 2048, Stop.CERTIFIED, None),
             (10, 64, 0.1, 2048, Stop.FUTILITY, None), (55, 100, 0.1, 100, Stop.BUDGET, -0.16)]
    for s, t, r, budget, code, log_e in cases:
        if log_e is not None:
            p0 = max(norm.cdf(r / SIGMA), 0.5)
            assert _kt_log_e(s, t, p0) == pytest.approx(log_e, abs=0.01)
            assert (log_e >= LOG_1000 and s >= p0 * t) == (code == Stop.TARGET)
        got = proposal_decision(s, t, proposal_radius=r, budget=budget, **kw)
        assert isinstance(got, Stop) and got == code, (s, t, r, budget, got)
        if code != Stop.TARGET:
            assert got == best_radius_decision(s, t, budget=budget, **kw)


def _grid(t_max=300):
    t = np.concatenate([np.arange(0, t_max + 1), [1000, 2000]])
    pairs = [(s, tt) for tt in t for s in (range(tt + 1) if tt <= t_max else range(int(0.9 * tt), tt + 1))]
    return np.array(pairs).T


@pytest.mark.parametrize("radius", [0.0, 0.1, 0.3, 0.6, 3.0])
@pytest.mark.parametrize("alpha,a,b,w", [(0.001, *KT_PRIOR, 0.1), (0.05, 180.0, 20.0, 0.0),
                                         (0.001, 29.0, 0.01, 0.1), (0.001, 1.0, 50.0, 0.1)])
def test_proposal_decision_follows_its_rule(radius, alpha, a, b, w):
    """On a grid of (S, t): TARGET exactly where rejects(S, t, Phi(r/sigma)) at the job's prior (equivalently
    L_t >= Phi(r/sigma)), never for r = 12 sigma; everywhere else exactly best_radius_decision's code."""
    s, t = _grid()
    kw = {"sigma": SIGMA, "alpha": alpha, "budget": 2000, "a": a, "b": b, "kt_weight": w}
    d = proposal_decision(s, t, proposal_radius=radius, **kw)
    p = max(probability_for_radius(radius, SIGMA), 0.5)
    verified = (t > 0) & (p < 1.0) & rejects(s, np.maximum(t, 1), min(p, 1 - 1e-16), alpha, a, b, kt_weight=w)
    assert np.array_equal(d == Stop.TARGET, verified)
    assert np.array_equal(verified, (t > 0) & (lower_bound(s, t, alpha, a, b, kt_weight=w) >= p))
    assert np.array_equal(d[~verified], best_radius_decision(s, t, **kw)[~verified])
    assert (verified.any() or radius > 0.5) and not (radius > 1.0 and verified.any())


@pytest.mark.parametrize("a,b", [(1.0, 50.0), (200.0, 0.5), (29.0, 0.01), KT_PRIOR])
@pytest.mark.parametrize("w", [0.0, 0.1])
def test_a_target_stop_certifies_the_proposal_under_the_jobs_own_prior(a, b, w):
    """Soundness of the label: wherever the policy says TARGET, the certificate computed with the SAME prior and
    weight has radius >= the proposal (up to the 1e-10 rounding down) on a grid of (S, t) and proposals.
    Run once against verification with the KT prior instead of the job's (``_radius_verified(..., 0.5, 0.5, ...)``
    in proposal_decision): it failed in 4 of the 8 cases, every non-KT prior where the KT test is the more lenient
    one (e.g. Beta(1, 50) + KT, w = 0.1, r = 0.05: 'target' with a certified radius of 0.011 under the job's prior)."""
    s, t = _grid(200)
    checked = 0
    for r in (0.05, 0.2, 0.26, 0.4, 0.55):
        d = proposal_decision(s, t, sigma=SIGMA, proposal_radius=r, alpha=0.001, budget=2000, a=a, b=b, kt_weight=w)
        hit = d == Stop.TARGET
        checked += int(hit.sum())
        if not hit.any():
            continue
        radius = certified_radius(s[hit], t[hit], 0.001, SIGMA, a, b, kt_weight=w)
        assert np.all(radius >= r * (1 - 1e-9)), (a, b, w, r, float(radius.min()))
    assert checked > 100


@pytest.mark.parametrize("p_a,a,b,w,alpha", [(0.9, *KT_PRIOR, 0.0, 0.05), (0.99, 29.0, 0.01, 0.1, 0.001),
                                             (0.95, 200.0, 0.5, 0.1, 0.05)])
def test_target_answer_above_the_true_radius_is_rare(sim, record_rate, p_a, a, b, w, alpha):
    """At the null boundary (proposal = the true radius sigma Phi^-1(pA)), a 'target' answer claims a radius that is
    not certified truly; its exact probability (dynamic program over S at the worker's checkpoints, budget 2,000) is
    <= alpha and <= the probability that the confidence sequence has crossed pA by the stop.
    Run once against a verification by the fixed-n Clopper-Pearson bound (``clopper_pearson_lower(s, t, alpha) >=
    p_target`` instead of the e-process: optional stopping): it failed in all three cases (P('target') = 0.165 at
    alpha = 0.05, 0.00123 at alpha = 0.001, 0.144 at alpha = 0.05; against 0.0025, 0.00057, 0.042 here)."""
    budget = 2000
    checkpoints = checkpoint_schedule(budget, first=16, growth=1.25)
    r = SIGMA * norm.ppf(p_a)
    kw = {"sigma": SIGMA, "proposal_radius": r, "alpha": alpha, "budget": budget, "a": a, "b": b, "kt_weight": w}

    def decide(s, t):
        return proposal_decision(s, t, **kw)

    def said_target(s, t):
        return np.where(decide(s, t) == Stop.TARGET, 1.0, 0.0)

    crossed_by = lambda s, t: lower_bound(s, t, alpha, a, b, kt_weight=w) * (1 + 1e-12)  # noqa: E731 (L_t >= pA)
    p_target, stopped, envelope = sim.exact_policy_violation(decide, said_target, p_a, checkpoints, crossed_by)
    record_rate(p_target, alpha, 0, f"exact P(target) at the null boundary, envelope {envelope:.3g}")
    assert stopped == pytest.approx(1.0, abs=1e-9)
    assert p_target <= alpha and p_target <= envelope * (1 + 1e-9) + 1e-15, (p_target, envelope)


def test_proposal_decision_is_vectorized_over_jobs():
    """Per-job alpha, prior, budget and proposal in one call == one scalar call per job."""
    rng = np.random.default_rng(11)
    n = 200
    t = rng.integers(0, 2500, n)
    s = rng.binomial(t, rng.uniform(0.4, 1.0, n))
    args = {"alpha": rng.choice([0.1, 0.01, 0.001], n), "budget": rng.choice([100, 1000, 2048], n),
            "a": rng.uniform(0.3, 40, n), "b": rng.uniform(0.01, 5, n), "proposal_radius": rng.uniform(0, 0.8, n),
            "min_gain": rng.choice([0.0, 5e-5, 2e-4, 1e-3], n)}
    vec = proposal_decision(s, t, sigma=SIGMA, **args)
    one = [proposal_decision(int(s[i]), int(t[i]), sigma=SIGMA, **{k: v[i] for k, v in args.items()})
           for i in range(n)]
    assert vec.dtype == np.int8 and vec.tolist() == [int(c) for c in one]
    assert len(set(vec.tolist())) >= 3
    del args["proposal_radius"]
    vec = best_radius_decision(s, t, sigma=SIGMA, **args)
    one = [best_radius_decision(int(s[i]), int(t[i]), sigma=SIGMA, **{k: v[i] for k, v in args.items()})
           for i in range(n)]
    assert vec.tolist() == [int(c) for c in one]
    one_gain = best_radius_decision(s, t, sigma=SIGMA, **{**args, "min_gain": 5e-5})
    assert not np.array_equal(vec, one_gain)  # the per-job lambdas matter


@pytest.mark.parametrize("kwargs,pattern", [
    ({"proposal_radius": -0.1}, r"proposal_radius must be a finite number >= 0"),
    ({"proposal_radius": math.nan}, r"proposal_radius must be a finite number >= 0"),
    ({"proposal_radius": math.inf}, r"proposal_radius must be a finite number >= 0"),
    ({"alpha": 1.0}, r"alpha must lie strictly between 0 and 1"),
    ({"sigma": 0.0}, r"sigma must be a finite number > 0"),
    ({"budget": 0}, r"budget must be between 1 and 2\^31"),
    ({"a": -1.0}, r"Beta prior parameter a must be finite and > 0"),
    ({"kt_weight": 1.5}, r"kt_weight must be a number in \[0, 1\]"),
    ({"min_gain": -1.0}, r"min_gain must be a finite number >= 0"),
    ({"min_gain": np.array([1e-4, math.nan])}, r"min_gain must be a finite number >= 0"),
    ({"successes": 11}, r"successes must not exceed trials"),
])
def test_proposal_decision_bad_arguments(kwargs, pattern):
    call = {"successes": 5, "trials": 10, "sigma": SIGMA, "proposal_radius": 0.1, "alpha": 0.01, "budget": 100,
            **kwargs}
    with pytest.raises(ValueError, match=pattern):
        proposal_decision(call.pop("successes"), call.pop("trials"), **call)


def test_proposal_radius_is_the_shrunk_point_estimate():
    """shrink * sigma * max(z_hat, 0), vectorized; bad z_hat, sigma or shrink raise ValueError naming them."""
    assert proposal_radius(2.0, sigma=SIGMA, shrink=0.8) == pytest.approx(0.4)
    assert proposal_radius(-1.0, sigma=SIGMA) == 0.0
    assert proposal_radius(1.0, sigma=SIGMA) == pytest.approx(DEFAULT_PROPOSAL_SHRINK * SIGMA)
    np.testing.assert_allclose(proposal_radius(np.array([0.5, 5.2]), sigma=0.5, shrink=0.6), [0.15, 1.56])
    for kwargs, pattern in (({"z_hat": math.inf}, "z_hat must be finite"), ({"sigma": -1.0}, "sigma must be"),
                            ({"shrink": 0.0}, "shrink must be a finite number > 0")):
        with pytest.raises(ValueError, match=pattern):
            proposal_radius(**{"z_hat": 1.0, "sigma": SIGMA, **kwargs})


# ----------------------------------------------------------------------------------------- the engine's decision tables
def test_precomputed_decisions_follow_each_jobs_policy(images):
    """Target, proposal and best-radius jobs in one table: every entry of the decisions tabulated while a chunk is in
    flight equals the job's own policy from smoothing at its own parameters, min_gain included (so the grouping
    sends each job to its policy with its lambda), and the lookup at landing equals the direct evaluation."""
    from models.decisions import DecisionTables, policy_decisions
    from models.jobs import SEQUENTIAL, JobTable
    from smoothing import target_radius_decision

    rng = np.random.default_rng(9)
    table = JobTable(images.shape[1:], K, capacity=8)

    class Job:
        def __init__(self, order, spec):
            self.spec, self.order, self.slot = spec, order, -1

    for i in range(9):
        kind = ("target", "proposal", "best")[i % 3]
        spec = _spec(images[i % len(images)], alpha=float(rng.choice([0.1, 0.01])), budget=3000,
                     prior=(float(rng.uniform(0.5, 30)), float(rng.uniform(0.5, 3))),
                     target_radius=0.1 if kind == "target" else None,
                     proposal_radius=float(rng.uniform(0.05, 0.3)) if kind == "proposal" else None,
                     min_gain=None if kind == "target" or i % 2 else float(rng.choice([0.0, 2e-4, 1e-3])))
        table.admit(Job(i, spec), SEQUENTIAL, checkpoint_schedule(spec.budget))
    tables, seen = DecisionTables(max_points=20_000), set()
    for _ in range(10):
        batch = table.allocate(100_000, speculate=False)
        if batch is None:
            break
        tables.precompute(table, SIGMA)
        hits = np.empty(len(batch.slots), dtype=np.int64)
        for k, slot in enumerate(batch.slots):
            gen, cp, base, tab = tables._tables[int(slot)]
            spec = table.jobs[slot].spec
            s = base + np.arange(len(tab))
            kw = {"sigma": SIGMA, "alpha": spec.alpha, "budget": spec.budget, "a": spec.prior[0], "b": spec.prior[1]}
            lam = DEFAULT_MIN_GAIN if spec.min_gain is None else spec.min_gain
            if spec.target_radius is not None:
                own = target_radius_decision(s, cp, target_radius=spec.target_radius, **kw)
            elif spec.proposal_radius is not None:
                own = proposal_decision(s, cp, proposal_radius=spec.proposal_radius, min_gain=lam, **kw)
            else:
                own = best_radius_decision(s, cp, min_gain=lam, **kw)
            assert np.array_equal(tab, own), (slot, spec.target_radius, spec.proposal_radius)
            seen.update(int(c) for c in tab)
            hits[k] = rng.integers(max(0, len(tab) - 8), len(tab))  # mostly hits: proposals get verified
        counts = np.zeros((len(batch.slots), K), dtype=np.int64)
        counts[:, 1], counts[:, 0] = hits, batch.sizes - hits
        due = table.at_checkpoint(table.land(batch, counts))
        direct = policy_decisions(table, due, SIGMA)
        looked, found = tables.lookup(table, due)
        assert found.all() and np.array_equal(looked, direct)
        stop = direct != int(Stop.CONTINUE)
        table.advance_checkpoint(due[~stop])
        table.settle(due[stop], direct[stop])
    assert {int(Stop.TARGET), int(Stop.CONTINUE)} <= seen
