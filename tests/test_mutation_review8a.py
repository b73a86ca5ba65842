"""Mutation audit, round 8a: the data and labels behind a bundle, the bring-your-own path included: dataset loading
(calibration.data: the packaged Fashion-MNIST, the .npz path, the splits and their disjointness, the images a user's
base model was declared trained on) and PipelineConfig's validation (calibration.config). The round's tests of the
Monte-Carlo counts, the training loops, the meta-learner's objective and the pipeline's data knobs are in
tests/test_mutation_review8a_training.py.

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. Real components: real .npz files, the
packaged Fashion-MNIST; every draw seeded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from calibration.config import PipelineConfig
from calibration.data import declared_training, load_dataset, load_npz, make_splits
from cli.main import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _refused(path: Path, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        load_npz(path)
    assert fragment in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------------------ the .npz file
class _MakesDirectoryWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pickled_array_is_never_unpickled(tmp_path):
    """An .npz from elsewhere may carry pickles (code run on load). Mutant: np.load(path, allow_pickle=True): the
    pickle ran (here: made a directory) before the dtype check refused the array."""
    marker = tmp_path / "unpickled"
    path = _npz(tmp_path / "p.npz", x=np.array([_MakesDirectoryWhenUnpickled(marker)], dtype=object),
                y=np.zeros(1, np.int64))
    with pytest.raises(ValueError):
        load_npz(path)
    assert not marker.exists()


def test_an_object_array_is_refused_naming_the_file_and_what_was_expected(tmp_path):
    """Real bug (fixed here): np.load opens an .npz lazily, so the object (pickled) arrays that load_npz's except
    clause names were refused only when read, outside it, with numpy's bare "Object arrays cannot be loaded when
    allow_pickle=False" (no file, nothing of what was expected). Run against the code before the fix: failed."""
    path = _npz(tmp_path / "o.npz", x=np.zeros((4, 4, 4), np.uint8), y=np.array([0, 1, "a", None], dtype=object))
    _refused(path, f"{path} is not a readable .npz of numeric arrays")


def test_a_single_npy_array_under_an_npz_name_is_refused_saying_so(tmp_path):
    """Mutant: the NpzFile check dropped: a .npy renamed .npz failed with AttributeError ('files')."""
    with open(tmp_path / "s.npz", "wb") as fh:
        np.save(fh, np.zeros((4, 4, 4), np.uint8))
    _refused(tmp_path / "s.npz", "is a single .npy array")


def _refusal_cases():
    x, y = np.zeros((6, 4, 4), np.uint8), np.arange(6) % 3
    return [  # (what the mutant did, arrays, the fragment of the message)
        ("`len(x) < len(y)` for `!=`: 6 images with 5 labels loaded", dict(x=x, y=y[:5]), "6 images but y has 5"),
        ("only y checked against the classes: a y_test label 3 of 3 classes loaded",
         dict(x=x, y=y, x_test=x[:2], y_test=np.array([0, 3])), "labels exceed the 3 classes"),
        ("y_test checked under the name 'y' (the message blamed the good labels)",
         dict(x=x, y=y, x_test=x[:2], y_test=np.array([0.0, 1.0])), "y_test must be a 1-d array"),
        ("class names distinct only as given: 'a' and 'a ' loaded (one class twice in every certificate)",
         dict(x=x, y=y, classes=np.array(["a", "a ", "b"])), "distinct, non-blank class names"),
        ("`arr.ndim >= 1`: a 2-d classes array loaded", dict(x=x, y=y, classes=np.array([["a", "b"], ["c", "d"]])),
         "distinct, non-blank class names"),
        ("channels last detected for 1 or 3 channels only: RGBA (N, 8, 8, 4) loaded as 8 channels of 8 x 4",
         dict(x=np.zeros((6, 8, 8, 4), np.uint8), y=y), "channels last"),
    ]


REFUSAL_IDS = ["more images than labels", "y_test beyond the classes", "bad y_test named", "names equal up to spaces",
               "2-d classes", "RGBA channels last"]


