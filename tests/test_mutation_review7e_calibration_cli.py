"""Mutation audit, round 7e (continued from tests/test_mutation_review7e.py): the CLI-facing part of calibration.cli
(argument parsing and checks, what is forwarded, where outputs go) and ``certserve bundle create``.

Each test names the mutant it guards against (injected by editing the code once, in a private clone, never
committed) and was run against it: it failed with the mutant and passes without it. Two are regression tests of real
bugs this round found and fixed in calibration/cli.py: each failed on the code before the fix.
"""

from __future__ import annotations

import json

import pytest

from test_mutation_review7e import run_cli

# ---------------------------------------------------------------------------------------------- calibration.cli
def test_calibrate_all_parses_its_flags_as_the_config_types():
    """Mutants: "none" no longer unsets an optional flag (``--gamma none`` refused), ``--no-progress`` missing (a
    store_true flag whose default is True cannot be turned off), a trailing comma in a list refused, and an int flag
    parsed as float (``--calibration-size 8000`` then refused by the config as not an integer)."""
    from cli.main import build_parser

    args = build_parser().parse_args(["calibrate", "all", "--gamma", "none", "--no-progress", "--levels", "0.1,0.05,",
                                      "--calibration-size", "8000", "--limit", "None"])
    assert args.gamma is None and args.progress is False and args.levels == (0.1, 0.05)
    assert args.calibration_size == 8000 and isinstance(args.calibration_size, int) and args.limit is None
    assert build_parser().parse_args(["calibrate", "all", "--gamma", "0.2"]).gamma == 0.2


def test_calibrate_all_records_the_command_it_was_given(monkeypatch, tmp_path):
    """Real bug (fixed here): ``calibrate all`` recorded ``sys.argv`` as the bundle's provenance command, not the
    arguments ``main(argv)`` parsed (``calibrate conformal`` records those): run from Python (a build script, a test)
    the bundle claimed to be built by the host process's command line. Run against the code before the fix: failed
    (the recorded command was pytest's)."""
    import calibration.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg, command: seen.update(command=command, cfg=cfg))
    assert run_cli("calibrate", "all", "--sigma", "0.5", "--out", tmp_path / "b", "--work", tmp_path / "w") == 0
    assert seen["command"] == f"certserve calibrate all --sigma 0.5 --out {tmp_path / 'b'} --work {tmp_path / 'w'}"
    assert seen["cfg"].sigma == 0.5 and seen["cfg"].out == str(tmp_path / "b")


@pytest.mark.parametrize("flags, message", [
    (["--levels", ""], "--levels must be one or more comma-separated risk levels strictly between 0 and 1, got ''"),
    (["--levels", "0.1,a"], "--levels must be one or more comma-separated risk levels strictly between 0 and 1, got "
                            "'0.1,a'"),
    (["--max-bins", "0"], "--max-bins must be an integer >= 1, got 0"),
])
def test_calibrate_conformal_refuses_unusable_levels_and_bins_naming_the_flag(monkeypatch, tmp_path, capsys, flags,
                                                                               message):
    """Real bug (fixed here): ``calibrate conformal --max-bins 0`` was refused only after the calibration was fitted,
    with a false reason ("32 calibration images are too few for any level", whatever the number of images), and
    ``--levels ''`` / ``--levels 0.1,a`` said "max() arg is an empty sequence" / "could not convert string to float:
    'a'", naming no flag (``calibrate all`` names the flag and what it expects). Run against the code before the fix:
    all three failed."""
    import calibration.pipeline as pipeline
    from models.bundle import DEFAULT_BUNDLE_DIR

    monkeypatch.setattr(pipeline, "recalibrate", lambda *a, **k: pytest.fail("the recalibration must not start"))
    assert run_cli("calibrate", "conformal", DEFAULT_BUNDLE_DIR, "--counts", tmp_path / "counts", "--tune-size", "16",
                   *flags, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err == f"certserve: error: {message}\n", err
    assert not (tmp_path / "out").exists()


def test_calibrate_conformal_forwards_its_options(monkeypatch, tmp_path):
    """Mutants: ``calibrate conformal`` passes gamma=None (a training-conditional calibration asked for, a marginal
    one written), scale="spread" whatever --scale, or overwrite=True without --overwrite (an existing bundle at
    --out replaced)."""
    import calibration.pipeline as pipeline
    from models.bundle import DEFAULT_BUNDLE_DIR

    seen = {}
    monkeypatch.setattr(pipeline, "recalibrate", lambda bundle, **kw: seen.update(kw, bundle=bundle))
    assert run_cli("calibrate", "conformal", DEFAULT_BUNDLE_DIR, "--counts", tmp_path / "c", "--tune-size", "16",
                   "--gamma", "0.2", "--scale", "unit", "--levels", "0.2,0.1", "--max-bins", "3",
                   "--out", tmp_path / "out") == 0
    assert (seen["gamma"], seen["scale"], seen["levels"], seen["max_bins"], seen["overwrite"]) == \
        (0.2, "unit", (0.2, 0.1), 3, False)
    assert (seen["counts_dir"], seen["out"], seen["tune_size"]) == (str(tmp_path / "c"), str(tmp_path / "out"), 16)
    assert run_cli("calibrate", "conformal", DEFAULT_BUNDLE_DIR, "--counts", tmp_path / "c", "--tune-size", "16",
                   "--out", tmp_path / "out", "--overwrite") == 0
    assert seen["overwrite"] is True and seen["gamma"] is None and seen["scale"] == "spread"


def test_bundle_create_strips_class_names(tmp_path, capsys):
    """Mutant: ``--classes "a, b, ..."`` keeps the blanks after each comma (class names " b", ...: refused as not
    distinct and non-blank, or certificates naming " b")."""
    from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle

    names = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
    assert run_cli("bundle", "create", "--base", DEFAULT_BUNDLE_DIR / "base.onnx", "--sigma", "0.25",
                   "--input-shape", "1,28,28", "--classes", ", ".join(names), "--out", tmp_path / "b") == 0
    assert list(load_bundle(tmp_path / "b").manifest.classes) == names


def test_calibrate_counts_counts_what_its_flags_name(tmp_path, capsys):
    """Mutants: ``calibrate counts`` ignores --seed, --split-seed, --calibration-size or --limit on the test split,
    or records no model hash (then ``calibrate conformal`` cannot tell counts of another model)."""
    from calibration.counts import images_digest
    from calibration.data import load_dataset, make_splits
    from models.bundle import DEFAULT_BUNDLE_DIR, sha256_file

    ds = load_dataset("fashion-mnist")
    base = DEFAULT_BUNDLE_DIR / "base.onnx"
    common = ["calibrate", "counts", "--model", base, "--n", "2", "--sigma", "0.25", "--device", "cpu", "--limit", "3"]
    assert run_cli(*common, "--split", "calibration", "--split-seed", "3", "--calibration-size", "9000", "--seed", "5",
                   "--out", tmp_path / "cal") == 0
    meta = json.loads((tmp_path / "cal" / "meta.json").read_text())
    want = make_splits(len(ds.x_train), calibration=9000, surrogate_train=16000, seed=3).limited(3).calibration
    assert meta["images_sha256"] == images_digest(ds.x_train[want])
    assert (meta["seed"], meta["num_images"], meta["model_sha256"]) == (5, 3, sha256_file(base))
    assert run_cli(*common, "--out", tmp_path / "test") == 0
    meta = json.loads((tmp_path / "test" / "meta.json").read_text())
    assert meta["images_sha256"] == images_digest(ds.x_test[:3]) and meta["seed"] == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["out"] == str(tmp_path / "test")
