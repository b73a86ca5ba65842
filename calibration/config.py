"""Configuration of ``certserve calibrate all`` (torch-free, so the CLI can build its parser without torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PipelineConfig:
    data: str = "fashion-mnist"
    sigma: float = 0.25
    out: str = "models/bundles/fmnist-sigma0.25"
    work: str = "runs/fmnist-sigma0.25"
    base: str | None = None  # a user's ONNX classifier taking [0, 1] pixels; trained here when None
    name: str | None = None
    calibration_size: int = 8000
    surrogate_size: int = 16000
    split_seed: int = 0
    base_epochs: int = 12
    surrogate_epochs: int = 15
    train_samples: int = 256  # Monte-Carlo samples per surrogate-train image
    cal_samples: int = 1000  # Monte-Carlo samples per calibration image
    delta: float = 0.0009
    alpha_1: float = 0.0001
    score_epsilon: float | None = 0.03  # normalized conformal score; None for RRISE's additive score
    meta_fraction: float = 0.2  # held-out part of surrogate-train used to fit the meta-learner
    seed: int = 0
    device: str = "auto"
    batch_size: int = 0  # 0: models.defaults.default_batch_size(device)
    limit: int | None = None  # use only this many images of each split (smoke tests)
    overwrite: bool = False
    progress: bool = True