@pytest.mark.parametrize("mutant, arrays, fragment", _refusal_cases(), ids=REFUSAL_IDS)
def test_an_npz_the_pipeline_cannot_use_is_refused_saying_why(tmp_path, mutant, arrays, fragment):
    """Mutants: one per case, described by its first field (under it the case loaded, or was refused with another
    message)."""
    _refused(_npz(tmp_path / "d.npz", **arrays), fragment)


def test_labels_that_wrap_to_negative_are_refused(tmp_path):
    """Real bug (fixed here): uint64 labels >= 2**63 (a -1 "unlabelled" stored as uint64) became -1 on the cast to
    int64 and loaded silently as a label of no class. Run against the code before the fix: loaded; failed."""
    y = np.array([0, 1, 2**64 - 1, 1], dtype=np.uint64)
    _refused(_npz(tmp_path / "d.npz", x=np.zeros((4, 4, 4), np.uint8), y=y), "non-negative integer labels")


def test_float_images_reaching_exactly_one_load_unchanged(tmp_path):
    """A white pixel of a float image is 1.0, inside [0, 1]. Mutant: `x.max() >= 1` refused such an image."""
    x, y = np.eye(4)[None].repeat(4, 0), np.array([0, 1, 0, 1])
    ds = load_npz(_npz(tmp_path / "d.npz", x=x, y=y, x_test=x[:1], y_test=y[:1]))
    np.testing.assert_array_equal(ds.x_train[:, 0], x.astype(np.float32))


def test_fmnist_is_the_packaged_fashion_mnist():
    """`--data fmnist` is the short name of the packaged data set. Mutant: the alias dropped ('unknown dataset')."""
    ds = load_dataset("fmnist")
    assert ds.name == "fashion-mnist" and ds.x_train.shape == (60000, 1, 28, 28) and len(ds.y_test) == 10000


# ------------------------------------------------------------------------------------------------ the splits
@pytest.mark.parametrize("sizes, why", [
    (dict(calibration=0, surrogate_train=10), "an empty calibration split (mutant: calibration < 0)"),
    (dict(calibration=10, surrogate_train=10), "no base-train image left (mutant: rest < 0)"),
])
def test_splits_that_leave_a_part_empty_are_refused(sizes, why):
    """Mutants named per case: the split of 20 images cut with a part empty instead of refused."""
    with pytest.raises(ValueError, match="splits do not fit"):
        make_splits(20, **sizes)


def test_a_base_train_size_beyond_the_rest_stays_disjoint():
    """Mutant: base_train not capped at the rest: base-train took surrogate-train and calibration images too."""
    s = make_splits(100, calibration=20, surrogate_train=30, base_train=80)
    assert len(s.base_train) == 50
    assert not np.intersect1d(s.base_train, np.concatenate([s.surrogate_train, s.calibration])).size


def test_declared_images_filling_exactly_the_base_part_are_accepted_one_more_refused():
    """Mutant: `seen.sum() > rest + 1`: a declaration of one image more than base-train holds was accepted, so one
    declared training image went to surrogate-train."""
    s = make_splits(100, calibration=20, surrogate_train=30, exclude=np.arange(50))
    assert np.isin(np.arange(50), s.base_train).all()
    with pytest.raises(ValueError, match="leave only 50"):
        make_splits(100, calibration=20, surrogate_train=30, exclude=np.arange(51))


# ------------------------------------------------------------------------------------- --base-trained-on FILE.npy
@pytest.fixture
def carved(tmp_path):
    """A 500-image .npz without a test set (load_npz carves 100 off)."""
    return load_npz(_npz(tmp_path / "d.npz", x=np.zeros((500, 4, 4), np.uint8), y=np.arange(500) % 3))


@pytest.mark.parametrize("indices, why", [
    (np.array([3, -1]), "a negative index (mutant: no lower bound)"),
    (np.array([3.0, 4.0]), "float indices (mutant: kind 'f' accepted)"),
    (np.array([[3, 4]]), "a 2-d array (mutant: ndim unchecked)"),
])
def test_a_declaration_that_names_no_image_exactly_is_refused_as_such(tmp_path, carved, indices, why):
    """Mutants named per case: each was refused, if at all, as naming images of the carved test part."""
    np.save(tmp_path / "seen.npy", indices)
    with pytest.raises(ValueError, match=r"integer indices in \[0, 500\)"):
        declared_training(str(tmp_path / "seen.npy"), carved)


