"""Bring-your-own model and data, second review: what ``certserve calibrate all`` accepts from a user's ``.npz`` and
ONNX classifier, checked before any work, and the reuse of a base model from a work directory. Tiny models (8 x 8
pixels, exported here) and tiny .npz files; every random draw is seeded. Each test names what the code before this
review did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from calibration import pipeline
from calibration.config import PipelineConfig
from calibration.data import Dataset, load_npz, make_splits
from cli.main import main
from models.export import export_onnx

SIDE = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, SIDE, SIDE), dtype=np.uint8), rng.integers(0, 3, n)


# ------------------------------------------------------------------------------------------------- the .npz file

def _bad_npz_cases():
    x, y = _images(40)
    return [
        ("x_test without y_test", dict(x=x, y=y, x_test=x[:5]), "both 'x_test' and 'y_test'"),
        ("x_test and y_test lengths differ", dict(x=x, y=y, x_test=x[:5], y_test=y[:8]), "y_test 8 labels"),
        ("x_test of another image size", dict(x=x, y=y, x_test=np.zeros((5, 10, 10), np.uint8), y_test=y[:5]),
         "shaped like x's (1, 8, 8)"),
        ("duplicate class names", dict(x=x, y=y, classes=np.array(["a", "a", "b"])), "distinct, non-blank"),
        ("blank class name", dict(x=x, y=y, classes=np.array(["a", " ", "b"])), "distinct, non-blank"),
        ("classes one string", dict(x=x, y=y, classes=np.array("abc")), "1-d array of distinct"),
        ("one class", dict(x=x, y=np.zeros(40, np.int64)), "at least 2 classes"),
        ("channels last", dict(x=x[..., None], y=y), "channels last (N x H x W x C)"),
        ("int64 pixels 0-255", dict(x=x.astype(np.int64), y=y), "got int64 values in [0.0, 255.0]"),
    ]


@pytest.mark.parametrize("case, arrays, fragment", _bad_npz_cases(), ids=[c[0] for c in _bad_npz_cases()])
def test_an_npz_the_pipeline_cannot_use_is_refused_at_load_saying_what_was_expected(tmp_path, case, arrays,
                                                                                     fragment):
    """Before: x_test without y_test raised KeyError (a traceback from the CLI); x_test / y_test of different
    lengths loaded (the evaluation and the build's test accuracy, which take their first N, paired images with
    labels of a broken file silently); x_test of another size failed in onnxruntime; duplicate, blank or a single
    class name failed only in create_bundle, after the whole pipeline (hours at full size); a 0-d 'classes' raised
    TypeError; N x H x W x C images trained a network on C = H (torch RuntimeError mid-training)."""
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError) as info:
        load_npz(tmp_path / "d.npz")
    assert fragment in str(info.value), (case, str(info.value))


def test_byte_string_class_names_are_decoded(tmp_path):
    """Before: np.array([b'cat', ...]) gave classes "b'cat'", written into the bundle and every certificate."""
    x, y = _images(40)
    np.savez(tmp_path / "d.npz", x=x, y=y, classes=np.array([b"cat", b"dog", b"emu"]))
    assert load_npz(tmp_path / "d.npz").classes == ["cat", "dog", "emu"]


@pytest.mark.parametrize("content, fragment", [(b"PK\x03\x04 truncated", "not a readable .npz"),
                                               (None, "both 'x_test' and 'y_test'")])
def test_calibrate_all_reports_a_broken_npz_in_one_line(tmp_path, capsys, content, fragment):
    """Before: a truncated file raised zipfile.BadZipFile and a missing y_test KeyError: tracebacks, exit 1."""
    path = tmp_path / "d.npz"
    if content is None:
        x, y = _images(40)
        np.savez(path, x=x, y=y, x_test=x[:5])
    else:
        path.write_bytes(content)
    rc = main(["calibrate", "all", "--data", str(path), "--out", str(tmp_path / "b"), "--work", str(tmp_path / "w"),
               "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("certserve: error: ") and fragment in err, err


# ------------------------------------------------------------------------------------------- a user's own model

class _Linear(torch.nn.Module):
    def __init__(self, outputs: int):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(SIDE * SIDE, outputs)
        with torch.no_grad():
            self.layer.bias[3:] = -1000.0  # classes beyond the data's 3 never win: nothing fails while counting

    def forward(self, x):
        return self.layer(x.flatten(1))


def _user_model(path: Path, kind: str) -> Path:
    if kind == "five outputs":
        return export_onnx(_Linear(5), torch.zeros(1, 1, SIDE, SIDE), path)
    torch.onnx.export(_Linear(3), torch.zeros(1, 1, SIDE, SIDE), str(path), input_names=["input"],
                      output_names=["output"], opset_version=17, dynamo=False)  # batch axis fixed at 1
    return path


@pytest.mark.parametrize("kind, fragment", [("five outputs", "model has 5 outputs, --data expects 3"),
                                            ("fixed batch", "needs a dynamic batch axis")])
def test_a_users_model_the_bundle_would_refuse_is_refused_before_any_work(tmp_path, monkeypatch, kind, fragment):
    """``--base`` was checked for its input shape only. A model with more outputs than the data's classes ran the
    whole pipeline (counts, surrogate, calibration, meta prior) and was refused by create_bundle at the very end
    ("model has 5 outputs, manifest expects 3"); one with a fixed batch axis failed in onnxruntime (a traceback).
    Now the bundle's own model check runs first."""
    x, y = _images(400)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    model = _user_model(tmp_path / "m.onnx", kind)
    monkeypatch.setattr(pipeline, "compute_counts", lambda *a, **k: pytest.fail("counted before checking --base"))
    cfg = PipelineConfig(data=str(tmp_path / "d.npz"), base=str(model), base_trained_on="none",
                         out=str(tmp_path / "b"), work=str(tmp_path / "w"), calibration_size=120, surrogate_size=100,
                         tune_size=10, levels=(0.1,), device="cpu", progress=False)
    with pytest.raises(ValueError) as info:
        pipeline.run_pipeline(cfg, log=lambda *_: None)
    assert fragment in str(info.value) and "3 classes" in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------- reusing a trained base model

