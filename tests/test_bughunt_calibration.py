"""Bug hunt of the calibration's soundness (fit, levels, the bundle's calibration block, the conformal certificate).
Each test was run against the code before its fix and failed there."""

from __future__ import annotations

import math

import numpy as np
import pytest

import smoothing as sm
from calibration.config import PipelineConfig
from calibration.conformal_fit import fit_calibration, level_min_images
from calibration.pipeline import _checked_tune_size
from models.bundle import BundleError, ConformalLevel, load_bundle
from smoothing.conformal import level_split, training_conditional_min_size, validated_conformal_certificate
from tests import bundle_helpers
from tests.bundle_helpers import _read_manifest, _write_manifest

bundle_copy = bundle_helpers.bundle_copy  # the fixture

LEVEL = dict(knots=[0.0, 10.0], values=[0.5, 2.0], scale=[0.1, 0.1], edges=[5.0], q_hat=[1.0, 1.0])
G = [3.0, 7.0]


@pytest.mark.parametrize("change, pattern", [
    (dict(scale=[-0.1, -0.1]), "every scale must be a finite number > 0"),
    (dict(scale=[0.0, 0.1]), "every scale must be a finite number > 0"),
    (dict(scale=[math.nan, 0.1]), "every scale must be a finite number > 0"),
    (dict(values=[math.nan, 2.0]), "knots, values and bin edges must be finite"),
    (dict(knots=[0.0, math.nan]), "knots, values and bin edges must be finite"),
    (dict(edges=[math.nan]), "knots, values and bin edges must be finite"),
    (dict(q_hat=[1.0]), "q_hat must hold one quantile per bin"),
    (dict(q_hat=[1.0, 1.0, -100.0]), "q_hat must hold one quantile per bin"),
    (dict(q_hat=[[1.0, 1.0]]), "q_hat must hold one quantile per bin"),
    (dict(q_hat=[math.nan, 1.0]), "q_hat must hold one quantile per bin"),
    (dict(q_hat=[-math.inf, 1.0]), "q_hat must hold one quantile per bin"),
    (dict(g=[math.nan, 7.0]), "log-odds g must be numbers"),
], ids=["scale<0", "scale=0", "scale nan", "values nan", "knot nan", "edge nan", "q_hat short", "q_hat long",
        "q_hat 2-d", "q_hat nan", "q_hat -inf", "g nan"])
def test_conformal_certificate_refuses_a_calibration_it_cannot_answer_from(change, pattern):
    """smoothing.conformal_certificate is the checked entry point (validated_conformal_certificate assumes "scale
    (> 0)", "one q_hat per bin"; smoothing's public functions raise ValueError saying what was expected), but it
    checked only the order of knots and edges: a negative scale certified radius 0.2625 / 0.4125 where the level's
    positive scale gives 0.2125 / 0.3625 (the quantile's correction turned around), a NaN map or NaN log-odds
    returned p_lower NaN, a q_hat one short raised IndexError and one too long was silently cut. Run against the
    unfixed code: failed there (no ValueError for any case; IndexError for the short / 2-d q_hat)."""
    ok, g_ok = {**LEVEL, "q_hat": [math.inf, -0.5]}, np.array([-math.inf, 3.0, 5.0, 7.0, math.inf])
    p, r = sm.conformal_certificate(g_ok, 0.25, **ok)  # what fits and bundles give (+inf: abstain) still answers,
    p2, r2 = validated_conformal_certificate(g_ok, 0.25, **{k: np.asarray(v, float) for k, v in ok.items()})
    assert np.array_equal(p, p2) and np.array_equal(r, r2) and r[1] == 0.0 and np.all(r[2:] > 0)  # bit for bit
    args = {**LEVEL, **change}
    g = args.pop("g", G)
    with pytest.raises(ValueError, match=pattern):
        sm.conformal_certificate(g, 0.25, **args)


def test_a_calibration_block_without_the_surrogate_it_calibrates_is_refused(bundle_copy):
    """A manifest with a calibration block and no surrogate artifact loaded, and the server's model card (GET
    /v1/models) then stated alpha_cal 0.001 and five calibrated levels next to has_surrogate false, where its schema
    says alpha_cal is None without a surrogate. Run against the unfixed code: failed there (the bundle loaded)."""
    manifest = _read_manifest(bundle_copy)
    del manifest["artifacts"]["surrogate"]
    (bundle_copy / "surrogate.onnx").unlink()
    _write_manifest(bundle_copy, manifest)
    with pytest.raises(BundleError, match="'calibration' block needs the 'surrogate' artifact it calibrates"):
        load_bundle(bundle_copy, check_models=False)
    manifest.pop("calibration")  # without the block, the base-only bundle loads as before
    _write_manifest(bundle_copy, manifest)
    assert load_bundle(bundle_copy, check_models=False).manifest.calibration is None


