"""Review of the evaluation and the offline calibration numbers (second pass): which images and noise each figure
is computed from.

Real code paths throughout (the embedded bundle's base model through onnxruntime, calibration.data.load_npz,
run_pipeline with a user's base model up to the surrogate's training); every random draw is seeded. Each test states
how it failed on the code before this review.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from calibration.data import load_dataset, load_npz
from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle


def _stream_args(streams, data="fashion-mnist"):
    return argparse.Namespace(data=data, n=64, n0=8, seed=7, sampler=None, device="cpu", batch_size=64,
                              streams=None if streams is None else str(streams))


def test_a_stream_cache_of_other_images_is_not_reused(tmp_path):
    """``--streams`` is keyed by the data's NAME; a data file rewritten at the same path (an .npz re-exported with
    another split) holds other test images, and their cached streams were evaluated against the new images' clean
    passes, labels and surrogate. Run against the code before this review: the second call returned the first
    images' streams; this test failed."""
    from calibration.evaluate import _streams

    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    ds = load_dataset("fashion-mnist")
    x_old, x_new = ds.x_test[:3], ds.x_test[3:6]  # labels 9, 2, 1 then 1, 4, 6: different top classes
    data = str(tmp_path / "digits.npz")  # the same --data path both times
    cache = tmp_path / "streams.npz"
    _streams(_stream_args(cache, data), bundle, x_old)
    cached = _streams(_stream_args(cache, data), bundle, x_new)
    fresh = _streams(_stream_args(None, data), bundle, x_new)
    np.testing.assert_array_equal(cached[0], fresh[0])
    np.testing.assert_array_equal(cached[1], fresh[1])
    again = _streams(_stream_args(cache, data), bundle, x_new)  # and the redrawn cache is reused for its images
    assert again[4] == cached[4] and np.array_equal(again[1], fresh[1])


def test_a_named_datasets_cache_from_before_the_digest_is_still_reused(tmp_path):
    """Caches written before the images' digest was recorded (the published 1,000 x 10^4 streams) stay valid for a
    named dataset, whose content is fixed."""
    import json

    from calibration.evaluate import _streams

    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    x = load_dataset("fashion-mnist").x_test[:2]
    cache = tmp_path / "streams.npz"
    first = _streams(_stream_args(cache), bundle, x)
    with np.load(cache) as d:
        info = json.loads(str(d["info"]))
        arrays = {k: d[k] for k in ("selection", "stream")}
    del info["images_sha256"]
    np.savez_compressed(cache, **arrays, info=json.dumps(info))
    assert _streams(_stream_args(cache), bundle, x)[4] == first[4]  # the recorded seconds: read, not redrawn


def test_declared_training_images_in_the_carved_test_part_are_refused(tmp_path):
    """An .npz without x_test: load_npz carves the test set from its x array. A user's base model declared trained
    on some of those images was accepted (only the pool part was kept out of the splits), so the build's test
    accuracy and `certserve calibrate evaluate` scored the model on its own training images. Run against the code
    before this review: no error; this test failed."""
    from calibration.data import declared_training

    rng = np.random.default_rng(3)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, size=(100, 4, 4), dtype=np.uint8), y=rng.integers(0, 3, 100))
    ds = load_npz(tmp_path / "d.npz")  # 80 pool images, 20 carved off as test
    test_part = np.setdiff1d(np.arange(100), ds.train_source)
    np.save(tmp_path / "seen.npy", np.concatenate([ds.train_source[:30], test_part[:1]]))
    with pytest.raises(ValueError, match="names 1 images of the test part.*x_test and y_test"):
        declared_training(str(tmp_path / "seen.npy"), ds)
    np.save(tmp_path / "pool.npy", ds.train_source[:30])  # pool images only: kept out of the splits as before
    pool, record = declared_training(str(tmp_path / "pool.npy"), ds)
    assert len(pool) == 30 and record["excluded_from_pool"] == 30


class _Stop(Exception):
    pass


def test_the_meta_learners_part_of_surrogate_train_is_not_its_last_images(tmp_path, monkeypatch):
    """run_pipeline held out the LAST 20% of surrogate-train (in pool-index order) for the meta-learner. On a pool
    stored sorted by class (which the splits are built to survive) the surrogate then never saw the last classes,
    and its arg-max is the class every sequential route tests. Run against the code before this review: the
    surrogate's training images held classes 0-7 only; this test failed."""
    import calibration.pipeline as pipeline
    from calibration.config import PipelineConfig

    ds = load_dataset("fashion-mnist")
    order = np.argsort(ds.y_train[:1200], kind="stable")  # 1,200 images, sorted by class
    x = np.round(ds.x_train[:1200][order, 0] * 255).astype(np.uint8)
    y = ds.y_train[:1200][order]
    np.savez(tmp_path / "sorted.npz", x=x, y=y, x_test=x[:20], y_test=y[:20])
    seen = {}

    def capture(cfg, ds_, x_fit, counts_fit, base, work, device):
        seen["x_fit"] = x_fit
        raise _Stop

    monkeypatch.setattr(pipeline, "_surrogate", capture)
    cfg = PipelineConfig(data=str(tmp_path / "sorted.npz"), base=str(DEFAULT_BUNDLE_DIR / "base.onnx"),
                         base_trained_on="none", out=str(tmp_path / "b"), work=str(tmp_path / "w"),
                         calibration_size=100, surrogate_size=300, train_samples=2, tune_size=40, levels=(0.1,),
                         device="cpu", progress=False)
    with pytest.raises(_Stop):
        pipeline.run_pipeline(cfg, log=lambda *_: None)
    pool = {img.tobytes(): label for img, label in zip(load_npz(tmp_path / "sorted.npz").x_train, y)}
    classes = {pool[img.tobytes()] for img in seen["x_fit"]}
    assert len(seen["x_fit"]) == 240 and classes == set(range(10))
    fit, held = pipeline.meta_cut(300, 0.2, 0)
    assert len(held) == 60 and not np.isin(fit, held).any() and len(fit) + len(held) == 300
    assert not np.array_equal(held, np.arange(240, 300))


@pytest.mark.parametrize("argv, words", [(["--auto-budget", "0"], "positive integer"),
                                         (["--auto-budget", "-5"], "positive integer"),
                                         (["--auto-min-surrogate-z", "nan"], "finite number")])
def test_evaluate_route_arguments_are_checked(argv, words, capsys):
    """`--auto-budget 0` ran silently at the default 4,000 (``or``), and `--auto-min-surrogate-z nan` routed every
    image to the fallback while the report read "radius >= nan sigma". Run against the code before this review:
    both parsed (and -5 stopped later, with a message about the checkpoint schedule); this test failed."""
    from cli.main import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["calibrate", "evaluate", *argv])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("num_classes", [10, 127, 128, 1000, 40000])
def test_stream_labels_are_stored_exactly(num_classes):
    """The evaluation's noisy-label streams keep every label (a class 0..K-1, or -1 for no class). They were stored
    as uint8: with 1,000 classes the label 300 was counted for class 44, and -1 became 255. Run against the old
    dtype (uint8): all five cases failed."""
    from calibration.evaluate import stream_dtype

    labels = np.array([-1, 0, num_classes // 2, num_classes - 1], dtype=np.int64)
    assert np.array_equal(labels.astype(stream_dtype(num_classes)).astype(np.int64), labels)
