"""Mutation audit, round 5: the surrogate's conformal calibration (labels, Mondrian quantiles, the training-conditional
rank, the rounding of the bound), how the calibration labels are built (Monte-Carlo counts, their noise and their
alignment with the images, the pipeline's wiring) and the fixed-n Clopper-Pearson bounds.

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. Deterministic: no test draws unseeded noise;
the counts and the pipeline run on stand-in models (a stand-in sampling engine, the shipped bundle's ONNX files), so
what is checked is which images, classes, seeds and ranks the code uses, not a simulated rate.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from scipy.special import ndtr, ndtri
from scipy.stats import binom

import smoothing as sm
from smoothing.conformal import piecewise
from calibration.conformal_fit import calibrate_surrogate, fit_calibration, tuning_cut, tuning_positions
from calibration.counts import compute_counts, load_counts
from models.bundle import Calibration


# ------------------------------------------------------------------------------------------- conformal labels
@pytest.mark.parametrize("alpha_1", [0.01, 0.001, 1e-4])
def test_a_calibration_label_is_the_clopper_pearson_lower_bound_at_alpha_1(alpha_1):
    """A label l = Phi(z_i) must satisfy P(Bin(n, l) >= k_i) <= alpha_1 (the one-sided Clopper-Pearson lower bound at
    alpha_1: P(l > pA) <= alpha_1 per image), checked against scipy's binomial tail, not against smoothing's own CP.
    Bug guarded against (run against it, this test failed): smoothing.conformal.probit_labels bounding at 10 alpha_1
    (a label bound at the wrong level; the guarantee becomes delta + 10 alpha_1). The end-to-end fit test of
    tests/test_conformal_calibration.py builds its reference labels with probit_labels itself, so the bug moved
    both sides and it passed; the perfect-surrogate test's labels (n = 50, pA >= 0.99) mostly sit at k = n where
    a label 10x too loose is still below pA."""
    n = 10_000
    k = np.array([5200, 6000, 8000, 9500, 9990, 10_000])
    z = sm.probit_labels(k, n, alpha_1)
    assert np.all(z > 0)
    tail = binom.sf(k - 1, n, ndtr(z))  # P(Bin(n, l) >= k)
    assert np.all(tail <= alpha_1 * (1 + 1e-6)), (tail, alpha_1)
    assert np.all(tail >= alpha_1 * 0.5), (tail, alpha_1)  # and it is that bound, not a far looser one


# --------------------------------------------------------------------------------------------- Mondrian bins
def test_a_bin_with_no_calibration_score_abstains():
    """A bin that holds no calibration score (edges are tuning quantiles, so a calibration split can leave one empty)
    has no quantile: +inf in mondrian_quantiles, null in the fitted block (the bin abstains), and the block loads.
    Bug guarded against (run against it, this test failed): mondrian_quantiles giving an empty bin the quantile 0.0
    (z_lower = z_hat: the bare point estimate certified with no calibration at all; models.bundle would refuse
    the fitted block only at the end of a build). No earlier test has an empty bin."""
    q = sm.mondrian_quantiles([0.3, 0.1, 0.2] * 20, [0, 0, 2] * 20, 3, 0.09)
    assert math.isinf(q[1]) and np.all(np.isfinite(q[[0, 2]]))
    rng = np.random.default_rng(510)
    n = 10_000
    g_tune = np.linspace(0.0, 10.0, 400)  # edges at 2.5, 5, 7.5
    g_cal = rng.uniform(0.0, 2.4, 400)  # every calibration score in bin 0
    hits = lambda g: rng.binomial(n, ndtr(np.clip(0.3 * g, 0, 3)))  # noqa: E731
    block = fit_calibration(g_tune, hits(g_tune), g_cal, hits(g_cal), n, levels=(0.1,), max_bins=4)
    (level,) = block["levels"]
    assert level["edges"] == [2.5, 5.0, 7.5] and level["bin_sizes"] == [400, 0, 0, 0]
    assert level["q_hat"][0] is not None and level["q_hat"][1:] == [None, None, None]
    ans = Calibration.model_validate(block).levels[0]
    _, radius = sm.conformal_certificate(np.array([6.0]), 0.25, **ans.as_arguments())
    assert radius[0] == 0.0


def test_the_rounding_allowance_lowers_the_bound_for_a_negative_quantile():
    """z_lower = h(g) - q v(g) is lowered by LOWER_ROUNDING x (max |h| + |q| max v), so it is never above the exact
    value, also where q < 0 (a surrogate that underestimates: the bound is above the point estimate). Bug guarded
    against (run against it, this test failed): the allowance with q in place of |q|, which for q = -0.5 and h <= 0.1
    is negative and raised z_lower ~4e-13 above its exact value 0.6. The cancellation test of round 2 has q > 0."""
    cal = dict(knots=[0.0, 1.0], values=[0.0, 0.1], scale=[1.0, 1.0], edges=[], q_hat=[-0.5])
    z = sm.conformal_lower(np.array([1.0]), **cal)[0]
    exact = Fraction(0.1) - Fraction(-0.5) * Fraction(1.0)
    assert Fraction(float(z)) <= exact, (z, float(exact))


def test_a_training_conditional_fit_uses_the_pac_rank_in_every_bin():
    """With gamma the fitted block states the training-conditional guarantee, so each bin's quantile must be the
    k-th smallest of its scores with k = max(marginal rank, PAC rank). Bug guarded against (run against it, this
    test failed): calibration.conformal_fit.fit_level dropping gamma when it calls mondrian_quantiles (the block says
    "training-conditional" and carries gamma, its quantiles are the marginal ones). The PAC tests of
    tests/test_conformal_calibration.py call conformal_quantile directly, never the fit."""
    rng = np.random.default_rng(511)
    n, gamma = 10_000, 0.05
    g_t, g_c = rng.normal(5, 2, 600), rng.normal(5, 2, 1500)
    h_t, h_c = (rng.binomial(n, ndtr(np.clip(0.35 * g + 0.2 * rng.standard_normal(len(g)), 0, 3))) for g in (g_t, g_c))
    block = fit_calibration(g_t, h_t, g_c, h_c, n, levels=(0.1,), max_bins=2, gamma=gamma)
    assert block["guarantee"] == "training-conditional" and block["gamma"] == gamma
    (lv,) = block["levels"]
    scores = ((piecewise(g_c, lv["knots"], lv["values"]) - sm.probit_labels(h_c, n, lv["alpha_1"]))
              / piecewise(g_c, lv["knots"], lv["scale"]))
    bins = sm.bin_index(g_c, lv["edges"])
    assert len(lv["q_hat"]) == 2
    for b, q in enumerate(lv["q_hat"]):
        s = np.sort(scores[bins == b])
        k = max(sm.conformal_rank(len(s), lv["delta"]), sm.training_conditional_rank(len(s), lv["delta"], gamma))
        assert k > sm.conformal_rank(len(s), lv["delta"])  # the PAC rank is the larger one here
        assert q == s[k - 1], (b, q, s[k - 1])


class _Surrogate:
    """Stand-in surrogate: ``forward`` returns fixed logits (N, 3) for the N images (the images are their indices)."""

    def __init__(self, logits):
        self.logits = np.asarray(logits, np.float64)

    def forward(self, images):
        return self.logits[np.asarray(images, dtype=np.int64).ravel()]


def test_the_labels_count_the_surrogates_class_not_the_base_models_top_class():
    """The calibration label of an image is the Monte-Carlo count of the class the surrogate's clean forward pass
    picks (the class the served certificate names), whatever the base model's top class is. Bug guarded against (run
    against it, this test failed): calibrate_surrogate reading each row's largest count (the base model's top class),
    which labels images where the surrogate picks another class with a count of a class it never certifies. The
    earlier fit tests give fit_calibration the hits directly, and the surrogates of the split tests pick the top
    class."""
    rng = np.random.default_rng(512)
    n, num = 1000, 1200
    g = rng.uniform(1.0, 6.0, num)
    logits = np.stack([g, np.zeros(num), np.full(num, -1.0)], axis=1)  # the surrogate picks class 0 everywhere
    c0 = rng.binomial(n, 0.3, num)  # ... but the base model's top class is class 1 on every image
    counts = np.stack([c0, n - c0, np.zeros(num, np.int64)], axis=1)
    images = np.arange(num)
    cut = tuning_cut(3)
    block = calibrate_surrogate(_Surrogate(logits), images, counts, n, tune_size=400, cut=cut, levels=(0.1,))
    tune = tuning_positions(num, 400, {"tuning_cut": cut})
    cal = np.setdiff1d(images, tune)
    _, g_sur = sm.surrogate_log_odds(logits)
    expected = fit_calibration(g_sur[tune], c0[tune], g_sur[cal], c0[cal], n, levels=(0.1,))
    assert block == expected


# ------------------------------------------------------------------------------------------- Monte-Carlo counts
class _Engine:
    """Stand-in sampling engine: image i's counts put (rng draw) hits on class (i mod K), the rest on the next class,
    so a count row names its image and the noise it was drawn with."""

    sigma, num_classes = 0.25, 16

    class backend:  # noqa: N801
        name = "stand-in"

    def count(self, images, num_samples, rng, on_batch=None):
        ids = np.asarray(images).reshape(len(images), -1)[:, 0].astype(np.int64)
        hits = rng.integers(0, num_samples + 1, len(ids))
        out = np.zeros((len(ids), self.num_classes), np.int64)
        out[np.arange(len(ids)), ids % self.num_classes] += hits
        out[np.arange(len(ids)), (ids + 1) % self.num_classes] += num_samples - hits
        return out


def _images(num):
    return np.repeat(np.arange(num, dtype=np.float32)[:, None, None, None], 2, axis=3)


def test_counts_of_more_than_ten_shards_stay_in_image_order(tmp_path):
    """load_counts must return row i for image i whatever the number of shards. Bug guarded against (run against
    it, this test failed): load_counts concatenating the shards in the order of their names as strings (shard 10
    before shard 2), which no earlier test reaches (they write at most a few shards): every label after shard 1
    would belong to another image."""
    images = _images(13)
    counts = compute_counts(_Engine(), images, 50, out_dir=tmp_path, seed=7, model_sha256="x", shard_size=1,
                            progress=False)
    again = load_counts(tmp_path)
    rows = np.arange(13)
    for c in (counts, again):
        assert c.shape == (13, _Engine.num_classes) and np.all(c.sum(axis=1) == 50)
        own = c[rows, rows % _Engine.num_classes] + c[rows, (rows + 1) % _Engine.num_classes]
        assert np.all(own == 50), own  # every row's samples lie on its own image's two classes


def test_the_counts_noise_is_drawn_from_the_runs_seed(tmp_path):
    """Each shard's noise comes from default_rng([seed, shard]): counts of the same images with another seed are
    other counts, with the same seed the same. Calibration labels need noise independent of the surrogate's training
    counts (recalibration refuses counts drawn with that seed), which holds only if the seed reaches the noise. Bug
    guarded against (run against it, this test failed): compute_counts drawing shard s from default_rng(s), the
    same noise for every seed; the resume and reproducibility tests compare runs with one seed only."""
    images = _images(40)
    runs = {seed: compute_counts(_Engine(), images, 1000, out_dir=tmp_path / f"{seed}-{rep}", seed=seed,
                                 model_sha256="x", shard_size=16, progress=False)
            for seed, rep in ((1, 0), (2, 0))}
    same = compute_counts(_Engine(), images, 1000, out_dir=tmp_path / "1-again", seed=1, model_sha256="x",
                          shard_size=16, progress=False)
    assert np.array_equal(runs[1], same)
    assert np.mean(np.all(runs[1] == runs[2], axis=1)) < 0.2


# -------------------------------------------------------------------------------------------------- Cohen / CP
def test_cohen_bounds_the_class_over_every_sample_drawn():
    """certify(..., trials=n) bounds P(class) over all n estimation samples, a sample counted for no class (a noisy
    copy with a NaN logit) being a miss. Bug guarded against (run against it, this test failed): certify ignoring
    ``trials`` and dividing by the counts' sum, which bounds P(class | some class) >= pA (90 of 90 counted instead of
    90 of 100: p_lower 0.926 instead of 0.775)."""
    sel, est = np.array([0, 10, 0]), np.array([0, 90, 0])
    cert = sm.certify(sel, est, 0.001, 0.25, trials=100)
    assert cert.p_lower == sm.clopper_pearson_lower(90, 100, 0.001)
    assert cert.p_lower < sm.clopper_pearson_lower(90, 90, 0.001)
    assert cert.radius == sm.radius_from_probability(cert.p_lower, 0.25)


def test_a_clopper_pearson_bound_the_forward_function_never_confirms_is_zero(monkeypatch):
    """A lower bound that the forward incomplete beta does not confirm within 60 Newton steps becomes 0 (abstain).
    Bug guarded against (run against it, this test failed): _confirmed_lower keeping the last unconfirmed step
    (0.836 here, with a forward function that never confirms) instead of 0. The confirmation tests reach this
    fallback never: scipy's inverse errs by little enough that a few steps confirm it."""
    import smoothing.cohen as cohen

    alpha = 0.05
    never = np.nextafter(alpha * (1 - 1e-12), 1.0)  # just above what confirms: excess ~1e-17, tiny Newton steps
    monkeypatch.setattr(cohen, "betainc", lambda a, b, x: np.full(np.shape(x), never))
    assert cohen.clopper_pearson_lower(90, 100, alpha) == 0.0
    assert sm.fixed_n_certificate(90, 100, alpha, 0.25) == (0.0, 0.0)