def test_a_negative_bin_size_is_refused(bundle_copy):
    """bin_sizes are counts of calibration scores; a negative one (summing to num_calibration with an inflated
    other bin, which then passes the "too few scores: q_hat must be null" check) loaded. Run against the unfixed
    code: failed there (the bundle loaded)."""
    manifest = _read_manifest(bundle_copy)
    level = manifest["calibration"]["levels"][0]
    a, b = level["bin_sizes"]
    level["bin_sizes"] = [-5, a + b + 5]
    _write_manifest(bundle_copy, manifest)
    with pytest.raises(BundleError, match="greater than or equal to 0"):
        load_bundle(bundle_copy, check_models=False)


def _synthetic(rng, m, n=10000):
    g = rng.normal(4, 2, m)
    return g, rng.binomial(n, 1 / (1 + np.exp(-0.9 * g)))


def test_training_conditional_levels_get_only_bins_their_pac_rank_can_fill():
    """With --gamma the fit chose a level's number of bins by the marginal minimum (1,167 scores per bin at level
    0.001), but its quantile takes the larger PAC rank, which needs 2,686 scores at gamma 0.1: 3,000 calibration
    images gave two bins of ~1,500, both null, so level 0.001 was kept in the ladder (alpha_cal, calibrated_levels)
    and abstained on every input, where one bin certifies; and 2,000 images kept it too (conformal_fit: levels too
    small for even one bin are left out). Run against the unfixed code: failed there (q_hat [None, None])."""
    rng = np.random.default_rng(3501)
    n = 10000
    g_t, h_t = _synthetic(rng, 1000)
    g_c, h_c = _synthetic(rng, 3000)
    block = fit_calibration(g_t, h_t, g_c, h_c, n, levels=(0.01, 0.001), max_bins=2, gamma=0.1)
    by_alpha = {lv["alpha"]: lv for lv in block["levels"]}
    assert by_alpha[0.001]["bin_sizes"] == [3000] and by_alpha[0.001]["q_hat"][0] is not None
    assert all(q is not None for q in by_alpha[0.01]["q_hat"]) and len(by_alpha[0.01]["q_hat"]) == 2
    ConformalLevel(**by_alpha[0.001])  # the bundle's schema takes it
    block = fit_calibration(g_t, h_t, g_c[:2000], h_c[:2000], n, levels=(0.01, 0.001), max_bins=2, gamma=0.1)
    assert [lv["alpha"] for lv in block["levels"]] == [0.01]
    marginal = fit_calibration(g_t, h_t, g_c, h_c, n, levels=(0.001,), max_bins=2)  # without gamma: unchanged
    assert len(marginal["levels"][0]["q_hat"]) == 2 and None not in marginal["levels"][0]["q_hat"]
    for delta, gamma in [(0.09, 0.1), (0.0009, 0.1), (0.0009, 0.01), (0.0045, 0.5), (0.009, 0.9), (0.45, 0.05)]:
        m = training_conditional_min_size(delta, gamma)  # the rule: where the PAC rank becomes finite
        assert sm.training_conditional_rank(m, delta, gamma) <= m
        assert m == 1 or sm.training_conditional_rank(m - 1, delta, gamma) == m
    assert level_min_images(0.001, gamma=0.1) == math.ceil(1.05 * training_conditional_min_size(
        level_split(0.001)[0], 0.1)) == 2686

def test_calibrate_all_checks_the_pac_minimum_before_any_work(tmp_path):
    """calibrate all --gamma checked the largest level against the marginal minimum (1,167 images at level 0.001)
    before any work, not the PAC one the fit now applies (2,686 at gamma 0.1): with 4,000 images, 1,600 of them
    tuning, the check passed, and the build trained, counted and fitted a level 0.001 that abstained everywhere
    (after the fit's fix, it would fail in the fit after all that work). Run against the unfixed code: failed there
    (no ValueError)."""
    cfg = PipelineConfig(out=str(tmp_path / "out"), levels=(0.001,), gamma=0.1, calibration_size=8000, limit=4000)
    with pytest.raises(ValueError, match="needs at least 2686 calibration images"):
        _checked_tune_size(cfg)  # 4,000 - 1,600 tuning = 2,400 < 2,686
    ok = PipelineConfig(out=str(tmp_path / "out"), levels=(0.001,), gamma=0.1, calibration_size=8000, limit=5000)
    assert _checked_tune_size(ok) == 1600
    marginal = PipelineConfig(out=str(tmp_path / "out"), levels=(0.001,), calibration_size=8000, limit=4000)
    assert _checked_tune_size(marginal) == 1600  # without gamma: the marginal minimum, as before
