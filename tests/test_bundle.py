"""The bundle format: the embedded default bundle verifies, base-only bundles can be created (bring-your-own-model),
models are loaded safely (the bytes that were hashed, no external weights, batchable), and the ``certserve bundle``
CLI. That every kind of tampering is refused with a clear BundleError: tests/test_bundle_refusals.py.

Everything is real: real ONNX files (the embedded default bundle's), real onnxruntime sessions, real files under
``tmp_path``. The embedded bundle itself is never modified (tests copy it first).
"""

from __future__ import annotations

import json
import shutil

import pytest

from cli.main import main as certserve
from models.bundle import DEFAULT_BUNDLE_DIR, SCHEMA_VERSION, BundleError, create_bundle, load_bundle, sha256_file
from tests import bundle_helpers
from tests.bundle_helpers import _read_manifest

bundle_copy = bundle_helpers.bundle_copy  # the fixture

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


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
