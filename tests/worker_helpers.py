"""Shared by the sequential-worker tests (tests/test_server_worker.py, tests/test_server_worker_http.py).

The module-scoped fixtures (``bundle``, ``backend``: the real default bundle's base model on onnxruntime CPU;
``images``: the first 300 Fashion-MNIST test images; ``clean_classes``) are bound by each test module that uses them,
so each module loads its own copy. ``make_engine`` builds seeded :class:`models.engine.SequentialEngine` instances
over a real :class:`models.sampling.SamplingEngine` and stops them at teardown. ``SlowModel`` (the real model
answering late: a deadline comes first) is also used by tests/test_server_api.py. ``check_result`` checks that a
JobResult is a valid certificate for its spec.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from calibration.data import load_fashion_mnist
from models.bundle import load_bundle
from models.sampling import SamplingEngine
from models.engine import JobResult, JobSpec, SequentialEngine
from smoothing import checkpoint_schedule, clopper_pearson_lower, lower_bound, radius_from_probability

SIGMA = 0.25
NUM_CLASSES = 10
EASY = 2  # Fashion-MNIST test image #2: a trouser, pA ~ 1 under sigma = 0.25
STOPS = {"certified", "target", "futility", "budget", "deadline", "abstained", "shutdown"}


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bundle():
    return load_bundle()


@pytest.fixture(scope="module")
def backend(bundle):
    return bundle.backend("base", device="cpu")


@pytest.fixture(scope="module")
def images():
    return load_fashion_mnist().x_test[:300]


@pytest.fixture(scope="module")
def clean_classes(backend, images):
    """The class each job tests: the base model's arg-max on the CLEAN image (fixed before any noise)."""
    return backend.forward(images).argmax(axis=1)


@pytest.fixture
def make_engine(backend):
    engines: list[SequentialEngine] = []

    def make(*, batch_size: int = 1024, max_live_jobs: int = 512, seed: int = 0, start: bool = True):
        engine = SequentialEngine(SamplingEngine(backend, sigma=SIGMA, num_classes=NUM_CLASSES, batch_size=batch_size),
                                  max_live_jobs=max_live_jobs, seed=seed)
        engines.append(engine)
        return engine.start() if start else engine

    yield make
    for engine in engines:
        if engine._thread is not None:  # teardown only: never leave an engine thread running
            engine.stop(0.0)


class SlowModel:
    """The real base model, answering each call ``delay`` seconds late (a model much slower than this machine's): a
    deadline then comes long before the default stopping rule (~1,000 samples for an easy image) would stop."""

    def __init__(self, real, delay: float = 0.1):
        self.real, self.delay, self.device, self.name = real, delay, real.device, real.name

    def forward(self, x):
        return self.real.forward(x)

    def noisy_predictions(self, *args):
        time.sleep(self.delay)
        return self.real.noisy_predictions(*args)


def deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def wait_until(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def hits_behind(p_lower: float, trials: int, bound) -> int:
    """The integer hit count S in 0..trials with bound(S) == p_lower (the bound is increasing in S); fail if none."""
    candidates = np.asarray(bound(np.arange(trials + 1)), dtype=np.float64)
    s = int(np.argmin(np.abs(candidates - p_lower)))
    exact = float(bound(s))
    assert exact == pytest.approx(p_lower, rel=1e-12, abs=1e-15), \
        f"p_lower {p_lower} is not the bound at any hit count of {trials} trials (closest: S={s}, {exact})"
    return s


def sequential_bound_behind(res: JobResult, spec: JobSpec) -> tuple[int, int]:
    """(S, t): a sequential certificate's p_lower is L_t at S hits of t counted samples, t = its samples, or, for a
    job its policy stopped while a speculative chunk was in flight, possibly the checkpoint t < samples it stopped on
    (the engine keeps the larger of the two bounds: models.decisions.certificates); fail if neither."""
    a, b = spec.prior
    stops = [t for t in checkpoint_schedule(spec.budget) if t < res.samples][::-1]
    for t in [res.samples, *stops]:
        candidates = np.asarray(lower_bound(np.arange(t + 1), t, spec.alpha, a, b), dtype=np.float64)
        s = int(np.argmin(np.abs(candidates - res.p_lower)))
        if float(lower_bound(s, t, spec.alpha, a, b)) == pytest.approx(res.p_lower, rel=1e-12, abs=1e-15):
            return s, t
    raise AssertionError(f"p_lower {res.p_lower} is not the bound at any hit count of {res.samples} trials, nor of "
                         "an earlier checkpoint")


def check_result(res: JobResult, spec: JobSpec) -> None:
    """A JobResult is a valid certificate for its spec: counts within budget, p_lower is the stated bound at the
    counts it reports, the radius follows from p_lower, the class is the tested one (or abstain)."""
    assert isinstance(res, JobResult)
    assert res.stopped_by in STOPS
    assert res.queue_seconds >= 0 and res.sampling_seconds >= 0
    assert res.radius >= 0
    if spec.kind == "sequential":
        assert 0 <= res.samples <= spec.budget
        assert res.class_index in (-1, spec.tested_class)
        if res.samples == 0:
            assert res.p_lower == 0.0 and res.class_index == -1
        else:
            sequential_bound_behind(res, spec)
        if res.stopped_by == "budget":
            assert res.samples == spec.budget
    else:
        assert 0 <= res.samples <= spec.n0 + spec.budget
        if res.stopped_by == "budget":
            assert res.samples == spec.n0 + spec.budget
        if res.p_lower is not None:
            n = res.samples - spec.n0
            hits_behind(res.p_lower, n, lambda s: clopper_pearson_lower(s, n, spec.alpha))
    if res.class_index >= 0:
        assert res.p_lower > 0.5
        assert res.radius == pytest.approx(radius_from_probability(res.p_lower, SIGMA), rel=1e-12)
        if spec.kind == "sequential" and spec.target_radius is not None and res.stopped_by == "target":
            assert res.radius >= spec.target_radius
    else:
        assert res.radius == 0.0
