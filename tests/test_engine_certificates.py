"""A sequential job's certificate is the confidence-sequence bound at exactly the samples counted for it.

Since 2026-12-06 the engine issues the bound its policy has just computed (``policy_decisions(..., lower_out)``)
instead of computing the same bound again, for jobs stopped at a checkpoint with nothing in flight. This file checks
the result end to end against an independent tally: a real onnxruntime session of the default bundle's base model
behind the real SamplingEngine, wrapped only to add up, per image, the counts of every batch it returned. A stopped
job has nothing in flight, so that tally is exactly what was counted for it, and its p_lower must be
``lower_bound(tally hits, samples, alpha, prior)`` bit for bit; or, for a best-radius job its policy stopped while a
speculative chunk was in flight (since the rev2h review), the larger of that and the bound at the checkpoint it
stopped on (the tally when its counted samples were at the previous checkpoint): the bound it stopped on is kept.

Run once against each of three bugs (by editing the code): the array path handing out its projection bound instead
of L_t, the lone-job path handing out the bound of one hit fewer, and the engine keeping the policy's bounds across
steps (a job stopped while chunks were in flight got the bound of its decision point): each failed here.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from calibration.data import load_fashion_mnist
from models.engine import JobSpec, SequentialEngine
from models.sampling import SamplingEngine
from smoothing import checkpoint_schedule, lower_bound

SIGMA, K = 0.25, 10


class Tallying(SamplingEngine):
    """Adds every returned batch's counts to a per-image tally (images are told apart by their bytes)."""

    def __init__(self, backend, batch_size: int):
        super().__init__(backend, sigma=SIGMA, num_classes=K, batch_size=batch_size)
        self.tally: dict[bytes, np.ndarray] = {}
        self.history: dict[bytes, list[np.ndarray]] = {}  # the tally after every batch
        self.lock = threading.Lock()

    def launch(self, images, sizes, rng):
        inner, outer = super().launch(images, sizes, rng), self

        class Tallied:
            model_seconds = 0.0

            def result(self):
                counts = inner.result()
                with outer.lock:
                    for image, row in zip(images, counts):
                        outer.tally.setdefault(image.tobytes(), np.zeros(K, np.int64))
                        outer.tally[image.tobytes()] += row
                        outer.history.setdefault(image.tobytes(), []).append(outer.tally[image.tobytes()].copy())
                return counts

        return Tallied()


@pytest.fixture(scope="module")
def images():
    return load_fashion_mnist().x_test[:40].copy()


@pytest.mark.parametrize("concurrent, speculate", [(1, True), (16, True), (16, False)])
def test_policy_stopped_certificates_are_the_bound_at_the_counted_samples(backend, images, concurrent, speculate):
    rng = np.random.default_rng(31 + concurrent)
    classes = backend.forward(images).argmax(axis=1)
    sampler = Tallying(backend, batch_size=256)
    engine = SequentialEngine(sampler, seed=7, speculate=speculate).start()
    specs = [JobSpec(images[i], float(rng.choice([0.01, 0.001])), 2000, time.monotonic() + 120,
                     tested_class=int(classes[i]), prior=(float(rng.uniform(0.5, 20)), float(rng.uniform(0.5, 2))),
                     proposal_radius=float(rng.uniform(0.1, 0.6)) if i % 3 == 0 else None,
                     min_gain=float(rng.choice([5e-5, 2e-4])))
             for i in range(24 if concurrent > 1 else 6)]
    results = []
    try:
        for start in range(0, len(specs), concurrent):
            group = specs[start:start + concurrent]
            results += [(spec, f.result(timeout=120)) for spec, f in zip(group, [engine.submit(s) for s in group])]
    finally:
        engine.stop(0.0)
    stops = set()
    for spec, res in results:
        assert res.stopped_by in ("certified", "futility", "target", "budget"), res
        stops.add(res.stopped_by)
        counted = sampler.tally[spec.image.tobytes()]
        assert res.samples == int(counted.sum())
        want = lower_bound(int(counted[spec.tested_class]), res.samples, spec.alpha, *spec.prior)
        schedule = checkpoint_schedule(2000).tolist()
        stop = [h for h in sampler.history[spec.image.tobytes()] if res.samples in schedule[1:]
                and h.sum() == schedule[schedule.index(res.samples) - 1]]  # where a speculating job stopped
        kept = [max(want, lower_bound(int(h[spec.tested_class]), int(h.sum()), spec.alpha, *spec.prior))
                for h in stop if res.stopped_by == "certified" and speculate and spec.proposal_radius is None]
        assert res.p_lower in [want, *kept], (spec.alpha, spec.prior, counted, res)
    assert "certified" in stops