def test_the_declaration_record_counts_distinct_images_and_hashes_the_file(tmp_path, carved):
    """Mutants: num_indices counting repeated indices; sha256 of the path's text rather than of the file."""
    pool_images = carved.train_source[:3]
    np.save(tmp_path / "seen.npy", np.r_[pool_images, pool_images])
    _, record = declared_training(str(tmp_path / "seen.npy"), carved)
    assert record["num_indices"] == 3 and record["excluded_from_pool"] == 3
    assert record["sha256"] == hashlib.sha256((tmp_path / "seen.npy").read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ PipelineConfig
@pytest.mark.parametrize("field, value, message", [
    ("sigma", 0.0, "--sigma must be a finite number > 0"),
    ("sigma", True, "--sigma must be a finite number > 0"),
    ("calibration_size", 0, "--calibration-size must be an integer >= 1"),
    ("calibration_size", True, "--calibration-size must be an integer >= 1"),
    ("tune_size", 0, "--tune-size must be an integer >= 1"),
    ("batch_size", -1, "--batch-size must be an integer >= 0"),
    ("levels", (0.1, 1.0), "--levels must be one or more comma-separated risk levels"),
    ("gamma", 1.0, "--gamma must be strictly between 0 and 1"),
    ("meta_fraction", 1.0, "--meta-fraction must be strictly between 0 and 1"),
    ("work", "  ", "--work must be a non-empty path"),
])
def test_a_value_no_run_can_use_is_refused_naming_its_flag(field, value, message):
    """Mutants, one per case: sigma 0 accepted (`>= 0`); a bool taken for a number (True as sigma 1 or as size 1);
    calibration_size or tune_size unchecked; batch_size unchecked; the level 1 accepted (`<= 1`); gamma 1
    or meta_fraction 1 accepted (`<= 1`: every surrogate-train image held out for the meta-learner); a blank path
    accepted (no strip)."""
    with pytest.raises(ValueError) as info:
        PipelineConfig(**{field: value})
    assert message in str(info.value), str(info.value)


def test_a_limit_of_zero_is_no_limit():
    """`--limit 0` means no limit. Mutants: `limit >= 1` in PipelineConfig (refused); `limit is None` in
    Splits.limited (limit 0 emptied every split)."""
    assert PipelineConfig(limit=0).limit == 0
    splits = make_splits(300, calibration=100, surrogate_train=100, seed=1)
    assert splits.limited(0) is splits


def test_the_defaults_are_the_documented_ones():
    """README: --calibration-size 8000, --surrogate-size 16000, --cal-samples 10000, --tune-size 1600, 256 samples
    per surrogate-train image, 20% held out for the meta prior, the ladder 0.1 ... 0.001 in at most 2 bins, probit
    scores scaled by the spread. Mutants: cal_samples 1000, meta_fraction 0.5, calibration_scale 'unit'."""
    cfg = PipelineConfig()
    assert (cfg.calibration_size, cfg.surrogate_size, cfg.cal_samples, cfg.tune_size, cfg.train_samples) == \
        (8000, 16000, 10000, 1600, 256)
    assert (cfg.meta_fraction, cfg.levels, cfg.max_bins, cfg.calibration_scale) == \
        (0.2, (0.1, 0.05, 0.01, 0.005, 0.001), 2, "spread")


def test_a_repeated_level_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """Real bug (fixed here): `--levels 0.1,0.1` passed PipelineConfig and `calibrate conformal`, the build trained
    both models and drew every Monte-Carlo sample, and the bundle's schema then refused the fitted ladder ("levels
    must have distinct alphas"). Run against the code before the fix: both were accepted; failed."""
    with pytest.raises(ValueError, match=r"--levels must be distinct risk levels"):
        PipelineConfig(levels=(0.1, 0.05, 0.1))
    import calibration.pipeline as pipeline

    monkeypatch.setattr(pipeline, "recalibrate", lambda *a, **k: pytest.fail("recalibration must not start"))
    argv = ["calibrate", "conformal", "b", "--counts", "c", "--tune-size", "10", "--out", str(tmp_path / "o"),
            "--levels", "0.1,0.1"]
    assert main(argv) == 2
    assert "--levels must be distinct risk levels" in capsys.readouterr().err
