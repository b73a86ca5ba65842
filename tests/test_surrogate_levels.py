"""The calibrated surrogate's answers (models.surrogate) and the bundle's calibration block (models.bundle):
the risk ladder, per-bin quantiles, refusal of malformed or old-style blocks. No ONNX: logits are given."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from models.bundle import Calibration
from models.surrogate import surrogate_answer, surrogate_answers
from smoothing import conformal_certificate, level_split, surrogate_log_odds


def _level(alpha, q_hat, edges=(4.0,)):
    delta, alpha_1 = level_split(alpha)
    return {"alpha": alpha, "delta": delta, "alpha_1": alpha_1, "knots": [0.0, 10.0], "values": [0.0, 3.0],
            "scale": [1.0, 0.5], "edges": list(edges), "q_hat": q_hat, "bin_sizes": [2000] * len(q_hat)}


def _calibration(**kw):
    block = {"samples_per_image": 10_000, "num_calibration": 4000, "num_tuning": 200,  # 2 bins of 2,000 per level
             "levels": [_level(0.1, [0.5, 0.2]), _level(0.01, [0.9, 0.4]), _level(0.001, [None, 0.8])]}
    return Calibration.model_validate({**block, **kw})


LOGITS = np.array([[8.0, 0.0, 0.0], [0.0, 2.0, 0.5], [0.0, 0.0, 30.0]])


@pytest.mark.parametrize("alpha, level", [(0.5, 0.1), (0.1, 0.1), (0.05, 0.01), (0.01, 0.01), (0.002, 0.001),
                                          (0.001, 0.001), (0.0005, None)])
def test_a_request_uses_the_largest_level_at_most_its_alpha(alpha, level):
    ans = surrogate_answers(LOGITS, _calibration(), 0.25, alpha)
    assert ans.level == level
    if level is None:
        assert ans.p_lower is None and not np.any(ans.radius)
        return
    lv = next(v for v in _calibration().levels if v.alpha == level)
    _, g = surrogate_log_odds(LOGITS)
    p_lower, radius = conformal_certificate(g, 0.25, **lv.as_arguments())
    np.testing.assert_array_equal(ans.radius, radius)
    np.testing.assert_array_equal(ans.p_lower, p_lower)


def test_a_bin_without_a_quantile_abstains_and_the_other_bin_certifies():
    """At level 0.001 the low-confidence bin (log-odds < 4) has no quantile: it abstains; the top bin certifies
    sigma * (z_hat - q * scale) with the map's values (rounded down)."""
    ans = surrogate_answers(LOGITS, _calibration(), 0.25, 0.001)
    cls, g = surrogate_log_odds(LOGITS)
    assert list(ans.class_index) == [0, 1, 2] and g[1] < 4.0 < g[0]
    assert ans.radius[1] == 0.0 and ans.p_lower[1] == 0.0
    z_hat_top = 3.0 * g[0] / 10.0
    scale_top = 1.0 - 0.5 * g[0] / 10.0
    assert ans.radius[0] == pytest.approx(0.25 * (z_hat_top - 0.8 * scale_top), rel=1e-9)
    assert ans.radius[0] <= 0.25 * (z_hat_top - 0.8 * scale_top)
    assert ans.radius[2] == pytest.approx(0.25 * (3.0 - 0.8 * 0.5))  # beyond the last knot: constant map


def test_one_answer_matches_the_batch_and_keeps_the_point_estimate_below_the_ladder():
    one = surrogate_answer(LOGITS[:1], _calibration(), 0.25, 0.0001)
    assert one.level is None and one.radius == 0.0 and one.p_lower is None
    g = 8.0 - math.log(2.0)  # log-odds of the top class: its logit minus logsumexp of the others
    assert one.z_hat == pytest.approx(3.0 * g / 10.0)  # the lowest level's point estimate, for the proposal


@pytest.mark.parametrize("change, message", [
    (dict(levels=[_level(0.01, [0.1, 0.2]), _level(0.1, [0.1, 0.2])]), "largest first"),
    (dict(levels=[{**_level(0.1, [0.1, 0.2]), "delta": 0.05}]), "must equal delta \\+ alpha_1"),
    (dict(levels=[{**_level(0.1, [0.1, 0.2]), "knots": [1.0, 0.0]}]), "strictly increasing"),
    (dict(levels=[{**_level(0.1, [0.1, 0.2]), "scale": [1.0, 0.0]}]), "every scale > 0"),
    (dict(levels=[_level(0.1, [0.1])]), "one entry per bin"),
    (dict(levels=[_level(0.1, [0.1, math.inf])]), "finite number or null"),
    (dict(guarantee="training-conditional"), "gamma is required"),
    (dict(q_hat=2.475, score_epsilon=0.03), "recalibrate the bundle with `certserve calibrate conformal`"),
])
def test_malformed_calibration_blocks_are_refused_with_what_is_wrong(change, message):
    with pytest.raises(ValidationError, match=message):
        _calibration(**change)


def test_log_odds_match_scipys_logsumexp_including_extreme_logits():
    """The hand-written log-sum-exp of smoothing.surrogate_log_odds (scipy's costs ~0.25 ms per request) against
    scipy.special.logsumexp on random and extreme logits (confident inputs whose 1 - p_hat rounds to 0, ties)."""
    from scipy.special import logsumexp

    rng = np.random.default_rng(7)
    logits = rng.normal(size=(500, 10)) * rng.uniform(0.1, 80.0, (500, 1))
    extreme = np.array([[700.0, -700.0, 0.0, 0.0], [1e-3, 1e-3, 0.0, 0.0], [-5.0, -5.0, -5.0, -5.0],
                        [300.0, 299.0, -300.0, 0.0]])
    for z in (logits, extreme):
        cls, g = surrogate_log_odds(z)
        rows = np.arange(len(z))
        others = z.copy()
        others[rows, cls] = -np.inf
        np.testing.assert_allclose(g, z[rows, cls] - logsumexp(others, axis=1), rtol=1e-12, atol=1e-12)


def test_served_answer_equals_the_checked_functions_bit_for_bit():
    """models.surrogate answers from the calibration's arrays with smoothing.conformal.validated_conformal_certificate
    (no per-request checks); on the embedded bundle's every level, at log-odds on and next to every knot and bin edge
    and far outside them, point estimate, p_lower and radius must equal piecewise + conformal_certificate bit for
    bit. Run once against a served path that put a log-odds equal to an edge in the lower bin (searchsorted
    side='left'): fails."""
    from models.bundle import load_bundle
    from smoothing.conformal import piecewise

    manifest = load_bundle().manifest
    for level in manifest.calibration.levels:
        marks = np.array([*level.knots, *level.edges, -50.0, 0.0, 50.0])
        g = np.concatenate([marks, np.nextafter(marks, -np.inf), np.nextafter(marks, np.inf),
                            np.random.default_rng(15).uniform(-5, 20, 500)])
        logits = np.stack([g, np.zeros_like(g)], axis=1)  # two classes: log-odds |g|, on the marks exactly
        cls, g = surrogate_log_odds(logits)
        ans = surrogate_answers(logits, manifest.calibration, manifest.sigma, level.alpha)
        p_lower, radius = conformal_certificate(g, manifest.sigma, **level.as_arguments())
        assert ans.level == level.alpha
        np.testing.assert_array_equal(ans.z_hat, piecewise(g, level.knots, level.values))
        np.testing.assert_array_equal(ans.p_lower, p_lower)
        np.testing.assert_array_equal(ans.radius, radius)
