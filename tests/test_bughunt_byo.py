"""Bring-your-own data and models, bug hunt: what ``certserve calibrate counts / evaluate / all`` accept from a user's
``.npz``, model and flags. Every case below was accepted (silently, or with a traceback, or only after all the work)
by the code before this review, and each test failed there. Tiny data (8 x 8 or 28 x 28 pixels, a few dozen images),
the shipped bundle's base model, every random draw seeded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration import pipeline
from calibration.config import PipelineConfig
from calibration.counts import compute_counts
from calibration.data import load_npz
from calibration.train import train_surrogate
from cli.main import build_parser, main
from models.backends import OnnxBackend
from models.bundle import DEFAULT_BUNDLE_DIR
from models.sampling import SamplingEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

BASE = str(DEFAULT_BUNDLE_DIR / "base.onnx")  # 1 x 28 x 28 images, 10 classes


def _npz(path, side: int = 28, classes: int = 3, n: int = 40, **extra):
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (n, side, side), dtype=np.uint8), y=rng.integers(0, classes, n), **extra)
    return str(path)


def _one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("certserve: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------- data that does not fit the bundle / model

@pytest.mark.parametrize("side, classes, fragment", [(8, 10, "shape (1, 8, 8)"), (28, 3, "in 3 classes"),
                                                     (28, 12, "in 12 classes")])
def test_evaluate_refuses_data_the_bundle_was_not_built_for(tmp_path, capsys, side, classes, fragment):
    """``calibrate evaluate BUNDLE --data other.npz``: 8 x 8 images failed inside onnxruntime (a traceback, exit 1);
    3- or 12-class data wrote a report (exit 0) scoring the bundle's 10 classes against labels of other meaning."""
    data = _npz(tmp_path / "d.npz", side, classes)
    rc = main(["calibrate", "evaluate", str(DEFAULT_BUNDLE_DIR), "--data", data, "--images", "3", "--n", "10",
               "--n0", "2", "--out", str(tmp_path / "r.md")])
    err = _one_line_error(capsys, rc)
    assert fragment in err and "(1, 28, 28) in 10 classes" in err, err
    assert not (tmp_path / "r.md").exists()


class _Linear(torch.nn.Module):
    def __init__(self, outputs: int):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(28 * 28, outputs)

    def forward(self, x):
        return self.layer(x.flatten(1))


@pytest.mark.parametrize("model, side, classes, fragment", [
    ("shipped", 8, 10, "does not match --data (batch, [1, 8, 8])"),
    ("shipped", 28, 3, "model has 10 outputs, --data expects 3"),
    ("shipped", 28, 12, "model has 10 outputs, --data expects 12"),
    ("torchscript, 5 outputs", 28, 3, "takes images of shape (1, 28, 28) in 5 classes")])
def test_counts_refuses_a_model_that_does_not_fit_the_data(tmp_path, capsys, model, side, classes, fragment):
    """``calibrate counts``: a model of another input shape failed in onnxruntime (a traceback, exit 1) after
    meta.json had claimed --out for that run; one with more outputs than classes failed only where a noisy copy
    happened to predict one ("the bundle declares ..."), one with fewer (10 outputs, 12 classes) counted silently."""
    if model == "shipped":
        path = BASE
    else:
        path = str(tmp_path / "m.pt")
        torch.jit.trace(_Linear(5).eval(), torch.zeros(1, 1, 28, 28)).save(path)
    data = _npz(tmp_path / "d.npz", side, classes)
    rc = main(["calibrate", "counts", "--model", path, "--data", data, "--n", "4", "--sigma", "0.25",
               "--device", "cpu", "--out", str(tmp_path / "c")])
    assert fragment in _one_line_error(capsys, rc)
    assert not (tmp_path / "c" / "meta.json").exists()


