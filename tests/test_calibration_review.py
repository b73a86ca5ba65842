"""Calibration review (R4): recalibration must not calibrate on images the bundle's models may have seen.

Real components: the embedded bundle's models, real (tiny) count runs with its base model, ``recalibrate``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from calibration.counts import compute_counts, images_digest
from calibration.data import load_dataset, make_splits
from calibration.pipeline import recalibrate
from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle
from models.sampling import SamplingEngine

N_IMAGES, N_SAMPLES = 24, 16


def _count(images, out):
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    engine = SamplingEngine(bundle.backend("base", device="cpu", threads=1), sigma=0.25, num_classes=10,
                            batch_size=1024)
    compute_counts(engine, images, N_SAMPLES, out_dir=out, seed=7, model_sha256=bundle.model_sha256, shard_size=8,
                   progress=False)
    return out


def _recal(bundle, counts, data, out):
    return recalibrate(bundle, counts_dir=counts, data=data, calibration_size=8000, surrogate_size=16000,
                       split_seed=0, tune_size=8, levels=(0.2,), out=out, log=lambda *_: None)


def _with_provenance(tmp_path, name, **changes):
    bundle = tmp_path / name
    shutil.copytree(DEFAULT_BUNDLE_DIR, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            manifest["provenance"].pop(key, None)
        else:
            manifest["provenance"][key] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


@pytest.fixture(scope="module")
def reordered(tmp_path_factory):
    """Fashion-MNIST's 60,000 training images in another (seeded) order, saved as ``fashion-mnist.npz`` (the same
    dataset name as the package's), and counts of the calibration split that this file's split indices name."""
    root = tmp_path_factory.mktemp("reordered")
    ds = load_dataset("fashion-mnist")
    perm = np.random.default_rng(123).permutation(len(ds.x_train))
    u8 = lambda x: np.round(x[:, 0] * 255).astype(np.uint8)  # noqa: E731
    npz = root / "fashion-mnist.npz"
    np.savez(npz, x=u8(ds.x_train)[perm], y=ds.y_train[perm], x_test=u8(ds.x_test), y_test=ds.y_test)
    other = load_dataset(str(npz))
    assert other.name == "fashion-mnist"
    used = make_splits(60000, calibration=8000, surrogate_train=16000, seed=0).limited(N_IMAGES).calibration
    built = make_splits(60000, calibration=8000, surrogate_train=16000, seed=0)
    seen = np.isin(perm[used], np.concatenate([built.base_train, built.surrogate_train])).sum()
    assert seen >= N_IMAGES // 2  # most of the images these indices name trained the bundle's models
    return npz, _count(other.x_train[used], root / "counts"), images_digest(ds.x_train)


def test_recalibration_refuses_a_pool_other_than_the_bundles(reordered, tmp_path):
    """The split indices a bundle records name images of the pool it was built from. The same indices into another
    data source (here Fashion-MNIST's own training images in another order, under the same name) name other images:
    22 of the 24 that calibrate here trained the base model or the surrogate. Recalibration must refuse such --data
    (checked against the pool digest the build records). Run against the code before this review: the bundle was
    recalibrated on them and written; this test failed."""
    npz, counts, pool_sha = reordered
    bundle = _with_provenance(tmp_path, "with-digest", pool_sha256=pool_sha)
    with pytest.raises(ValueError, match="not the training pool the bundle was built from"):
        _recal(bundle, counts, str(npz), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_recalibration_of_a_bundle_without_pool_digest_refuses_another_dataset(reordered, tmp_path):
    """A bundle built before the pool digest was recorded (the shipped one) names its dataset only: counts of
    another dataset's calibration split are refused. Run against the code before this review: recalibrated; this
    test failed."""
    npz, counts, _ = reordered
    renamed = npz.with_name("fmnist-reordered.npz")
    shutil.copyfile(npz, renamed)
    assert "pool_sha256" not in load_bundle(DEFAULT_BUNDLE_DIR).manifest.provenance
    with pytest.raises(ValueError, match="not the dataset the bundle was built from"):
        _recal(DEFAULT_BUNDLE_DIR, counts, str(renamed), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def counts_dir(tmp_path_factory):
    ds = load_dataset("fashion-mnist")
    used = make_splits(60000, calibration=8000, surrogate_train=16000, seed=0).limited(N_IMAGES).calibration
    return _count(ds.x_train[used], tmp_path_factory.mktemp("counts") / "cal")


def test_recalibration_with_the_bundles_pool_passes_and_is_recorded(counts_dir, tmp_path):
    """The right data passes the digest check, and the recalibration records what it read (dataset, pool digest;
    the code before this review recorded neither: this test failed)."""
    ds = load_dataset("fashion-mnist")
    bundle = _with_provenance(tmp_path, "with-digest", pool_sha256=images_digest(ds.x_train))
    out = _recal(bundle, counts_dir, "fashion-mnist", tmp_path / "r")
    rec = load_bundle(out).manifest.provenance["recalibration"]
    assert rec["dataset"] == "fashion-mnist" and rec["pool_sha256"] == images_digest(ds.x_train)


def test_recalibration_refuses_a_user_base_model_without_a_training_declaration(counts_dir, tmp_path):
    """A bundle built with --base before --base-trained-on existed records base_trained_here false and no
    declaration: nothing shows its base model did not train on the calibration split (a model trained on the
    whole Fashion-MNIST training set did), which `calibrate all` now refuses to build. Recalibration must refuse it
    too; a declaration "none" passes. Run against the code before this review: the undeclared bundle was
    recalibrated; this test failed."""
    legacy = _with_provenance(tmp_path, "legacy-base", base_trained_here=False, base_trained_on=None)
    with pytest.raises(ValueError, match="no record of the images it was trained on"):
        _recal(legacy, counts_dir, "fashion-mnist", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    declared = _with_provenance(tmp_path, "declared-none", base_trained_here=False,
                                base_trained_on={"declared": "none", "meaning": "test"})
    assert load_bundle(_recal(declared, counts_dir, "fashion-mnist", tmp_path / "ok")).manifest.calibration


def test_recalibration_refuses_counts_drawn_with_the_surrogates_training_seed(counts_dir, tmp_path):
    """Counts drawn with the seed of the surrogate's training counts (the build's pipeline seed + 1) reuse the very
    noise the surrogate was fitted to: its calibration labels are then not independent of the surrogate. Refused,
    naming the seed (2026-12-06; the code before accepted them: this test failed)."""
    ds = load_dataset("fashion-mnist")
    bundle = _with_provenance(tmp_path, "same-seed", pool_sha256=images_digest(ds.x_train), seeds={"pipeline": 6})
    with pytest.raises(ValueError, match="seed 7, the seed of the noise the bundle's surrogate was trained on"):
        _recal(bundle, counts_dir, "fashion-mnist", tmp_path / "r")
    assert not (tmp_path / "r").exists()
