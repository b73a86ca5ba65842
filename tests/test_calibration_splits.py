"""Which images tune, calibrate and train: seeded random subsets of the splits (never prefixes, so a training pool
stored in order, e.g. an .npz sorted by class, cannot make the calibration images unlike the test inputs), the one
helper that names the tuning images of a fitted calibration (legacy prefix for the shipped bundle), and the images
a user's own base model was declared trained on, kept out of calibration and surrogate-train.

Real code paths (make_splits, Splits.limited, calibrate_surrogate, load_npz); the surrogate is a stand-in whose
log-odds reveal the class of each image, so the test can see which classes tuned.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import calibration.conformal_fit as conformal_fit
from calibration.data import load_npz, make_splits
from models.bundle import DEFAULT_BUNDLE_DIR

K, PER_CLASS = 10, 600  # a 6,000-image pool stored sorted by class
Y_SORTED = np.repeat(np.arange(K), PER_CLASS)


class ClassRevealingSurrogate:
    """``forward(pool indices)`` -> logits whose log-odds is 1 + the image's class (so g_tune names the classes)."""

    def forward(self, idx):
        g = 1.0 + Y_SORTED[np.asarray(idx)]
        return np.stack([g, np.zeros(len(g))], 1)


def test_limited_is_a_seeded_random_subset_not_the_lowest_indices():
    """--limit on a class-sorted pool: each limited split is a seeded random subset of the split (index order kept),
    so it holds every class. Run against the code before 2026-12-05: Splits.limited took the first indices, the
    limited calibration split held class 0 only; this test failed."""
    splits = make_splits(len(Y_SORTED), calibration=2000, surrogate_train=2000, seed=0)
    small = splits.limited(200)
    for full, part in zip((splits.base_train, splits.surrogate_train, splits.calibration),
                          (small.base_train, small.surrogate_train, small.calibration)):
        assert len(part) == 200 and np.all(np.diff(part) > 0) and np.isin(part, full).all()
        assert set(Y_SORTED[part]) == set(range(K))
    again = splits.limited(200)
    assert again.record() == small.record()  # seeded: a rerun (and a recalibration check) rebuilds it
    assert splits.limited(None) is splits and splits.limited(len(Y_SORTED)).record() == splits.record()


def test_tuning_part_is_a_seeded_random_subset_of_a_class_sorted_calibration_split(monkeypatch):
    """calibrate_surrogate on a class-sorted calibration split: the tuning images are a seeded random subset (every
    class in both parts), the ones tuning_positions names for the recorded cut. Run against the code before
    2026-12-05: the first tune_size images tuned (classes 0-1 only; classes 2-9 only calibrated); this test failed."""
    seen = {}

    def spy(g_tune, hits_tune, g_cal, hits_cal, num_samples, **options):
        seen.update(g_tune=np.asarray(g_tune), g_cal=np.asarray(g_cal))
        return {"levels": []}

    monkeypatch.setattr(conformal_fit, "fit_calibration", spy)
    cal = make_splits(len(Y_SORTED), calibration=2000, surrogate_train=2000, seed=3).calibration
    counts = np.tile([90, 10], (len(cal), 1))
    cut = {"method": "seeded-permutation", "seed": 3, "stream": 71205}
    conformal_fit.calibrate_surrogate(ClassRevealingSurrogate(), cal, counts, 100, tune_size=400, cut=cut)
    tuned, calibrated = seen["g_tune"] - 1, seen["g_cal"] - 1
    assert len(tuned) == 400 and len(calibrated) == 1600
    assert set(tuned.astype(int)) == set(range(K)) and set(calibrated.astype(int)) == set(range(K))
    assert abs(np.mean(tuned) - np.mean(calibrated)) < 0.5  # same class mix (mean class 4.5 each)
    from calibration.conformal_fit import tuning_cut, tuning_positions

    assert tuning_cut(3) == cut
    at = tuning_positions(len(cal), 400, {"tuning_cut": cut})
    np.testing.assert_array_equal(seen["g_tune"], 1.0 + Y_SORTED[cal[at]])
    with pytest.raises(ValueError, match="seeded tuning cut"):
        conformal_fit.calibrate_surrogate(ClassRevealingSurrogate(), cal, counts, 100, tune_size=400, cut=None)


def test_tuning_positions_read_the_shipped_bundle_as_a_prefix():
    """The shipped bundle was fitted before the seeded cut and records no tuning_cut: its tuning images are the
    first num_tuning of its (recalibration's) counted images; a record with a cut gives the seeded subset. Run
    against the code before 2026-12-05: there was no shared helper (benches sliced [:num_tuning]); this test
    failed (ImportError)."""
    from calibration.conformal_fit import calibration_record, tuning_cut, tuning_indices, tuning_positions

    manifest = json.loads((DEFAULT_BUNDLE_DIR / "manifest.json").read_text())
    prov, block = manifest["provenance"], manifest["calibration"]
    record = calibration_record(prov)
    assert record is prov["recalibration"] and "tuning_cut" not in record
    n, t = block["num_tuning"] + block["num_calibration"], block["num_tuning"]
    np.testing.assert_array_equal(tuning_positions(n, t, record), np.arange(t))
    splits = make_splits(60000, calibration=8000, surrogate_train=16000, seed=0)
    np.testing.assert_array_equal(tuning_indices(prov, t, n - t, 60000), splits.calibration[:t])
    seeded = tuning_positions(n, t, {"tuning_cut": tuning_cut(0)})
    assert len(seeded) == t and np.all(np.diff(seeded) > 0) and seeded.max() > 2 * t
    build = {"splits": splits.record(), "limit": None, "tuning_cut": tuning_cut(0)}  # a build since 2026-12-05
    np.testing.assert_array_equal(tuning_indices(build, t, n - t, 60000), splits.calibration[seeded])
    assert tuning_indices({**build, "splits": {**build["splits"], "indices_sha256": "0"}}, t, n - t, 60000) is None