@pytest.mark.parametrize("argv", [["calibrate", "counts", "--model", "m.onnx", "--n", "4", "--sigma", "0.25",
                                   "--out", "o", "--seed", "-1"],
                                  ["calibrate", "counts", "--model", "m.onnx", "--n", "4", "--sigma", "0.25",
                                   "--out", "o", "--split-seed", "-2"],
                                  ["calibrate", "counts", "--model", "m.onnx", "--n", "4", "--sigma", "inf",
                                   "--out", "o"],
                                  ["calibrate", "conformal", "b", "--counts", "c", "--tune-size", "5", "--out", "o",
                                   "--split-seed", "-1"],
                                  ["calibrate", "evaluate", "--seed", "-3"]])
def test_seeds_and_sigma_of_the_commands_are_checked_when_parsed(argv, capsys):
    """``--seed -1`` parsed; counts then wrote meta.json and failed with numpy's "expected non-negative integer"
    (no flag named), and the rerun with a valid seed was refused: "--out holds counts of a different run".
    ``--sigma inf`` counted noise that makes every logit NaN: all-zero counts, exit 0."""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and ("integer >= 0" in err or "finite number" in err), err


# ------------------------------------------------------------------------------------------------- the .npz file

@pytest.mark.parametrize("arrays, fragment", [
    (dict(x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, np.int64)), "x_test holds no images"),
    (dict(binary=True), "hold only the values 0 and 1"),
    (dict(x=np.zeros((40, 1, 0, 8), np.uint8)), "images of no pixels")], ids=["empty test", "0/1 uint8", "0 x 8"])
def test_an_npz_of_no_test_images_binary_uint8_or_empty_images_is_refused(tmp_path, arrays, fragment):
    """Before: an empty x_test built a bundle recording null test accuracies (NaN) and broke ``calibrate evaluate``
    ("need at least one array to stack"); 0/1 images stored as uint8 were read as 0 and 1/255 (every image all but
    black, silently); images of 0 x 8 pixels failed mid-training (torch's traceback)."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), rng.integers(0, 3, 40)
    if arrays.pop("binary", False):
        x = (x > 127).astype(np.uint8)
    np.savez(tmp_path / "d.npz", **{"x": x, "y": y, **arrays})
    with pytest.raises(ValueError) as info:
        load_npz(tmp_path / "d.npz")
    assert fragment in str(info.value), str(info.value)


# -------------------------------------------------------------------------------------------- calibrate all

def _config(tmp_path, data, **kw) -> PipelineConfig:
    return PipelineConfig(**{"data": data, "out": str(tmp_path / "b"), "work": str(tmp_path / "w"),
                             "calibration_size": 20, "surrogate_size": 10, "tune_size": 5, "levels": (0.5,),
                             "base_epochs": 1, "surrogate_epochs": 1, "train_samples": 4, "cal_samples": 8,
                             "device": "cpu", "progress": False, **kw})


@pytest.mark.parametrize("work", ["b", "b/work"])
def test_a_work_directory_inside_the_bundle_directory_is_refused_before_any_work(tmp_path, monkeypatch, work):
    """``--out X --work X`` (or X/work) trained, counted and calibrated, then create_bundle refused X as "exists
    and is not empty": the work files it had written there."""
    data = _npz(tmp_path / "d.npz", side=8, n=60)
    monkeypatch.setattr(pipeline, "train_base", lambda *a, **k: pytest.fail("trained before checking --work"))
    with pytest.raises(ValueError, match="use a --work outside --out"):
        pipeline.run_pipeline(_config(tmp_path, data, work=str(tmp_path / work)), log=lambda *_: None)
    assert not (tmp_path / "b").exists()


