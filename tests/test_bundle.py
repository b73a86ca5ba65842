"""The bundle format: the embedded default bundle verifies, every kind of tampering is refused with a clear
BundleError, base-only bundles can be created (bring-your-own-model), and the ``certserve bundle`` CLI.

Everything is real: real ONNX files (the embedded default bundle's), real onnxruntime sessions, real files under
``tmp_path``. The embedded bundle itself is never modified (tests copy it first).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.bundle import (ARTIFACT_FILES, DEFAULT_BUNDLE_DIR, SCHEMA_VERSION, BundleError, create_bundle,
                           load_bundle, sha256_file)
from cli.main import main as certserve

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    """A private copy of the embedded default bundle that a test may tamper with."""
    dst = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, dst)
    return dst


def _read_manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root: Path, manifest: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _refused(root: Path, *fragments: str) -> str:
    """load_bundle(root) must raise BundleError whose message contains every fragment; returns the message."""
    with pytest.raises(BundleError) as info:
        load_bundle(root)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in BundleError message: {msg}"
    return msg


# --------------------------------------------------------------------------------------------- the default bundle


def test_default_bundle_loads_and_verifies():
    """The embedded bundle is the one the server, README and docs describe (the schema itself is the validators' job,
    tested by the refusals below)."""
    from models.priors import FEATURE_NAMES

    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    m = bundle.manifest
    assert (m.name, m.sigma, m.input.shape) == ("fmnist-sigma0.25", 0.25, (1, 28, 28))
    assert m.classes == FMNIST_CLASSES
    assert set(m.artifacts) == {"base", "surrogate", "meta"}
    assert m.calibration.alpha_cal == 0.001  # the server's default request alpha answers from the surrogate
    assert [lv.alpha for lv in m.calibration.levels] == [0.1, 0.05, 0.01, 0.005, 0.001]  # the whole risk ladder
    assert m.calibration.samples_per_image >= 10_000  # labels strong enough not to cap the radius below Cohen-10k's
    assert m.meta_features == list(FEATURE_NAMES)  # the order models.priors computes the features in
    assert load_bundle().manifest == m  # the default call is the embedded bundle too


def test_default_bundle_backends_have_the_manifest_shapes():
    import numpy as np

    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    for role in ("base", "surrogate"):
        out = bundle.backend(role, threads=1, device="cpu").forward(x)
        assert out.shape == (3, 10) and np.all(np.isfinite(out))
    prior = bundle.backend("meta", threads=1, device="cpu").forward(np.zeros((2, 4), np.float32))
    assert prior.shape == (2, 2) and np.all(prior > 0)  # Beta parameters


# --------------------------------------------------------------------------------------------- tampering refused


def test_changed_byte_in_base_is_refused(bundle_copy):
    path = bundle_copy / "base.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    msg = _refused(bundle_copy, "artifact base", "sha256", "base.onnx", "tampered or corrupt")
    assert _read_manifest(bundle_copy)["artifacts"]["base"]["sha256"] in msg


def test_changed_byte_in_meta_is_refused(bundle_copy):
    path = bundle_copy / "meta.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    _refused(bundle_copy, "artifact meta", "tampered or corrupt")


@pytest.mark.parametrize("role", ["base", "surrogate"])
def test_missing_artifact_is_refused(bundle_copy, role):
    (bundle_copy / ARTIFACT_FILES[role]).unlink()
    _refused(bundle_copy, f"artifact {role}", ARTIFACT_FILES[role], "is missing")


def test_wrong_input_shape_in_manifest_is_refused(bundle_copy):
    manifest = _read_manifest(bundle_copy)
    manifest["input"]["shape"] = [1, 32, 32]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "artifact base", "input shape", "[1, 28, 28]", "[1, 32, 32]")


def test_wrong_channel_count_in_manifest_is_refused(bundle_copy):
    manifest = _read_manifest(bundle_copy)
    manifest["input"]["shape"] = [3, 28, 28]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "input shape", "[3, 28, 28]")


def test_nonpositive_input_dimension_is_refused(bundle_copy):
    manifest = _read_manifest(bundle_copy)
    manifest["input"]["shape"] = [1, 0, 28]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "does not match the bundle schema", ">= 1")


def test_wrong_number_of_classes_is_refused(bundle_copy):
    manifest = _read_manifest(bundle_copy)
    manifest["classes"] = manifest["classes"][:9]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "10 outputs", "expects 9")


def test_single_class_is_refused(bundle_copy):
    manifest = _read_manifest(bundle_copy)
    manifest["classes"] = ["only"]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "does not match the bundle schema", "classes")


@pytest.mark.parametrize("version", [3, 0, "1", None])
def test_unsupported_schema_version_is_refused(bundle_copy, version):
    manifest = _read_manifest(bundle_copy)
    manifest["schema_version"] = version
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "schema_version", repr(version), "not supported", f"expected {SCHEMA_VERSION}")


def test_missing_schema_version_is_refused(bundle_copy):
    manifest = _read_manifest(bundle_copy)
    del manifest["schema_version"]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "schema_version None is not supported")


def test_invalid_json_manifest_is_refused(bundle_copy):
    text = (bundle_copy / "manifest.json").read_text()
    (bundle_copy / "manifest.json").write_text(text[: len(text) // 2])  # truncated
    _refused(bundle_copy, "manifest.json", "is not valid JSON")


def test_non_object_manifest_is_refused(bundle_copy):
    (bundle_copy / "manifest.json").write_text("[1, 2, 3]")
    _refused(bundle_copy, "schema_version", "not supported")


def test_missing_manifest_is_refused(bundle_copy):
    (bundle_copy / "manifest.json").unlink()
    _refused(bundle_copy, "manifest.json", "is missing", "base.onnx")


def test_missing_bundle_directory_is_refused(tmp_path):
    _refused(tmp_path / "nope", "does not exist")


@pytest.mark.parametrize("name", ["../x.onnx", "sub/base.onnx", "/etc/base.onnx"])
def test_artifact_path_separator_is_refused(bundle_copy, name):
    manifest = _read_manifest(bundle_copy)
    # a file that does exist outside the bundle must not be reachable either
    outside = bundle_copy.parent / "x.onnx"
    shutil.copyfile(bundle_copy / "base.onnx", outside)
    manifest["artifacts"]["base"]["file"] = name
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "artifact base", repr(name), "plain name inside the bundle")


def test_surrogate_without_calibration_is_refused(bundle_copy):
    manifest = _read_manifest(bundle_copy)
    manifest["calibration"] = None
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "does not match the bundle schema", "surrogate needs its conformal 'calibration' block")


def test_meta_without_features_is_refused(bundle_copy):
    manifest = _read_manifest(bundle_copy)
    manifest["meta_features"] = None
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "meta model needs 'meta_features'")


def test_level_alpha_not_delta_plus_alpha_1_is_refused(bundle_copy):
    manifest = _read_manifest(bundle_copy)
    manifest["calibration"]["levels"][0]["alpha"] = 0.2  # delta + alpha_1 = 0.1
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "level alpha (0.2) must equal delta + alpha_1")


def test_level_whose_delta_plus_alpha_1_exceeds_alpha_in_exact_arithmetic_is_refused(bundle_copy):
    """delta + alpha_1 must not exceed the alpha a certificate reports, in exact arithmetic: the old level_split's
    delta 0.009000000000000001 (with alpha_1 0.001) overshoots 0.01 by ~9e-19. Run against the loader with only the
    relative-tolerance check (before 2026-12-05): it loaded; so did the embedded bundle, which carried that delta."""
    manifest = _read_manifest(bundle_copy)
    level = manifest["calibration"]["levels"][2]
    assert (level["alpha"], level["delta"], level["alpha_1"]) == (0.01, 0.009, 0.001)
    level["delta"] = 0.009000000000000001
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "exact arithmetic", "overstate its level")


def test_every_embedded_level_is_level_splits_exactly():
    """The shipped ladder's (delta, alpha_1) are smoothing.conformal.level_split's, whose sum never exceeds alpha."""
    from smoothing.conformal import level_split

    for level in load_bundle(DEFAULT_BUNDLE_DIR).manifest.calibration.levels:
        assert (level.delta, level.alpha_1) == level_split(level.alpha), level.alpha


def test_finite_quantile_in_a_bin_too_small_for_its_level_is_refused(bundle_copy):
    """A bin with fewer scores than its level's minimum has no finite conformal quantile (its rank exceeds m): a
    manifest claiming one is refused. Run against the loader without this check (before 2026-12-05): it loaded."""
    manifest = _read_manifest(bundle_copy)
    level = manifest["calibration"]["levels"][-1]  # alpha 0.001: delta 0.0009 needs 1111 scores per bin
    assert level["alpha"] == 0.001 and level["q_hat"][0] is not None
    level["bin_sizes"][0] = 1110
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "a bin with fewer than 1111 calibration scores", "its q_hat must be null")


def test_bins_that_do_not_hold_every_calibration_score_are_refused(bundle_copy):
    """num_calibration must be what every level's bins hold. Run against the loader before 2026-12-05: a manifest
    claiming 80,000 calibration images over bins of 6,976 loaded."""
    manifest = _read_manifest(bundle_copy)
    manifest["calibration"]["num_calibration"] = 80000
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "do not hold the num_calibration = 80000")


def test_bundle_states_the_hash_of_the_manifest_it_loaded(bundle_copy):
    """The manifest is trusted input; its sha256 (what certificates and /v1/models state) changes with any edit."""
    before = load_bundle(bundle_copy, check_models=False).manifest_sha256
    assert before == sha256_file(bundle_copy / "manifest.json")
    manifest = _read_manifest(bundle_copy)
    manifest["calibration"]["levels"][0]["q_hat"] = [q - 1 if q is not None else None
                                                      for q in manifest["calibration"]["levels"][0]["q_hat"]]
    _write_manifest(bundle_copy, manifest)
    assert load_bundle(bundle_copy, check_models=False).manifest_sha256 != before


def test_old_calibration_block_is_refused_and_can_be_recalibrated(bundle_copy):
    """A schema-1 bundle with the old probability-unit calibration is refused for serving with the command that
    fixes it; ``for_recalibration`` loads it (models verified, calibration dropped) for that command."""
    manifest = _read_manifest(bundle_copy)
    manifest["schema_version"] = 1
    manifest["calibration"] = {"alpha_cal": 0.001, "delta": 0.0009, "alpha_1": 0.0001, "q_hat": 2.475,
                               "score_epsilon": 0.03, "num_calibration": 8000, "samples_per_image": 1000}
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "schema_version 1 holds the old surrogate calibration", "certserve calibrate conformal")
    old = load_bundle(bundle_copy, for_recalibration=True)
    assert old.manifest.calibration is None and set(old.manifest.artifacts) == {"base", "surrogate", "meta"}


def test_schema_1_bundle_without_surrogate_still_loads(bundle_copy):
    manifest = _read_manifest(bundle_copy)
    manifest.update(schema_version=1, calibration=None, meta_features=None)
    manifest["artifacts"] = {"base": manifest["artifacts"]["base"]}
    _write_manifest(bundle_copy, manifest)
    assert load_bundle(bundle_copy).manifest.schema_version == SCHEMA_VERSION


def test_missing_base_artifact_entry_is_refused(bundle_copy):
    manifest = _read_manifest(bundle_copy)
    del manifest["artifacts"]["base"]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "artifacts must include 'base'")


def test_unknown_manifest_field_is_refused(bundle_copy):
    manifest = _read_manifest(bundle_copy)
    manifest["surprise"] = 1
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "does not match the bundle schema", "surprise")


def test_bad_sha256_format_is_refused(bundle_copy):
    manifest = _read_manifest(bundle_copy)
    manifest["artifacts"]["base"]["sha256"] = "XYZ"
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "does not match the bundle schema", "sha256")


def test_non_onnx_artifact_with_matching_hash_is_refused(bundle_copy):
    """A file whose hash matches the manifest but that is not an ONNX model: refused at session creation."""
    (bundle_copy / "meta.onnx").write_bytes(b"not an onnx model")
    manifest = _read_manifest(bundle_copy)
    manifest["artifacts"]["meta"]["sha256"] = sha256_file(bundle_copy / "meta.onnx")
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "artifact meta", "meta.onnx", "not a loadable ONNX model")


def test_swapped_meta_model_fails_shape_check(bundle_copy):
    """meta.onnx replaced by an image model (re-hashed, so only the shape check can catch it)."""
    shutil.copyfile(bundle_copy / "base.onnx", bundle_copy / "meta.onnx")
    manifest = _read_manifest(bundle_copy)
    manifest["artifacts"]["meta"]["sha256"] = sha256_file(bundle_copy / "meta.onnx")
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "artifact meta", "input shape", "[4]")


# --------------------------------------------------------------------------------------------- create_bundle


def test_create_base_only_bundle(tmp_path):
    out = tmp_path / "byom"
    bundle = create_bundle(out, base=DEFAULT_BUNDLE_DIR / "base.onnx", sigma=0.25, input_shape=(1, 28, 28),
                           classes=FMNIST_CLASSES, provenance={"created_by": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["base.onnx", "manifest.json"]
    reloaded = load_bundle(out)
    m = reloaded.manifest
    assert m.name == "byom"
    assert set(m.artifacts) == {"base"}
    assert m.calibration is None and m.meta_features is None
    assert reloaded.path("surrogate") is None and reloaded.path("meta") is None
    assert m.artifacts["base"].sha256 == sha256_file(DEFAULT_BUNDLE_DIR / "base.onnx")
    assert m.provenance == {"created_by": "test"}
    assert bundle.model_sha256 == reloaded.model_sha256
    with pytest.raises(BundleError, match="has no surrogate model"):
        reloaded.backend("surrogate")
    # the written manifest is plain JSON that round-trips
    assert _read_manifest(out)["schema_version"] == SCHEMA_VERSION


def test_create_bundle_refuses_non_empty_dir_without_overwrite(tmp_path):
    out = tmp_path / "byom"
    out.mkdir()
    (out / "something.txt").write_text("keep me")
    with pytest.raises(BundleError, match="exists and is not empty") as info:
        create_bundle(out, base=DEFAULT_BUNDLE_DIR / "base.onnx", sigma=0.25, input_shape=(1, 28, 28),
                      classes=FMNIST_CLASSES)
    assert "overwrite" in str(info.value)
    assert (out / "something.txt").read_text() == "keep me"
    assert not (out / "manifest.json").exists()
    bundle = create_bundle(out, base=DEFAULT_BUNDLE_DIR / "base.onnx", sigma=0.5, input_shape=(1, 28, 28),
                           classes=FMNIST_CLASSES, overwrite=True)
    assert bundle.manifest.sigma == 0.5


def test_create_bundle_in_place_over_its_own_base(tmp_path):
    """Re-creating a bundle from its own base.onnx (src == dst) with overwrite keeps the file intact."""
    out = tmp_path / "byom"
    create_bundle(out, base=DEFAULT_BUNDLE_DIR / "base.onnx", sigma=0.25, input_shape=(1, 28, 28),
                  classes=FMNIST_CLASSES)
    bundle = create_bundle(out, base=out / "base.onnx", sigma=0.25, input_shape=(1, 28, 28),
                           classes=FMNIST_CLASSES, name="again", overwrite=True)
    assert bundle.manifest.name == "again"
    assert sha256_file(out / "base.onnx") == sha256_file(DEFAULT_BUNDLE_DIR / "base.onnx")


def test_create_bundle_refuses_missing_base(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        create_bundle(tmp_path / "b", base=tmp_path / "nope.onnx", sigma=0.25, input_shape=(1, 28, 28),
                      classes=FMNIST_CLASSES)


def test_create_bundle_refuses_wrong_class_count(tmp_path):
    with pytest.raises(BundleError, match="10 outputs, manifest expects 3"):
        create_bundle(tmp_path / "b", base=DEFAULT_BUNDLE_DIR / "base.onnx", sigma=0.25, input_shape=(1, 28, 28),
                      classes=["a", "b", "c"])


# --------------------------------------------------------------------------------------------- the CLI


CLASSES_ARG = ",".join(f"c{i}" for i in range(10))


def test_cli_bundle_create_and_verify(tmp_path, capsys):
    out = tmp_path / "cli-bundle"
    rc = certserve(["bundle", "create", "--base", str(DEFAULT_BUNDLE_DIR / "base.onnx"), "--sigma", "0.25",
                    "--input-shape", "1,28,28", "--classes", CLASSES_ARG, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "written to" in captured.out and "sequential" in captured.out
    m = load_bundle(out).manifest
    assert m.classes == [f"c{i}" for i in range(10)]
    assert m.sigma == 0.25 and m.input.shape == (1, 28, 28)
    assert m.provenance["created_by"] == "certserve bundle create"

    rc = certserve(["bundle", "verify", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert report == {"name": "cli-bundle", "sigma": 0.25, "artifacts": ["base"], "alpha_cal": None, "ok": True}

    # the non-empty output directory is refused without --overwrite, accepted with it
    args = ["bundle", "create", "--base", str(DEFAULT_BUNDLE_DIR / "base.onnx"), "--sigma", "0.5",
            "--input-shape", "1,28,28", "--classes", CLASSES_ARG, "--out", str(out)]
    assert certserve(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert certserve([*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert load_bundle(out).manifest.sigma == 0.5


def test_cli_verify_default_bundle(capsys):
    assert certserve(["bundle", "verify", str(DEFAULT_BUNDLE_DIR)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["artifacts"] == ["base", "meta", "surrogate"]
    assert report["alpha_cal"] == pytest.approx(0.001)


@pytest.mark.parametrize("shape", ["1,28", "1,28,28,1", "a,b,c", "1x28x28", ""])
def test_cli_bundle_create_bad_input_shape(tmp_path, capsys, shape):
    out = tmp_path / "bad"
    rc = certserve(["bundle", "create", "--base", str(DEFAULT_BUNDLE_DIR / "base.onnx"), "--sigma", "0.25",
                    "--input-shape", shape, "--classes", CLASSES_ARG, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--input-shape must be C,H,W" in err and repr(shape) in err
    assert not out.exists()


def test_cli_bundle_create_shape_mismatch_exits_2(tmp_path, capsys):
    rc = certserve(["bundle", "create", "--base", str(DEFAULT_BUNDLE_DIR / "base.onnx"), "--sigma", "0.25",
                    "--input-shape", "1,32,32", "--classes", CLASSES_ARG, "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("certserve: error:") and "input shape" in err


def test_cli_bundle_verify_tampered_exits_2(bundle_copy, capsys):
    path = bundle_copy / "surrogate.onnx"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x10
    path.write_bytes(bytes(data))
    assert certserve(["bundle", "verify", str(bundle_copy)]) == 2
    err = capsys.readouterr().err
    assert "certserve: error:" in err and "artifact surrogate" in err and "tampered" in err


def test_cli_bundle_verify_missing_dir_exits_2(tmp_path, capsys):
    assert certserve(["bundle", "verify", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_model_with_weights_in_external_files_is_refused(tmp_path, monkeypatch):
    """ONNX external data keeps weights in files the manifest's sha256 does not cover (flipping them changed 253 of
    256 labels while the bundle still verified). Refused whatever the working directory (onnxruntime would look for
    the weights there). Run against the loader before 2026-12-05: the bundle loaded; and against the first fix (same
    day), with the bundle directory as working directory: it loaded."""
    import numpy as np
    import onnx
    import torch

    from models.export import export_onnx

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    plain = export_onnx(net, torch.zeros(1, 1, 28, 28), tmp_path / "plain.onnx")
    model = onnx.load(str(plain))
    split = tmp_path / "split"
    split.mkdir()
    onnx.save_model(model, str(split / "base.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (split / "weights.bin").stat().st_size > 0
    monkeypatch.chdir(split)
    with pytest.raises(BundleError, match="external data"):
        create_bundle(split, base=split / "base.onnx", sigma=0.25, input_shape=(1, 28, 28),
                      classes=[str(i) for i in range(10)], overwrite=True)
    assert np.isfinite(load_bundle(create_bundle(tmp_path / "ok", base=plain, sigma=0.25, input_shape=(1, 28, 28),
                                                 classes=[str(i) for i in range(10)]).root).backend("base", device="cpu")
                       .forward(np.zeros((1, 1, 28, 28), np.float32))).all()


def test_a_model_file_replaced_after_loading_is_never_served(bundle_copy):
    """Sessions load the bytes whose sha256 was checked, not the file again. Run against the loader before
    2026-12-05: after base.onnx was swapped for the surrogate, backend('base') served the surrogate; this failed."""
    import numpy as np

    bundle = load_bundle(bundle_copy)
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    before = bundle.backend("base", device="cpu", threads=1).forward(x)
    shutil.copyfile(bundle_copy / "surrogate.onnx", bundle_copy / "base.onnx")
    after = bundle.backend("base", device="cpu", threads=1).forward(x)
    assert np.array_equal(before, after)


def test_meta_features_must_be_the_ones_the_server_computes(bundle_copy):
    """The service feeds the meta model FEATURE_NAMES in that order: a manifest naming other features (or another
    order) is refused. Run against the loader before 2026-12-05: a reordered list with a made-up name loaded."""
    manifest = _read_manifest(bundle_copy)
    manifest["meta_features"] = list(reversed(manifest["meta_features"]))[:-1] + ["nonsense_feature"]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "meta_features must be")


@pytest.mark.parametrize("kind", ["fixed_batch_of_one", "rank_three_output"])
def test_a_model_the_engine_cannot_batch_is_refused_at_load(tmp_path, kind):
    """A fixed batch axis of 1, or (N, 1, K) outputs, loaded and then failed on the first sampling batch with an
    obscure onnxruntime/numpy error. A probe pass on a batch of 2 refuses them at load. Run against the loader
    before 2026-12-05: both loaded; this test failed."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(784, 10)

        def forward(self, x):
            out = self.fc(x.reshape(x.shape[0], -1))
            return out[:, None, :] if kind == "rank_three_output" else out

    path = tmp_path / "m.onnx"
    dynamic = None if kind == "fixed_batch_of_one" else {"input": {0: "batch"}, "output": {0: "batch"}}
    torch.onnx.export(Net(), torch.zeros(1, 1, 28, 28), str(path), input_names=["input"], output_names=["output"],
                      dynamic_axes=dynamic, dynamo=False)
    with pytest.raises(BundleError, match="batch of 2"):
        create_bundle(tmp_path / "b", base=path, sigma=0.25, input_shape=(1, 28, 28), classes=[str(i) for i in range(10)])