def _dataset(x: np.ndarray, y: np.ndarray) -> Dataset:
    xf = (x.astype(np.float32) / 255.0)[:, None]
    return Dataset("data", xf, y, xf[:4], y[:4], ["0", "1", "2"])


def test_a_base_model_trained_on_another_file_of_the_same_name_is_not_reused(tmp_path):
    """The work directory's base model was reused when the data's NAME (the .npz's stem), sigma, split sizes and
    seeds matched. The split indices index the file's pool: the same images in another order (a reshuffled or
    regenerated data.npz; `calibrate all` tells the user to delete the count directories it then refuses) put the
    reused model's training images into calibration (27 of 120 in the review's run), voiding the guarantee
    silently. Now the pool's images and labels are part of the record."""
    x, y = _images(60)
    cfg = PipelineConfig(sigma=0.25, base_epochs=1, seed=0, device="cpu", progress=False)
    splits = make_splits(60, calibration=20, surrogate_train=20, seed=0)
    first = pipeline._base_model(cfg, _dataset(x, y), splits, tmp_path, "cpu")
    again = pipeline._base_model(cfg, _dataset(x, y), splits, tmp_path, "cpu")  # the same pool: reused
    assert again.onnx == first.onnx and (tmp_path / "base.json").exists()
    order = np.random.default_rng(7).permutation(60)
    reshuffled = _dataset(x[order], y[order])
    seen = {img.tobytes() for img in _dataset(x, y).x_train[splits.base_train]}
    assert any(img.tobytes() in seen for img in reshuffled.x_train[splits.calibration])  # the leak it would cause
    with pytest.raises(ValueError, match="holds a base model trained otherwise"):
        pipeline._base_model(cfg, reshuffled, splits, tmp_path, "cpu")
    relabelled = _dataset(x, (y + 1) % 3)
    with pytest.raises(ValueError, match="holds a base model trained otherwise"):
        pipeline._base_model(cfg, relabelled, splits, tmp_path, "cpu")