def test_images_too_small_for_the_networks_are_refused_before_any_work(tmp_path, capsys):
    """N x 1 x 16 signals (read as 1 x 1 x 16 images) failed in the base model's training with torch's traceback."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((60, 1, 16)).astype(np.float32), y=rng.integers(0, 3, 60))
    rc = main(["calibrate", "all", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "b"), "--work",
               str(tmp_path / "w"), "--calibration-size", "20", "--surrogate-size", "10", "--tune-size", "5",
               "--levels", "0.5", "--device", "cpu", "--no-progress"])
    assert "H and W must be at least 4" in _one_line_error(capsys, rc)


def test_a_base_model_with_nan_logits_on_every_noisy_copy_is_refused_clearly():
    """Counts of a base model whose logits are NaN under noise (each copy counted for no class) gave a row of
    zeros, a NaN soft label, NaN surrogate weights, and the RuntimeError "ONNX export of surrogate.onnx does not
    match torch (max diff nan)" (a traceback). Now a ValueError says what the base model must do."""
    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 8, 8)).astype(np.float32)
    counts = rng.integers(0, 5, (6, 3))
    counts[2] = 0
    with pytest.raises(ValueError, match="1 of the 6 surrogate-train images .* finite logits for noisy inputs"):
        train_surrogate(x, counts, epochs=1, seed=0, device="cpu")


def test_counts_of_another_run_in_a_work_directory_name_the_flag_to_change(tmp_path):
    """The refusal of a count directory of another run told ``calibrate all`` users to "use another --out
    directory": its count directories live in --work, and another --out met the same refusal."""
    images = np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32)
    engine = SamplingEngine(OnnxBackend(BASE, device="cpu"), sigma=0.25, num_classes=10, batch_size=64)
    compute_counts(engine, images, 4, out_dir=tmp_path / "c", seed=0, model_sha256="a", progress=False)
    with pytest.raises(ValueError, match="another --work"):
        compute_counts(engine, images, 4, out_dir=tmp_path / "c", seed=1, model_sha256="a", progress=False)


@pytest.mark.parametrize("kw", [dict(surrogate_size=1), dict(surrogate_size=10, meta_fraction=0.99),
                                dict(surrogate_size=10, limit=40, meta_fraction=0.97)],
                         ids=["one image", "fraction 0.99", "fraction 0.97 of 10"])
def test_a_surrogate_split_the_meta_prior_takes_whole_is_refused_before_any_work(tmp_path, monkeypatch, kw):
    """``--surrogate-size 1`` (or a --meta-fraction that rounds to the whole split) left the surrogate no image:
    after the base model's training and the counts, "Expected positive integer total_steps, but got 0" (torch's
    scheduler, no flag named)."""
    data = _npz(tmp_path / "d.npz", side=8, n=60)
    monkeypatch.setattr(pipeline, "train_base", lambda *a, **k: pytest.fail("trained before checking the split"))
    with pytest.raises(ValueError, match="leaves no image to train the surrogate on"):
        pipeline.run_pipeline(_config(tmp_path, data, **kw), log=lambda *_: None)


def _cuda_runs() -> bool:
    import onnxruntime

    return torch.cuda.is_available() or "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(_cuda_runs(), reason="the refusal of --device cuda needs a machine where CUDA cannot run")
@pytest.mark.parametrize("command", ["all", "counts"])
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys, command):
    """``--device cuda`` where no GPU can run: ``calibrate all`` died in torch ("Torch not compiled with CUDA
    enabled", AssertionError), ``calibrate counts`` in load_backend (RuntimeError): tracebacks, exit 1."""
    data = _npz(tmp_path / "d.npz", side=28 if command == "counts" else 8, classes=10, n=60)
    argv = (["calibrate", "counts", "--model", BASE, "--data", data, "--n", "4", "--sigma", "0.25", "--out",
             str(tmp_path / "c")] if command == "counts" else
            ["calibrate", "all", "--data", data, "--out", str(tmp_path / "b"), "--work", str(tmp_path / "w"),
             "--calibration-size", "20", "--surrogate-size", "10", "--tune-size", "5", "--levels", "0.5",
             "--no-progress"])
    assert "--device cuda" in _one_line_error(capsys, main([*argv, "--device", "cuda"]))
