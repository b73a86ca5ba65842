"""The bundle format: every kind of tampering with a bundle (its artifacts or its manifest) is refused at load with a
clear BundleError naming what is wrong. The default bundle, creating bundles and the CLI: tests/test_bundle.py.

Everything is real: real ONNX files (the embedded default bundle's), real onnxruntime sessions, real files under
``tmp_path``. The embedded bundle itself is never modified (tests copy it first).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from models.bundle import ARTIFACT_FILES, DEFAULT_BUNDLE_DIR, SCHEMA_VERSION, BundleError, load_bundle, sha256_file
from tests import bundle_helpers
from tests.bundle_helpers import _read_manifest, _write_manifest

bundle_copy = bundle_helpers.bundle_copy  # the fixture


def _refused(root: Path, *fragments: str) -> str:
    """load_bundle(root) must raise BundleError whose message contains every fragment; returns the message."""
    with pytest.raises(BundleError) as info:
        load_bundle(root)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in BundleError message: {msg}"
    return msg


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


def test_meta_features_must_be_the_ones_the_server_computes(bundle_copy):
    """The service feeds the meta model FEATURE_NAMES in that order: a manifest naming other features (or another
    order) is refused. Run against the loader before 2026-12-05: a reordered list with a made-up name loaded."""
    manifest = _read_manifest(bundle_copy)
    manifest["meta_features"] = list(reversed(manifest["meta_features"]))[:-1] + ["nonsense_feature"]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "meta_features must be")