def test_declared_training_images_stay_out_of_calibration_and_surrogate_train(tmp_path):
    """--base-trained-on FILE.npy: the listed images (indices into the .npz's x, mapped through the test part
    carved from it) go to base-train only. Run against the code before 2026-12-05: there was no way to declare
    them (make_splits took no exclusion); this test failed (ImportError)."""
    from calibration.data import declared_training

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(500, 4, 4), dtype=np.uint8)
    x[:, 0, 0], x[:, 0, 1] = np.arange(500) % 256, np.arange(500) // 256  # each image names its index in x
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 3, 500))
    ds = load_npz(tmp_path / "d.npz")  # 400 training images, 100 carved off as test
    trained = rng.choice(ds.train_source, size=250, replace=False)  # pool images (test-part ones are refused)
    np.save(tmp_path / "seen.npy", trained)
    pool, record = declared_training(str(tmp_path / "seen.npy"), ds)
    byte = np.round(ds.x_train[:, 0, 0, :2] * 255).astype(int)
    names = byte[:, 0] + 256 * byte[:, 1]
    np.testing.assert_array_equal(np.sort(names[pool]), np.sort(np.intersect1d(trained, names)))
    assert record["declared"] == "file" and record["num_indices"] == 250 and record["excluded_from_pool"] == len(pool)
    splits = make_splits(len(ds.x_train), calibration=60, surrogate_train=60, seed=0, exclude=pool)
    assert not np.isin(np.concatenate([splits.calibration, splits.surrogate_train]), pool).any()
    assert np.isin(pool, splits.base_train).all()
    assert make_splits(400, calibration=60, surrogate_train=60, seed=0, exclude=None).record() == \
        make_splits(400, calibration=60, surrogate_train=60, seed=0).record()
    with pytest.raises(ValueError, match="leave only"):
        make_splits(len(ds.x_train), calibration=150, surrogate_train=100, seed=0, exclude=pool)
    np.save(tmp_path / "bad.npy", np.array([0, 500]))
    with pytest.raises(ValueError, match=r"integer indices in \[0, 500\)"):
        declared_training(str(tmp_path / "bad.npy"), ds)
    assert declared_training("none", ds) == (None, {"declared": "none",
                                                    "meaning": "the base model saw no image of this dataset"})


def test_conformal_benches_tune_on_the_images_the_bundle_tuned_on(monkeypatch):
    """bench.conformal_check and bench.conformal_knobs take the tuning images through tuning_positions: the first
    --tune of the counted images for the shipped bundle (as they always did), the recorded seeded subset for a bundle
    fitted with a tuning_cut (the rest calibrate / hold out). Run against the code before this change: both benches
    sliced [:--tune] whatever the bundle; this test failed (AttributeError)."""
    from types import SimpleNamespace as NS

    import bench.conformal_check as check
    import bench.conformal_knobs as knobs
    from calibration.conformal_fit import tuning_cut, tuning_positions

    def shipped(tune):
        return NS(bundle=str(DEFAULT_BUNDLE_DIR), surrogate=None, tune=tune)

    surrogate, at, words = knobs.bundle_tuning_positions(shipped(None), 8000)
    assert surrogate == str(DEFAULT_BUNDLE_DIR / "surrogate.onnx") and words == "the first"
    np.testing.assert_array_equal(at, np.arange(1024))
    np.testing.assert_array_equal(knobs.bundle_tuning_positions(shipped(256), 1200)[1], np.arange(256))

    n, t, cut = 1200, 256, tuning_cut(0)
    fitted = NS(manifest=NS(calibration=NS(num_tuning=t, num_calibration=n - t),
                            provenance={"recalibration": {"tuning_cut": cut}}), path=lambda role: f"{role}.onnx")
    seeded = tuning_positions(n, t, {"tuning_cut": cut})
    assert not np.array_equal(seeded, np.arange(t))
    lab = NS(images=np.arange(n), labels=np.zeros(n, int), counts=np.tile([90, 10], (n, 1)),
             meta={"num_samples": 100, "num_images": n})

    class PositionRevealing:  # log-odds = 1 + the image's position among the counted images
        def __init__(self, path, device):
            pass

        def forward(self, idx):
            return np.stack([1.0 + np.asarray(idx), np.zeros(len(idx))], 1)

    class Seen(Exception):
        pass

    seen = {}

    def stop(name):
        def spy(*args, **kwargs):
            seen[name] = args
            raise Seen

        return spy

    monkeypatch.setattr(knobs, "load_bundle", lambda root, **kw: fitted)
    for mod in (knobs, check):
        monkeypatch.setattr(mod, "labelled_calibration_images", lambda *a, **k: lab)
        monkeypatch.setattr(mod, "OnnxBackend", PositionRevealing)
    monkeypatch.setattr(knobs, "tuning_fold_radius", stop("knobs"))
    monkeypatch.setattr(check, "fit_level", stop("check"))
    for mod in (knobs, check):
        with pytest.raises(Seen):
            mod.main(["--bundle", "seeded", "--counts", "c", "--held-out", "300"][: 6 if mod is check else 4])
    np.testing.assert_array_equal(seen["knobs"][0], 1.0 + seeded)
    g_tune, _, g_cal = seen["check"][:3]
    np.testing.assert_array_equal(g_tune, 1.0 + seeded)
    assert len(g_cal) == n - t - 300 and not np.isin(g_cal - 1, seeded).any()
    with pytest.raises(ValueError, match="--tune 256"):
        knobs.main(["--bundle", "seeded", "--counts", "c", "--tune", "200"])
