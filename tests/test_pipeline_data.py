"""The data and model plumbing of the pipeline (``certserve calibrate``), without a pipeline run: the .npz data path
(load_npz / load_dataset), the ONNX export check (round trip through onnxruntime, dynamic batch), and the CLI's
parsing of its size and --base-trained-on arguments. The tiny end-to-end pipeline run: tests/test_pipeline.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from calibration.data import load_dataset, load_npz
from models.backends import OnnxBackend
from models.export import export_onnx
from models.networks import MetaPrior, SmallCNN
from models.priors import FEATURE_NAMES

# --------------------------------------------------------------------------------------------- the .npz data path


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_load_npz_uint8_images(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    x[0, 0, 0], x[1, 0, 0] = 0, 255
    y = rng.integers(0, 3, 50)
    ds = load_npz(_npz(tmp_path / "d.npz", x=x, y=y))
    assert ds.name == "d" and ds.classes == ["0", "1", "2"]
    assert len(ds.x_train) + len(ds.x_test) == 50 and len(ds.x_test) == 10  # default test_fraction 0.2
    for arr in (ds.x_train, ds.x_test):
        assert arr.dtype == np.float32 and arr.shape[1:] == (1, 28, 28)
        assert arr.min() >= 0.0 and arr.max() <= 1.0
    assert ds.input_shape == (1, 28, 28)
    assert ds.y_train.dtype == np.int64 and len(ds.y_train) == len(ds.x_train)
    # the split is a permutation of the input: every image keeps its label, nothing lost or duplicated
    all_x = np.concatenate([ds.x_train, ds.x_test])[:, 0]
    all_y = np.concatenate([ds.y_train, ds.y_test])
    order = np.lexsort((all_x.reshape(50, -1).T[::-1]))
    ref = (x.astype(np.float32) / 255.0)
    ref_order = np.lexsort((ref.reshape(50, -1).T[::-1]))
    np.testing.assert_array_equal(all_x[order], ref[ref_order])
    np.testing.assert_array_equal(all_y[order], y[ref_order])
    assert all_x.max() == 1.0 and all_x.min() == 0.0
    # load_dataset dispatches on the suffix
    ds2 = load_dataset(str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(ds2.x_train, ds.x_train)


def test_load_npz_with_test_set_classes_and_float_nchw(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((12, 1, 28, 28)).astype(np.float64)
    ds = load_npz(_npz(tmp_path / "f.npz", x=x, y=np.arange(12) % 4, x_test=x[:3], y_test=np.array([0, 1, 3]),
                       classes=np.array(["a", "b", "c", "d"])))
    assert ds.classes == ["a", "b", "c", "d"]
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28)
    assert ds.x_train.dtype == np.float32
    np.testing.assert_allclose(ds.x_train, x.astype(np.float32))


@pytest.mark.parametrize("case, arrays, message", [
    ("missing y", dict(x=np.zeros((4, 28, 28), np.uint8)), "must contain arrays 'x'"),
    ("missing x", dict(y=np.zeros(4, np.int64)), "must contain arrays 'x'"),
    ("float > 1", dict(x=np.full((4, 28, 28), 2.0, np.float32), y=np.zeros(4, np.int64)), "values in [0, 1]"),
    ("negative float", dict(x=np.full((4, 28, 28), -0.1), y=np.zeros(4, np.int64)), "values in [0, 1]"),
    ("nan", dict(x=np.full((4, 28, 28), np.nan), y=np.zeros(4, np.int64)), "values in [0, 1]"),
    ("length mismatch", dict(x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(5, np.int64)), "4 images but y has 5"),
    ("float labels", dict(x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4)), "integer labels"),
    ("negative labels", dict(x=np.zeros((4, 28, 28), np.uint8), y=np.array([0, -1, 0, 0])), "integer labels"),
    ("2-d labels", dict(x=np.zeros((4, 28, 28), np.uint8), y=np.zeros((4, 1), np.int64)), "1-d array"),
    ("bad image rank", dict(x=np.zeros((4, 28), np.uint8), y=np.zeros(4, np.int64)), "N x H x W"),
    ("labels exceed classes", dict(x=np.zeros((4, 28, 28), np.uint8), y=np.array([0, 1, 2, 0]),
                                   classes=np.array(["a", "b"])), "exceed the 2 classes"),
])
def test_load_npz_rejects_bad_inputs(tmp_path, case, arrays, message):
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError) as info:
        load_npz(path)
    assert message in str(info.value), (case, str(info.value))


def test_load_dataset_unknown_source():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar-10")


# --------------------------------------------------------------------------------------------- ONNX export


def test_export_onnx_round_trips_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN(1, 5, 12, 12, width_mult=4, hidden=16).eval()
    path = export_onnx(model, torch.zeros((1, 1, 12, 12)), tmp_path / "sub" / "tiny.onnx")
    assert path == tmp_path / "sub" / "tiny.onnx" and path.is_file()
    backend = OnnxBackend(path, threads=1, device="cpu")
    assert isinstance(backend.input_shape[0], str)  # symbolic (dynamic) batch axis
    assert list(backend.input_shape[1:]) == [1, 12, 12] and backend.num_outputs == 5
    gen = torch.Generator().manual_seed(42)
    for batch in (1, 7):
        x = torch.rand((batch, 1, 12, 12), generator=gen)
        with torch.no_grad():
            want = model(x).numpy()
        got = backend.forward(x.numpy())
        assert got.shape == (batch, 5)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_export_onnx_meta_prior(tmp_path):
    torch.manual_seed(0)
    model = MetaPrior().eval()
    path = export_onnx(model, torch.zeros((1, len(FEATURE_NAMES))), tmp_path / "meta.onnx", input_name="features",
                       output_name="prior")
    backend = OnnxBackend(path, threads=1, device="cpu")
    assert backend.input_name == "features" and backend.output_name == "prior"
    x = np.random.default_rng(0).normal(size=(7, len(FEATURE_NAMES))).astype(np.float32)
    got = backend.forward(x)
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.all(got > 0)


def test_cli_passes_base_trained_on_none_as_a_declaration():
    """`--base-trained-on none` declares that the model saw no image of --data; the CLI's generic 'none means unset'
    parsing turned it into None, so the documented form was refused as missing. Run against the CLI before this
    fix (2026-12-05): args.base_trained_on was None; this test failed (found by the docs review)."""
    from cli.main import build_parser

    args = build_parser().parse_args(["calibrate", "all", "--base", "m.onnx", "--base-trained-on", "none"])
    assert args.base_trained_on == "none"
    assert build_parser().parse_args(["calibrate", "all"]).base_trained_on is None


@pytest.mark.parametrize("argv", [["calibrate", "evaluate", "--images", "-9990"],
                                  ["calibrate", "evaluate", "--images", "0"],
                                  ["calibrate", "counts", "--model", "m.onnx", "--n", "10", "--sigma", "0.25",
                                   "--out", "o", "--limit", "-5"],
                                  ["calibrate", "counts", "--model", "m.onnx", "--n", "0", "--sigma", "0.25",
                                   "--out", "o"]])
def test_cli_size_arguments_must_be_positive_integers(argv, capsys):
    """`--images -9990` evaluated 10 images (a slice from the end) and `--limit -5` all but 5: silently. Run against
    the CLI before 2026-12-05: every case parsed (no SystemExit); this test failed."""
    from cli.main import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and "positive integer" in capsys.readouterr().err
