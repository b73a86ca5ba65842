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
    """Counts of 48 calibration-split images (the seeded subset `calibrate counts --limit 48` takes), 64 samples
    each, with the embedded base model."""
    out = tmp_path_factory.mktemp("counts") / "cal"
    ds = load_dataset("fashion-mnist")
    splits = make_splits(len(ds.x_train), calibration=8000, surrogate_train=16000, seed=0)
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    engine = SamplingEngine(bundle.backend("base", device="cpu", threads=1), sigma=0.25, num_classes=10,
                            batch_size=1024)
    compute_counts(engine, ds.x_train[splits.limited(N_IMAGES).calibration], N_SAMPLES, out_dir=out, seed=7,
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
    compute_counts(engine, ds.x_train[splits.limited(24).calibration], 32, out_dir=out, seed=7,
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


def _recal(bundle, counts, out, **kw):
    return recalibrate(bundle, counts_dir=counts, data="fashion-mnist", calibration_size=8000, surrogate_size=16000,
                       split_seed=0, out=out, log=lambda *_: None, **{"tune_size": 16, "levels": (0.2,), **kw})


def test_counts_limit_takes_the_seeded_subset_that_recalibration_reads(tmp_path):
    """`calibrate counts --split calibration --limit 8` counts the seeded random subset Splits.limited(8), which
    labelled_calibration_images reads back. Run against the code before 2026-12-05: --limit took the first 8 images
    of the split (the lowest pool indices: a biased sample of a pool stored in order); this test failed."""
    from calibration.counts import labelled_calibration_images

    out = tmp_path / "c8"
    assert cli_main(["calibrate", "counts", "--model", str(DEFAULT_BUNDLE_DIR / "base.onnx"), "--split",
                     "calibration", "--limit", "8", "--n", "4", "--sigma", "0.25", "--device", "cpu",
                     "--out", str(out)]) == 0
    ds = load_dataset("fashion-mnist")
    splits = make_splits(len(ds.x_train), calibration=8000, surrogate_train=16000, seed=0)
    want = splits.limited(8).calibration
    assert not np.array_equal(want, splits.calibration[:8])
    lab = labelled_calibration_images(out, "fashion-mnist", calibration_size=8000, surrogate_size=16000,
                                      model_sha256=load_bundle(DEFAULT_BUNDLE_DIR).model_sha256)
    np.testing.assert_array_equal(lab.images, ds.x_train[want])


def test_bundle_without_recorded_splits_is_refused(counts_dir, tmp_path):
    """Without recorded splits nothing shows which images the bundle's models were trained on: refused, saying why
    and what to do. Run against the code before 2026-12-05: the split check was skipped and the bundle recalibrated
    (with split seed 1 as readily, putting its training images into the calibration split); this test failed."""
    bundle = tmp_path / "nosplits"
    shutil.copytree(DEFAULT_BUNDLE_DIR, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["provenance"]["splits"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="records no splits .* rebuild it with `certserve calibrate all`"):
        _recal(bundle, counts_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_second_recalibration_keeps_the_first_record(counts_dir, tmp_path):
    """Recalibrating twice: "recalibration" is the latest run (with its tuning cut), the earlier ones are kept in
    order in "earlier_recalibrations", and calibration_from says the build's calibration fields are superseded.
    Run against the code before 2026-12-05: the second run overwrote the first run's record (and the shipped
    bundle's); this test failed."""
    shipped = load_bundle(DEFAULT_BUNDLE_DIR).manifest.provenance["recalibration"]
    first = _recal(DEFAULT_BUNDLE_DIR, counts_dir, tmp_path / "r1")
    second = _recal(first, counts_dir, tmp_path / "r2", tune_size=20)
    prov = load_bundle(second).manifest.provenance
    assert prov["calibration_from"] == "recalibration"
    assert prov["recalibration"]["tune_size"] == 20
    assert prov["recalibration"]["tuning_cut"] == {"method": "seeded-permutation", "seed": 0, "stream": 71205}
    assert [r["tune_size"] for r in prov["earlier_recalibrations"]] == [shipped["tune_size"], 16]
    assert prov["earlier_recalibrations"][0] == shipped
    assert prov["splits"] == load_bundle(DEFAULT_BUNDLE_DIR).manifest.provenance["splits"]


def test_bundle_whose_base_model_was_declared_trained_on_part_of_the_pool_is_refused(counts_dir, tmp_path):
    """A --base build whose declared training images were kept out of its splits: `calibrate counts` rebuilds the
    plain splits, not those, so recalibration is refused (rebuild instead). Run against the code before
    2026-12-05: there was no such declaration and the bundle recalibrated; this test failed."""
    bundle = tmp_path / "byo"
    shutil.copytree(DEFAULT_BUNDLE_DIR, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["provenance"]["base_trained_on"] = {"declared": "file", "path": "seen.npy"}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="declared trained on part of the training pool"):
        _recal(bundle, counts_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("out_holds_a_bundle", [False, True])
def test_a_model_file_replaced_during_recalibration_is_not_shipped(counts_dir, tmp_path, monkeypatch,
                                                                   out_holds_a_bundle):
    """The calibration is fitted on the verified bytes of the bundle's surrogate; if the file on disk changes while
    the recalibration runs, the new bundle would ship the other model under a fresh valid hash next to that
    calibration. Refused, and no verifying bundle is left. Run against the code before this fix (2026-12-05): the
    bundle was written with the swapped surrogate; this test failed (found by review).
    ``out_holds_a_bundle`` (`calibrate conformal SRC --out DEPLOYED --overwrite`): DEPLOYED is still its old,
    loadable bundle, byte for byte. Run against the code before 2026-12-06: the new bundle was swapped into DEPLOYED
    first and its manifest then unlinked, destroying the bundle there; this case failed (found by review)."""
    import calibration.pipeline as pipeline

    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(DEFAULT_BUNDLE_DIR, src)
    if out_holds_a_bundle:
        shutil.copytree(DEFAULT_BUNDLE_DIR, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out_holds_a_bundle else None
    real = pipeline.calibrate_surrogate

    def fit_then_swap(*args, **kwargs):
        block = real(*args, **kwargs)
        shutil.copyfile(src / "base.onnx", src / "surrogate.onnx")  # another model, same shape
        return block

    monkeypatch.setattr(pipeline, "calibrate_surrogate", fit_then_swap)
    with pytest.raises(ValueError, match="changed on disk"):
        recalibrate(src, counts_dir=counts_dir, data="fashion-mnist", calibration_size=8000, surrogate_size=16000,
                    split_seed=0, tune_size=16, levels=(0.2, 0.1), out=out, overwrite=out_holds_a_bundle,
                    log=lambda *_: None)
    if out_holds_a_bundle:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert load_bundle(out).manifest.calibration is not None
    else:
        assert not (out / "manifest.json").exists()


def test_tuning_cut_first_tunes_on_the_images_the_knobs_were_chosen_on(counts_dir, tmp_path):
    """``calibrate conformal --tuning-cut first`` (what `make bundle-recalibrate` runs): the split's first tune-size
    images tune, as in the shipped bundle, whose first 1,024 are the images docs/conformal-knobs.md chose the
    default --max-bins and --scale on, so a rebuild calibrates on none of them (with the seeded random cut about 900
    of those 1,024 calibrated: knobs chosen on calibration data). Recorded as no ``tuning_cut``, which
    calibration.conformal_fit.tuning_indices reads back as those images; refused for counts of part of the split.
    Run against the code before (2026-12-07: no such option, every recalibration cut at random): failed."""
    from calibration.conformal_fit import calibrate_surrogate, tuning_indices

    with pytest.raises(ValueError, match="needs counts of the whole calibration split"):
        _recal(DEFAULT_BUNDLE_DIR, counts_dir, tmp_path / "x", first_tuning=True)
    ds = load_dataset("fashion-mnist")
    splits = make_splits(len(ds.x_train), calibration=8000, surrogate_train=16000, seed=0)
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    whole = tmp_path / "counts-8000"
    engine = SamplingEngine(bundle.backend("base", device="cpu", threads=1), sigma=0.25, num_classes=10,
                            batch_size=4096)
    compute_counts(engine, ds.x_train[splits.calibration], 2, out_dir=whole, seed=7, model_sha256=bundle.model_sha256,
                   shard_size=4000, progress=False)
    assert cli_main(["calibrate", "conformal", str(DEFAULT_BUNDLE_DIR), "--counts", str(whole), "--tune-size", "1024",
                     "--tuning-cut", "first", "--levels", "0.2", "--out", str(tmp_path / "first")]) == 0
    made = load_bundle(tmp_path / "first").manifest
    assert "tuning_cut" not in made.provenance["recalibration"]
    np.testing.assert_array_equal(tuning_indices(made.provenance, 1024, 6976, len(ds.x_train)),
                                  splits.calibration[:1024])
    counts = np.concatenate([np.load(p) for p in sorted(whole.glob("shard-*.npy"))])
    want = calibrate_surrogate(bundle.backend("surrogate", device="cpu"), ds.x_train[splits.calibration], counts, 2,
                               tune_size=1024, cut="first", levels=(0.2,), max_bins=2, scale="spread", gamma=None)
    assert made.calibration.levels[0].model_dump() == want["levels"][0]
