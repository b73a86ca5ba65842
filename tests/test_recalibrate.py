"""``certserve calibrate conformal``: recalibrating a bundle's surrogate from count shards of its calibration split.

Real components: the embedded bundle's models, a real (tiny) resumable count run with its base model, the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from calibration.counts import compute_counts
from calibration.data import load_dataset, make_splits
from calibration.pipeline import recalibrate
from cli.main import main as cli_main
from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle, sha256_file
from models.sampling import SamplingEngine

N_IMAGES, N_SAMPLES = 48, 64


@pytest.fixture(scope="module")
def counts_dir(tmp_path_factory):
    """Counts of the first 48 calibration-split images, 64 samples each, with the embedded base model."""
    out = tmp_path_factory.mktemp("counts") / "cal"
    ds = load_dataset("fashion-mnist")
    splits = make_splits(len(ds.x_train), calibration=8000, surrogate_train=16000, seed=0)
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    engine = SamplingEngine(bundle.backend("base", device="cpu", threads=1), sigma=0.25, num_classes=10,
                            batch_size=1024)
    compute_counts(engine, ds.x_train[splits.calibration][:N_IMAGES], N_SAMPLES, out_dir=out, seed=7,
                   model_sha256=bundle.model_sha256, shard_size=16, progress=False)
    return out


def test_cli_recalibrates_a_copy_and_keeps_the_models(counts_dir, tmp_path):
    out = tmp_path / "recal"
    code = cli_main(["calibrate", "conformal", str(DEFAULT_BUNDLE_DIR), "--counts", str(counts_dir),
                     "--tune-size", "16", "--levels", "0.2,0.1", "--out", str(out)])
    assert code == 0
    new, old = load_bundle(out), load_bundle(DEFAULT_BUNDLE_DIR)
    for role in ("base", "surrogate", "meta"):
        assert sha256_file(out / f"{role}.onnx") == sha256_file(DEFAULT_BUNDLE_DIR / f"{role}.onnx")
    cal = new.manifest.calibration
    assert [lv.alpha for lv in cal.levels] == [0.2, 0.1]
    assert (cal.num_tuning, cal.num_calibration, cal.samples_per_image) == (16, 32, N_SAMPLES)
    rec = new.manifest.provenance["recalibration"]
    assert rec["tune_size"] == 16 and rec["counts"]["num_samples"] == N_SAMPLES and rec["counts"]["seed"] == 7
    assert rec["command"].startswith("certserve calibrate conformal")
    assert new.manifest.provenance["dataset"] == old.manifest.provenance["dataset"]  # the build's record is kept


def test_counts_of_another_model_are_refused(counts_dir, tmp_path):
    other = tmp_path / "other-counts"
    shutil.copytree(counts_dir, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["model_sha256"] = "0" * 64
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="counts of another base model"):
        recalibrate(DEFAULT_BUNDLE_DIR, counts_dir=other, data="fashion-mnist", calibration_size=8000,
                    surrogate_size=16000, split_seed=0, tune_size=16, out=tmp_path / "x", log=lambda *_: None)
    assert not (tmp_path / "x").exists()


def test_counts_of_other_images_are_refused(counts_dir, tmp_path):
    """A different split (seed 1) names other images than the ones counted: refused before anything is written."""
    with pytest.raises(ValueError, match="counted other images"):
        recalibrate(DEFAULT_BUNDLE_DIR, counts_dir=counts_dir, data="fashion-mnist", calibration_size=8000,
                    surrogate_size=16000, split_seed=1, tune_size=16, out=tmp_path / "x", log=lambda *_: None)
    assert not (tmp_path / "x").exists()


def test_counts_at_another_sigma_are_refused(counts_dir, tmp_path):
    """Counts drawn at another noise level describe another smoothed classifier: refused. Run against the code
    before 2026-12-05: it recalibrated the sigma-0.25 bundle from sigma-1.0 counts; this test failed."""
    other = tmp_path / "other-sigma"
    shutil.copytree(counts_dir, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["sigma"] = 1.0
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="counted at sigma 1.0; the bundle smooths at sigma 0.25"):
        recalibrate(DEFAULT_BUNDLE_DIR, counts_dir=other, data="fashion-mnist", calibration_size=8000,
                    surrogate_size=16000, split_seed=0, tune_size=16, out=tmp_path / "x", log=lambda *_: None)
    assert not (tmp_path / "x").exists()


def test_split_arguments_other_than_the_bundles_are_refused(tmp_path):
    """Counts of a calibration split cut with other sizes than the bundle's (12,000 instead of 8,000: 4,000 of those
    images trained its surrogate) are consistent with themselves but not with the bundle: refused. Run against the
    code before 2026-12-05: it recalibrated the bundle; this test failed."""
    ds = load_dataset("fashion-mnist")
    splits = make_splits(len(ds.x_train), calibration=12000, surrogate_train=16000, seed=0)
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    engine = SamplingEngine(bundle.backend("base", device="cpu", threads=1), sigma=0.25, num_classes=10,
                            batch_size=1024)
    out = tmp_path / "counts-12000"
    compute_counts(engine, ds.x_train[splits.calibration][:24], 32, out_dir=out, seed=7,
                   model_sha256=bundle.model_sha256, shard_size=8, progress=False)
    with pytest.raises(ValueError, match="other splits .* than the bundle was built with"):
        recalibrate(DEFAULT_BUNDLE_DIR, counts_dir=out, data="fashion-mnist", calibration_size=12000,
                    surrogate_size=16000, split_seed=0, tune_size=8, out=tmp_path / "x", log=lambda *_: None)
    assert not (tmp_path / "x").exists()


def test_tune_size_must_leave_calibration_images(counts_dir, tmp_path):
    with pytest.raises(ValueError, match=r"tune_size must lie in \(0, 48\)"):
        recalibrate(DEFAULT_BUNDLE_DIR, counts_dir=counts_dir, data="fashion-mnist", calibration_size=8000,
                    surrogate_size=16000, split_seed=0, tune_size=48, out=tmp_path / "x", log=lambda *_: None)
    assert np.load(next(Path(counts_dir).glob("shard-*.npy"))).shape == (16, 10)
