"""Review of the planned fixed-n route and the per-input priors: extreme and broken priors give a valid plan and a
certificate (KT where the meta output is no Beta prior), never a 500 or a planned n of 0; the plan of a very strong
prior is that of its point mass; and a seeded simulation of the clock-cut fixed-n route at alpha = 0.05."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from models.priors import class_and_prior
from smoothing import KT_PRIOR, clopper_pearson_lower, planned_sample_size, radius_from_probability
from smoothing.fixed import _candidates

SIGMA, ALPHA, BUDGET, LAM = 0.25, 0.01, 10_000, 8e-5


class _Stub:
    """A backend whose forward returns fixed rows (a clean-pass model or a meta-learner)."""

    def __init__(self, row):
        self.row = np.asarray(row, dtype=np.float32)

    def forward(self, x):
        return np.tile(self.row, (len(x), 1))


class _Rows:
    """A meta-learner that returns one given (a, b) per image, as float64 (an ONNX model may output doubles)."""

    def __init__(self, rows):
        self.rows = np.asarray(rows, dtype=np.float64)

    def forward(self, feats):
        assert len(feats) == len(self.rows)
        return self.rows


def test_meta_output_that_is_no_beta_prior_falls_back_to_kt():
    """NaN (from NaN features), 0 (float32 underflow), inf, negative and subnormal (1 / a overflows) rows get KT;
    usable rows, however extreme, are kept as they are. Before the fix the rows went to the engine unchanged: its
    spec check refused them and the request was a 500 (mode=fixed and sequential alike)."""
    rows = [(np.nan, 1.0), (0.0, 1.0), (np.inf, 2.0), (-1.0, 3.0), (1e-320, 1e-320), (2.0, 1e-310),
            (1e-4, 2000.0), (3.0, 1e-30)]
    base = _Stub(np.arange(10.0))
    tested, prior = class_and_prior(base, None, _Rows(rows), np.zeros((len(rows), 1, 4, 4), np.float32))
    assert tested.tolist() == [9] * len(rows)
    assert prior.dtype == np.float64 and prior.shape == (len(rows), 2)
    np.testing.assert_array_equal(prior[:6], np.tile(KT_PRIOR, (6, 1)))
    np.testing.assert_array_equal(prior[6:], np.asarray(rows[6:]))


def _point_mass_plan(p: float, *, sigma=SIGMA, alpha=ALPHA, budget=BUDGET, lam=LAM) -> int:
    """The planned n for a prior that is a point mass at p (S_n ~ Binomial(n, p)), written from the definition:
    argmax over the same candidates of E[r_CP(S_n, n)] - lam n (first maximum)."""
    best, choice = -np.inf, 0
    for n in _candidates(budget):
        k = np.arange(n + 1)
        radius = np.asarray(radius_from_probability(clopper_pearson_lower(k, n, alpha), sigma))
        gain = float(binom.pmf(k, n, p) @ radius) - lam * n
        if gain > best:
            best, choice = gain, n
    return choice


@pytest.mark.parametrize("p", [0.75, 0.9, 0.99, 0.999])
def test_plan_of_a_very_strong_prior_is_its_point_mass_plan(p):
    """Beta(p K, (1 - p) K) with K = 1e30 is a point mass at p. Before the fix the beta-binomial predictive cancelled
    catastrophically (expected radii of 3 to 856 and inf, beyond the all-hits radius ~0.6) and every such prior got
    n = 64 whatever p (the point-mass plans are 283 to 817)."""
    expected = _point_mass_plan(p)
    assert expected > 64
    for strength in (1e20, 1e30, 1e300):
        assert planned_sample_size(p * strength, (1 - p) * strength, sigma=SIGMA, alpha=ALPHA, budget=BUDGET,
                                   min_gain=LAM, kt_weight=0.0) == expected


@pytest.mark.parametrize("a,b", [(1e-320, 1e-320), (1.0, 1e-320), (1e-320, 1.0), (1e308, 1e308), (1e-300, 1e300),
                                 (1e300, 1e-300), (5e-324, 5e-324)])
@pytest.mark.parametrize("kt_weight", [0.0, 0.1])
def test_every_finite_positive_prior_gets_a_candidate_sample_size(a, b, kt_weight):
    """Any prior the argument check accepts gets an n among the candidates, in [64, budget]. Before the fix a
    subnormal parameter made every expected radius NaN and the plan returned n = 0, which the engine refuses (a 500
    on mode=fixed); and with no finite objective its pruning never fired (all candidates up to the budget)."""
    n = planned_sample_size(a, b, sigma=SIGMA, alpha=ALPHA, budget=BUDGET, kt_weight=kt_weight)
    assert n in _candidates(BUDGET)
    vec = planned_sample_size(np.array([a, 2.0]), np.array([b, 3.0]), sigma=SIGMA, alpha=ALPHA, budget=BUDGET,
                              kt_weight=kt_weight)
    assert vec.tolist() == [n, planned_sample_size(2.0, 3.0, sigma=SIGMA, alpha=ALPHA, budget=BUDGET,
                                                   kt_weight=kt_weight)]


def test_broken_meta_prior_still_gets_a_certificate_from_the_service():
    """End to end: a meta-learner answering NaN (e.g. for NaN features) no longer makes mode=fixed or sequential a
    500; the job runs with the KT prior and its certificate is an ordinary one."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    with TestClient(create_app(Settings(max_samples=200), seed=0), raise_server_exceptions=False) as client:
        client.app.state.service.meta = _Stub([np.nan, np.nan])
        image = np.full((1, 28, 28), 0.5, np.float32).tolist()
        for mode in ("fixed", "sequential"):
            r = client.post("/certify", json={"image": image, "mode": mode, "alpha": 0.01, "max_samples": 200})
            assert r.status_code == 200, (mode, r.text)
            body = r.json()
            assert body["method"] == mode and 0 < body["samples"] <= 200


def test_clock_cut_planned_fixed_n_covers_at_alpha():
    """Seeded simulation of the fixed route at a measurable alpha (0.05): n planned from priors right, wrong and
    extreme (a function of the 'clean input' only), cut at N' = min(n, a clock draw independent of the hits), CP bound
    at the N' counted samples. P(p_lower > pA) must stay <= alpha (+3 SE) for every pA."""
    rng = np.random.default_rng(20240605)
    alpha, runs = 0.05, 4000
    priors = [(0.5, 0.5), (29.0, 0.01), (0.01, 29.0), (1e-4, 2000.0), (1e30, 1e28)]
    plans = planned_sample_size(np.array([a for a, _ in priors]), np.array([b for _, b in priors]), sigma=SIGMA,
                                alpha=alpha, budget=2000)
    assert all(64 <= n <= 2000 for n in plans)
    limit = alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)
    for p_a in (0.55, 0.8, 0.95, 0.995):
        n = rng.choice(plans, size=runs)
        cut = np.minimum(n, rng.integers(1, 2500, size=runs))  # the clock: independent of the outcomes
        hits = rng.binomial(cut, p_a)
        rate = float(np.mean(clopper_pearson_lower(hits, cut, alpha) > p_a))
        assert rate <= limit, (p_a, rate, limit)