# ---------------------------------------------------------------------------------------------- the pipeline
class _Stop(Exception):
    pass


def test_the_pipeline_labels_the_calibration_images_with_noise_of_their_own(tmp_path, monkeypatch):
    """run_pipeline counts the calibration split's own images (the ones calibrate_surrogate then reads, row for
    row), with a seed other than the surrogate's training counts' (surrogate_counts_seed: what recalibration
    refuses). Base model, surrogate and counts are stand-ins; the run stops at calibrate_surrogate. Bugs guarded
    against (run against each, this test failed): the calibration counts drawn with seed + 1 (the surrogate-train
    seed) instead of seed + 3; the calibration counts drawn on surrogate-train images while calibrate_surrogate
    reads the calibration images (labels of other images). test_pipeline.py checks the bundle, not which counts
    labelled it."""
    import calibration.pipeline as pipeline
    from calibration.data import load_dataset, make_splits
    from models.backends import OnnxBackend
    from models.bundle import DEFAULT_BUNDLE_DIR

    base = OnnxBackend(DEFAULT_BUNDLE_DIR / "base.onnx", device="cpu", threads=1)
    counted, read = {}, {}

    def counts(engine, images, num_samples, *, out_dir, seed, **kw):
        counted[Path(out_dir).name] = (np.array(images), seed)
        return np.zeros((len(images), engine.num_classes), np.int64)

    def calibrate(surrogate, images, cal_counts, num_samples, **kw):
        read["images"] = np.array(images)
        raise _Stop

    monkeypatch.setattr(pipeline, "_base_model", lambda cfg, ds, splits, work, device: pipeline._Base(
        DEFAULT_BUNDLE_DIR / "base.onnx", base, base))
    monkeypatch.setattr(pipeline, "_surrogate", lambda *a, **k: DEFAULT_BUNDLE_DIR / "surrogate.onnx")
    monkeypatch.setattr(pipeline, "compute_counts", counts)
    monkeypatch.setattr(pipeline, "calibrate_surrogate", calibrate)
    cfg = pipeline.PipelineConfig(out=str(tmp_path / "bundle"), work=str(tmp_path / "work"), calibration_size=40,
                                  surrogate_size=100, limit=60, levels=(0.1,), tune_size=20, device="cpu",
                                  progress=False, seed=5, split_seed=0)
    with pytest.raises(_Stop):
        pipeline.run_pipeline(cfg, log=lambda *_: None)
    ds = load_dataset(cfg.data)
    splits = make_splits(len(ds.x_train), calibration=40, surrogate_train=100, seed=0).limited(60)
    cal_images, cal_seed = counted["counts-calibration"]
    sur_images, sur_seed = counted["counts-surrogate-train"]
    assert np.array_equal(cal_images, ds.x_train[splits.calibration])
    assert np.array_equal(read["images"], cal_images)
    assert np.array_equal(sur_images, ds.x_train[splits.surrogate_train])
    assert sur_seed == pipeline.surrogate_counts_seed(cfg.seed) and cal_seed != sur_seed
