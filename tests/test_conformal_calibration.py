"""The surrogate's conformal calibration (smoothing.conformal, calibration.conformal_fit), by seeded simulation.

* A perfect surrogate (z_hat = Phi^-1(pA), pA in [0.99, 0.999]) with few Monte-Carlo samples per label: end-to-end
  validity, the score-level coverage (two-sided: catches a wrong rank) and the labels' own coverage (catches a label
  that is not a lower bound).
* Mondrian bins: the guarantee holds in each bin, including a bin where the surrogate is badly overconfident.
* The training-conditional (PAC) rank bounds the probability, over calibration draws, of a realised miss rate > delta.
* The fitting code: tuning and calibration parts stay separate; levels and bins sized as documented.
* The real fit served through the real surrogate path: every level's miss rate, and the fit's own score's
  coverage, two-sided (catches a wrong sign, scale, label level or delta / alpha_1 split in the fit).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import ndtr, ndtri

import smoothing as sm
from calibration.conformal_fit import fit_calibration

IDENTITY = dict(knots=[-10.0, 10.0], values=[-10.0, 10.0], scale=[1.0, 1.0])


def _calibrate(z_hat, z_label, g, edges, delta, **kw):
    """Per-bin quantiles of scores z_hat - z_label with the bins of g (one row of a simulation)."""
    bins = sm.bin_index(g, edges)
    return sm.mondrian_quantiles(z_hat - z_label, bins, len(edges) + 1, delta, **kw)


def test_perfect_surrogate_end_to_end(size, sim, record_rate):
    """Perfect surrogate, n = 50 Monte-Carlo samples per label, m = 200, delta = alpha_1 = 0.05. Checks, over
    fresh calibration draws: (1) P(deployed radius > true radius) <= delta + alpha_1; (2) the score coverage
    P(s_test > q) in [delta - 1/(m+1), delta] (+-3 SE) with the test inputs' own labels; (3) P(label > pA) <= alpha_1.
    Run against two bugs once (2026-12-04, fast size): the rank one too low (ceil(m (1 - delta)) - 1) broke (2): 0.0587
    > 0.05 + 3 SE; labels at the point estimate k/n instead of the Clopper-Pearson lower bound broke (3): 0.766 > 0.05.
    Check (1) alone passed both bugs (with a perfect surrogate a miss needs q < 0), which is why (2) and (3) are here."""
    rng = np.random.default_rng(900)
    reps, m, n_test, n, delta, alpha_1, sigma = size.reps, 200, 50, 50, 0.05, 0.05, 0.25
    p_a = rng.uniform(0.99, 0.999, (reps, m))
    z_label = sm.probit_labels(rng.binomial(n, p_a), n, alpha_1)
    q = np.array([_calibrate(ndtri(pa), zl, pa, [], delta)[0] for pa, zl in zip(p_a, z_label)])
    t_pa = rng.uniform(0.99, 0.999, (reps, n_test))
    radius = np.stack([sm.conformal_certificate(ndtri(row), sigma, **IDENTITY, edges=[], q_hat=[qi])[1]
                       for row, qi in zip(t_pa, q)])
    miss = (radius > sigma * ndtri(t_pa)).mean(axis=1)
    bound = delta + alpha_1
    record_rate(float(miss.mean()), bound, reps, "perfect surrogate, deployed radius above the truth")
    sim.assert_rate_at_most(float(miss.mean()), bound, reps, "perfect surrogate")
    t_label = sm.probit_labels(rng.binomial(n, t_pa), n, alpha_1)
    over = ((ndtri(t_pa) - t_label) > q[:, None]).mean(axis=1)
    o_mean, o_se = float(over.mean()), float(over.std(ddof=1) / math.sqrt(reps))
    assert delta - 1 / (m + 1) - 3 * o_se <= o_mean <= delta + 3 * o_se, (o_mean, delta, m)
    label_over = float(np.mean(t_label > ndtri(t_pa)))
    sim.assert_rate_at_most(label_over, alpha_1, reps * n_test, "labels above the truth")
    assert np.mean(radius > 0) > 0.5, "the calibrated perfect surrogate must certify most inputs"


def _population(rng, shape):
    """Two groups by the sign of the log-odds g: g >= 0 accurate, g < 0 (about 16%) overconfident by +0.8 probit."""
    g = rng.normal(1.5, 1.5, shape)
    z_true = np.clip(1.5 + 0.8 * g + 0.3 * rng.standard_normal(shape), -1.0, 3.5)
    z_hat = z_true + np.where(g < 0, 0.8 + 0.6 * rng.standard_normal(shape), 0.1 * rng.standard_normal(shape))
    return g, z_true, z_hat


def test_mondrian_bins_hold_in_each_bin(size, sim, record_rate):
    """Two bins (edge g = 0), the surrogate overconfident in the lower one: P(radius > truth | bin) <= delta +
    alpha_1 in each bin (labels from n = 1,000 samples). Run against the bug once (2026-12-04, fast size): one quantile
    for all inputs (every input in bin 0) gave a miss rate of 0.255 in the overconfident bin > 0.1 + 3 SE (0.128);
    with the bins it is 0.032."""
    rng = np.random.default_rng(901)
    reps, m, n_test, n, delta, alpha_1, sigma = size.reps // 2, 300, 60, 1000, 0.05, 0.05, 0.25
    edges = [0.0]
    g, z_true, z_hat = _population(rng, (reps, m))
    z_label = sm.probit_labels(rng.binomial(n, ndtr(z_true)), n, alpha_1)
    q = np.stack([_calibrate(zh, zl, gg, edges, delta) for zh, zl, gg in zip(z_hat, z_label, g)])
    tg, tz, tzh = _population(rng, (reps, n_test))
    radius = _deploy(tg, tzh, q, edges, sigma)
    miss = radius > sigma * np.maximum(tz, 0)
    for name, in_bin in (("g < 0 (overconfident)", tg < 0), ("g >= 0", tg >= 0)):
        rate = float(miss[in_bin].mean())
        record_rate(rate, delta + alpha_1, int(in_bin.sum()), f"Mondrian bin {name}")
        sim.assert_rate_at_most(rate, delta + alpha_1, reps, f"bin {name}")


def _deploy(g, z_hat, q, edges, sigma):
    """Radius of each test input: z_hat - q[bin(g)] (the bins are on g, the point estimate is z_hat)."""
    bins = sm.bin_index(g, edges)
    z_lower = z_hat - np.take_along_axis(q, bins, axis=1)
    return np.where(z_lower > 0, sigma * z_lower, 0.0)


def test_training_conditional_rank_bounds_the_realised_miss_rate(size):
    """Over calibration draws of m = 500 uniform scores, the realised miss rate 1 - q of the PAC quantile exceeds
    delta = 0.05 in at most gamma = 0.1 of draws (+3 SE); the marginal rank exceeds it in far more (about half).
    Run against the bug once (2026-12-04, fast size): the marginal rank in place of the PAC one gave 0.4625 > 0.1."""
    rng = np.random.default_rng(902)
    reps, m, delta, gamma = size.reps, 500, 0.05, 0.1
    scores = rng.random((reps, m))
    pac = np.array([sm.conformal_quantile(row, delta, gamma=gamma) for row in scores])
    marginal = np.array([sm.conformal_quantile(row, delta) for row in scores])
    over_pac, over_marginal = float(np.mean(1 - pac > delta)), float(np.mean(1 - marginal > delta))
    assert over_pac <= gamma + 3 * math.sqrt(gamma * (1 - gamma) / reps), over_pac
    assert over_marginal > 0.3, over_marginal
    assert sm.training_conditional_rank(20, 0.05, 0.1) == 21  # too few scores: no finite quantile


@pytest.mark.parametrize("m, delta, rank, gamma", [(19, 0.3, 18, 0.010421847026626876),
                                                   (50, 0.05, 49, 0.2794317523206957), (5, 0.3, 5, 0.16807)])
def test_training_conditional_rank_is_conservative_at_a_float_tie(m, delta, rank, gamma):
    """gamma just below the exact tail P(Beta(rank, m + 1 - rank) < 1 - delta) (the largest double below it, found
    by a search against mpmath at 80 digits; at (5, 0.3) the tail is (1 - 0.3)^5 with 0.3 the binary float, a hair
    above 0.16807), where scipy's double-precision tail rounds to <= gamma: ``rank`` does NOT qualify, the PAC rank
    is the next one. Run against the old comparison of scipy's tail alone (2026-12-07): it returned ``rank``, one
    rank too low; this test failed."""
    import mpmath
    from scipy.stats import beta as beta_dist

    with mpmath.workdps(80):
        exact = mpmath.betainc(rank, m + 1 - rank, 0, 1 - mpmath.mpf(delta), regularized=True)
        assert exact > mpmath.mpf(gamma)  # the premise: the true tail is above gamma ...
    assert beta_dist.cdf(1 - delta, rank, m + 1 - rank) <= gamma  # ... and double precision says it is not
    assert sm.training_conditional_rank(m, delta, gamma) == rank + 1
    assert sm.training_conditional_rank(m, delta, float(np.nextafter(float(exact), 1.0))) == rank  # clear: qualifies


def test_the_pac_minimum_size_follows_the_ranks_rule_at_a_float_tie():
    """smoothing.conformal.training_conditional_min_size sizes a level's bins (calibration.conformal_fit); it must
    agree with training_conditional_rank, which needs 6 scores at delta = 0.3, gamma = 0.16807 (a hair below
    (1 - 0.3)^5: 5 scores give no finite quantile). Run against the min size's own double-precision comparison
    (2026-12-07): it returned 5, a bin size whose quantile is +inf; this test failed."""
    from smoothing.conformal import training_conditional_min_size

    assert sm.training_conditional_rank(5, 0.3, 0.16807) == 6
    assert training_conditional_min_size(0.3, 0.16807) == 6


@pytest.mark.parametrize("gamma", [0.1, 0.45, 0.5, 0.9, 0.99])
def test_training_conditional_quantile_keeps_the_marginal_guarantee(gamma):
    """With ``gamma`` the certificate still states the marginal guarantee, so the quantile's rank k must give an
    exact marginal miss rate (m + 1 - k) / (m + 1) <= delta for every m (distinct scores 1..m: the k-th smallest
    is k) as well as the PAC property. Run against the PAC rank alone (before 2026-12-05): m = 18, delta = 0.09,
    gamma = 0.9 gave rank 16, miss rate 3/19 = 0.158 > 0.09; this test failed."""
    for delta in (0.09, 0.05, 0.009):
        for m in range(1, 600, 7):
            q = sm.conformal_quantile(np.arange(1.0, m + 1.0), delta, gamma=gamma)
            k = m + 1 if math.isinf(q) else int(q)
            assert (m + 1 - k) / (m + 1) <= delta, (m, delta, gamma, k)
            assert k >= min(sm.training_conditional_rank(m, delta, gamma), m + 1)


def _served_population(rng, size):
    """(surrogate logits (N, 2), true probit z of its class): log-odds g >= 0 of class 0; z = 0.5 + 0.5 g plus
    noise that grows for confident inputs, and 5% of inputs where the surrogate is badly overconfident (z - 1.5)."""
    g = np.abs(rng.normal(3.0, 2.5, size))
    noise = rng.standard_normal(size) * (0.2 + 0.3 * (g > 4))
    z = np.clip(0.5 + 0.5 * g + noise - 1.5 * (rng.random(size) < 0.05), -2.0, 3.6)
    return np.stack([g, np.zeros(size)], axis=1), z


def test_fitted_calibration_served_end_to_end_keeps_every_level(record_rate):
    """The real fit (calibration.conformal_fit.fit_calibration on Monte-Carlo labels: n = 1,000 binomial samples per
    image) and the real served path (models.bundle.Calibration -> models.surrogate.surrogate_answers) on a synthetic
    population with heteroscedastic and overconfident errors, over 30 calibration draws and 3,000 fresh inputs each:
    (1) P(served radius > the true radius sigma Phi^-1(pA)) <= each level (+3 SE over the draws); (2) the served
    lower bound's coverage of the fresh inputs' own Monte-Carlo labels (as the fit makes them, at alpha_1), which
    conformal pins to [delta - 1/(m_b + 1), delta] (+-3 SE): a two-sided check on the fit's own score.
    The other tests here build their scores by hand; this one guards the fit's score (label level, sign, scale,
    the delta / alpha_1 split) and its agreement with the served path. Run once against each of these bugs in the fit
    (2026-12-05); it failed on each: score sign flipped (miss rate 0.044 at level 0.01), score times the scale instead
    of divided by it (0.158 at level 0.1), calibration labels at level 0.5 instead of alpha_1, labels at 5 alpha_1,
    the quantile at alpha instead of delta (those three through (2))."""
    from calibration.conformal_fit import fit_calibration
    from models.bundle import Calibration
    from models.surrogate import surrogate_answers

    rng = np.random.default_rng(907)
    reps, n, sigma, levels = 30, 1000, 0.25, (0.1, 0.05, 0.01)
    miss = {alpha: [] for alpha in levels}
    label_miss = {alpha: [] for alpha in levels}
    smallest_bin = {alpha: 10**9 for alpha in levels}
    for _ in range(reps):
        (logits_t, z_t), (logits_c, z_c) = _served_population(rng, 600), _served_population(rng, 2500)
        block = fit_calibration(logits_t[:, 0], rng.binomial(n, ndtr(z_t)), logits_c[:, 0],
                                rng.binomial(n, ndtr(z_c)), n, levels=levels, max_bins=4)
        calibration = Calibration.model_validate(block)
        logits, z = _served_population(rng, 3000)
        hits = rng.binomial(n, ndtr(z))
        for alpha, fitted in zip(levels, block["levels"]):
            answer = surrogate_answers(logits, calibration, sigma, alpha)
            assert answer.level == alpha == fitted["alpha"] and np.all(answer.class_index == 0)
            miss[alpha].append(float(np.mean((answer.radius > 0) & (answer.radius > sigma * z))))
            z_label = sm.probit_labels(hits, n, sm.level_split(alpha)[1])
            label_miss[alpha].append(float(np.mean(ndtri(answer.p_lower) > z_label)))
            smallest_bin[alpha] = min(smallest_bin[alpha], *fitted["bin_sizes"])
    for alpha in levels:
        delta = sm.level_split(alpha)[0]
        rate, se = float(np.mean(miss[alpha])), float(np.std(miss[alpha], ddof=1) / math.sqrt(reps))
        record_rate(rate, alpha, reps * 3000, f"level {alpha}")
        assert rate <= alpha + 3 * se, (alpha, rate, se)
        cover, se = float(np.mean(label_miss[alpha])), float(np.std(label_miss[alpha], ddof=1) / math.sqrt(reps))
        record_rate(cover, delta, reps * 3000, f"scores, level {alpha}")
        assert delta - 1 / (smallest_bin[alpha] + 1) - 3 * se <= cover <= delta + 3 * se, (alpha, cover, se)


def test_fit_keeps_tuning_and_calibration_apart():
    """Maps and bin edges depend on the tuning part only; the calibration part (its inputs and labels) moves only
    the quantiles. Levels whose calibration part is too small are left out; each bin keeps >= the minimum calibration
    size. Run against bin edges fitted on the calibration log-odds (2026-12-05): failed once the second fit drew new
    calibration inputs, not only new labels (with new labels alone it had passed)."""
    rng = np.random.default_rng(903)
    n = 10_000
    g_t, g_c = rng.normal(6, 3, 1000), rng.normal(6, 3, 2500)
    p_t, p_c = (ndtr(np.clip(0.4 * g, -1, 4)) for g in (g_t, g_c))
    h_t, h_c = rng.binomial(n, p_t), rng.binomial(n, p_c)
    block = fit_calibration(g_t, h_t, g_c, h_c, n, levels=(0.1, 0.01, 0.001), max_bins=8)
    alphas = [lv["alpha"] for lv in block["levels"]]
    assert alphas == [0.1, 0.01, 0.001]
    g_c2 = rng.normal(6, 3, 2500)
    other = fit_calibration(g_t, h_t, g_c2, rng.binomial(n, ndtr(np.clip(0.4 * g_c2, -1, 4))), n,
                            levels=(0.1, 0.01, 0.001), max_bins=8)
    for a, b in zip(block["levels"], other["levels"]):
        assert a["knots"] == b["knots"] and a["values"] == b["values"] and a["edges"] == b["edges"]
        assert a["scale"] == b["scale"]
    for lv in block["levels"]:
        need = sm.min_calibration_size(lv["delta"])
        assert len(lv["q_hat"]) == len(lv["edges"]) + 1 <= 8
        assert sum(lv["bin_sizes"]) == 2500
        assert all(q is not None for q, s in zip(lv["q_hat"], lv["bin_sizes"]) if s >= need)
        assert np.all(np.diff(lv["values"]) >= 0) and min(lv["scale"]) > 0
    assert len(block["levels"][-1]["q_hat"]) == 2  # 2500 // ceil(1.05 * 1111) bins at 0.001
    small = fit_calibration(g_t, h_t, g_c[:500], h_c[:500], n, levels=(0.1, 0.001))
    assert [lv["alpha"] for lv in small["levels"]] == [0.1]
    with pytest.raises(ValueError, match="too few for any level"):
        fit_calibration(g_t, h_t, g_c[:50], h_c[:50], n, levels=(0.001,))
