"""Shared by the engine tests (tests/test_engine_pipeline.py, tests/test_engine_lifecycle.py).

Real components: the default bundle's base model in a real onnxruntime session behind the real
:class:`models.sampling.SamplingEngine` and real Fashion-MNIST test images (``images``, a module-scoped fixture: each
test module that binds it loads its own copy). The only wrapper is ``Recording``: a SamplingEngine that logs every
launch and every result read, and can hold a batch's result back (a gate) to make "a batch still running" happen on
purpose; it changes no count.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from calibration.data import load_fashion_mnist
from models.engine import SequentialEngine
from models.sampling import SamplingEngine

SIGMA = 0.25
K = 10
EASY = 2  # a trouser: pA ~ 1 for class 1


@pytest.fixture(scope="module")
def images():
    return load_fashion_mnist().x_test[:64].copy()


class Recording(SamplingEngine):
    """Logs ("launch", n) / ("result", n) events; ``hold`` keeps results back until ``release()``."""

    def __init__(self, backend, batch_size: int):
        super().__init__(backend, sigma=SIGMA, num_classes=K, batch_size=batch_size)
        self.events: list[tuple[str, int]] = []
        self.sizes: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def launch(self, images, sizes, rng):
        n = len(self.sizes)
        self.sizes.append([int(s) for s in sizes])
        self.events.append(("launch", n))
        inner = super().launch(images, sizes, rng)
        outer = self

        class Held:
            model_seconds = 0.0

            def result(self):
                outer.gate.wait()
                counts = inner.result()
                self.model_seconds = inner.model_seconds
                outer.events.append(("result", n))
                return counts

        return Held()


def start(sampler, **kw) -> SequentialEngine:
    return SequentialEngine(sampler, seed=kw.pop("seed", 0), **kw).start()


def bound_hits(p_lower: float, trials: int, bound) -> int:
    """The integer hit count whose bound equals p_lower (fails if none does)."""
    values = np.asarray(bound(np.arange(trials + 1)), dtype=np.float64)
    s = int(np.argmin(np.abs(values - p_lower)))
    assert float(bound(s)) == pytest.approx(p_lower, rel=1e-12, abs=1e-15)
    return s


def tiny_linear_model(torch, k=K, nan_above=None, record=None):
    """(N, 3, 2, 2) -> (N, k) linear logits; NaN logits where the first noisy pixel exceeds ``nan_above``;
    ``record`` (a list) receives every input batch."""
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(12, k, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            if record is not None:
                record.append(x.detach().clone())
            y = x.flatten(1) @ self.w
            if nan_above is not None:
                y = torch.where(x.flatten(1)[:, :1] > nan_above, torch.full_like(y, float("nan")), y)
            return y

    return Linear()


class BernoulliModel:
    """A stand-in model: copy i of image x is class c(x) with probability p(x), else another class; images flagged
    in pixel (0, 1, 0) give NaN logits (no class, -1) on a tenth of their copies. Noise from the caller's generator,
    so a seeded engine replays the same batches."""

    name = "bernoulli"

    def __init__(self, device: str):
        self.device = device

    def noisy_predictions(self, images, repeats, sigma, rng):
        p = np.repeat(images[:, 0, 0, 0].astype(np.float64), repeats)
        c = np.repeat(images[:, 0, 0, 1].astype(np.int64), repeats)
        nan = np.repeat(images[:, 0, 1, 0] > 0.5, repeats)
        u = rng.random(len(p))
        out = np.where(u < p, c, (c + 1 + (u * 7).astype(np.int64) % (K - 1)) % K)
        return np.where(nan & (u > 0.9), -1, out)


def engine_turn(engine, inflight, more_to_come: bool) -> bool:
    """One turn of the engine thread's loop (SequentialEngine._run), driven by a test on an engine whose threads were
    never started: admit, launch up to the pipeline depth, tabulate decisions (device engines), land the oldest batch.
    True: the loop ends (a stop, or nothing in flight and ``more_to_come`` False)."""
    if engine._prepare(inflight):
        return True
    while len(inflight) < engine.depth and engine._launch_next(inflight):
        pass
    if inflight and engine.precompute:
        with engine._state:
            engine._tables.precompute(engine._table, engine.sigma)
    if inflight:
        engine._land_oldest(inflight)
        return False
    return not more_to_come
