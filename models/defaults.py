"""Service defaults that more than one layer needs, defined once below all of them.

The server's settings (``server.settings.Settings``), the certification service, the offline evaluation (which
mirrors the server's auto mode) and the benchmarks all read these, so a default changes in one place.
"""

from __future__ import annotations

#: Request alpha when the client sends none (equal to the default bundle's alpha_cal).
DEFAULT_ALPHA = 0.001
#: Cap and default of a request's sample budget (Cohen-10k's n).
MAX_SAMPLES = 10_000
#: Budget of an ``auto`` request that falls back to the sequential path and sets no ``max_samples``: auto is the
#: latency-oriented path (on held-out images ~40% fewer samples than the full budget for -0.001 mean radius).
AUTO_MAX_SAMPLES = 4_000
#: ``auto`` answers with the surrogate only where its calibrated radius is >= this many sigmas (and > 0); below, the
#: per-input path (a few hundred samples) usually certifies more. Chosen on the calibration's held-out tuning images
#: by the per-input path's own exchange rate (mean radius - PER_INPUT_MIN_GAIN x mean samples, mean samples <= 150):
#: docs/auto-routing.md (``python -m bench.auto_routing``).
AUTO_MIN_SURROGATE_Z = 1.6
#: Selection samples of ``cohen`` mode (Cohen et al.'s n0).
COHEN_N0 = 100
#: Noise samples per model call: a GPU needs large batches to be busy; CPU onnxruntime peaks around 1k.
GPU_BATCH_SIZE = 16_384
CPU_BATCH_SIZE = 1_024


def default_batch_size(device: str) -> int:
    """Noise samples per model call on ``device`` (``"cuda"`` or ``"cpu"``)."""
    return GPU_BATCH_SIZE if device == "cuda" else CPU_BATCH_SIZE
