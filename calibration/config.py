"""Configuration of ``certserve calibrate all`` (torch-free, so the CLI can build its parser without torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class PipelineConfig:
    data: str = "fashion-mnist"
    sigma: float = 0.25
    out: str = "models/bundles/fmnist-sigma0.25"
    work: str = "runs/fmnist-sigma0.25"
    base: str | None = None  # a user's ONNX classifier taking [0, 1] pixels; trained here when None
    # required with base: "none" (it saw no image of data) or an .npy of the indices of data's images it was trained
    # on (kept out of calibration and surrogate-train); see calibration.data.declared_training
    base_trained_on: str | None = None
    name: str | None = None
    calibration_size: int = 8000
    surrogate_size: int = 16000
    split_seed: int = 0
    base_epochs: int = 12
    surrogate_epochs: int = 15
    train_samples: int = 256  # Monte-Carlo samples per surrogate-train image
    cal_samples: int = 10000  # Monte-Carlo samples per calibration image (the labels' cap: r <= 0.78 at 10k)
    tune_size: int = 1600  # a seeded random part of the calibration split tunes maps and bin edges; the rest calibrate
    levels: tuple[float, ...] = (0.1, 0.05, 0.01, 0.005, 0.001)  # risk ladder (smoothing.DEFAULT_LEVELS)
    max_bins: int = 2  # Mondrian bins per level, at most (chosen with the scale: bench/conformal_knobs.py)
    calibration_scale: str = "spread"  # normalized ("spread") or additive ("unit") probit scores; see max_bins
    gamma: float | None = None  # training-conditional (PAC) quantiles at this gamma; None: marginal
    meta_fraction: float = 0.2  # held-out part of surrogate-train used to fit the meta-learner
    seed: int = 0
    device: str = "auto"
    batch_size: int = 0  # 0: models.defaults.default_batch_size(device)
    limit: int | None = None  # use only this many images of each split (smoke tests)
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        """Refuse a value no run can use before any work (training, hours of Monte-Carlo counts), naming its flag:
        ValueError (``certserve: error: ...``, exit 2)."""
        problems = []

        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                problems.append(f"--{name.replace('_', '-')} must be {expected}, got {getattr(self, name)!r}")

        need(_finite(self.sigma) and self.sigma > 0, "sigma", "a finite number > 0")
        for name in ("calibration_size", "surrogate_size", "base_epochs", "surrogate_epochs", "train_samples",
                     "cal_samples", "tune_size", "max_bins"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("split_seed", "seed", "batch_size"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(self.limit is None or _is_int(self.limit) and self.limit >= 0, "limit",
             "an integer >= 0 (0 or none: no limit)")
        levels_wrong = levels_problem(self.levels)
        need(levels_wrong is None, "levels", levels_wrong)
        need(self.calibration_scale in ("spread", "unit"), "calibration_scale", "'spread' or 'unit'")
        need(self.gamma is None or _finite(self.gamma) and 0 < self.gamma < 1, "gamma",
             "strictly between 0 and 1 (or none: marginal)")
        need(_finite(self.meta_fraction) and 0 < self.meta_fraction < 1, "meta_fraction", "strictly between 0 and 1")
        need(self.device in ("auto", "cpu", "cuda"), "device", "'auto', 'cpu' or 'cuda'")
        for name in ("data", "out", "work"):
            need(isinstance(getattr(self, name), str) and getattr(self, name).strip() != "", name, "a non-empty path")
        if problems:
            raise ValueError("; ".join(problems))


#: What ``--levels`` must be (checked by PipelineConfig and by ``calibrate conformal``).
LEVELS_EXPECTED = "one or more comma-separated risk levels strictly between 0 and 1"
LEVELS_DISTINCT = "distinct risk levels (each level once: a bundle's ladder has no level twice)"


def levels_problem(levels) -> str | None:
    """None for a usable risk ladder, else what ``--levels`` must be: at least one level, each a finite number
    strictly between 0 and 1, none twice (the bundle refuses a repeated level, which was found only after the
    whole build had trained and counted)."""
    if not (len(levels) > 0 and all(_finite(a) and 0 < a < 1 for a in levels)):
        return LEVELS_EXPECTED
    return LEVELS_DISTINCT if len(set(levels)) != len(levels) else None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
