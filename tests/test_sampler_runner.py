"""The host sampler's two threads (models.sampling._HostRunner): one draws each launched batch's noise, the other runs
the model calls, so the next batch's noise is drawn while the current model call runs (issue 11: the CPU worker's
efficiency at 1 job).

Real components: the embedded bundle's base model in a real onnxruntime session and real Fashion-MNIST images. The
wrappers below forward every call to that backend unchanged and only record or hold calls.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from calibration.data import load_fashion_mnist
from models.backends import OnnxBackend
from models.bundle import DEFAULT_BUNDLE_DIR
from models.sampling import SamplingEngine

SIGMA, K = 0.25, 10
SIZES = [np.array([5, 40]), np.array([33]), np.array([7, 1, 20]), np.array([64])]


@pytest.fixture(scope="module")
def backend() -> OnnxBackend:
    return OnnxBackend(DEFAULT_BUNDLE_DIR / "base.onnx", threads=2, device="cpu")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_fashion_mnist().x_test[:3].copy()


class Holding:
    """The real backend; the model call of the first batch waits (up to 20 s) until the second batch's noise is being
    drawn, and records whether that happened."""

    def __init__(self, real: OnnxBackend):
        self.real, self.calls = real, 0
        self.second_drawn, self.overlapped = threading.Event(), None

    def prepare_noisy(self, images, sizes, sigma, rng):
        self.calls += 1
        if self.calls == 2:
            self.second_drawn.set()
        call = self.real.prepare_noisy(images, sizes, sigma, rng)
        if self.calls != 1:
            return call

        def held():
            self.overlapped = self.second_drawn.wait(timeout=20)
            return call()
        return held


class FailsSecondDraw:
    """The real backend, except that drawing the second batch's noise raises."""

    def __init__(self, real: OnnxBackend):
        self.real, self.calls = real, 0

    def prepare_noisy(self, images, sizes, sigma, rng):
        self.calls += 1
        if self.calls == 2:
            raise MemoryError("no room for the noisy copies")
        return self.real.prepare_noisy(images, sizes, sigma, rng)


def _launch_all(sampler: SamplingEngine, images, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [sampler.launch(images[:len(sizes)], sizes, rng) for sizes in SIZES]


def test_launched_batches_equal_synchronous_calls_in_launch_order(backend, images):
    """Batches launched back to back (noise drawn by one thread while the other runs the model) give exactly the
    counts of the same batches run one after another on an identically seeded generator: the noise is drawn in launch
    order, each batch from its own samples. Fails if the noise thread drew the batches out of order (checked once by
    drawing the second batch's noise before the first's: the first two batches' counts differ)."""
    sampler = SamplingEngine(backend, sigma=SIGMA, num_classes=K)
    try:
        launched = [pending.result() for pending in _launch_all(sampler, images, seed=11)]
    finally:
        sampler.close()
    rng = np.random.default_rng(11)
    expected = [sampler.count_chunks(images[:len(sizes)], sizes, rng) for sizes in SIZES]
    for got, want, sizes in zip(launched, expected, SIZES):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got.sum(axis=1), sizes)


def test_next_batch_noise_is_drawn_while_the_model_call_runs(backend, images):
    """The second batch's noise is drawn while the first batch's model call is still running (that call waits for
    it), and both batches still count right. Fails on the single runner thread of before (a thread pool that drew each
    batch's noise right before its own model call): the held call waited 20 s in vain; checked."""
    holding = Holding(backend)
    sampler = SamplingEngine(holding, sigma=SIGMA, num_classes=K)
    try:
        rng = np.random.default_rng(3)
        first, second = (sampler.launch(images[:len(s)], s, rng) for s in SIZES[:2])
        counts = [first.result(), second.result()]
    finally:
        sampler.close()
    assert holding.overlapped is True
    assert [c.sum(axis=1).tolist() for c in counts] == [s.tolist() for s in SIZES[:2]]


def test_a_failed_noise_draw_fails_its_own_batch_only(backend, images):
    """The exception of one batch's noise draw reaches that batch's caller; the batches before and after it count
    as usual and the runner goes on."""
    sampler = SamplingEngine(FailsSecondDraw(backend), sigma=SIGMA, num_classes=K)
    try:
        pending = _launch_all(sampler, images, seed=5)
        with pytest.raises(MemoryError, match="no room"):
            pending[1].result()
        for p, sizes in zip(pending[::2] + pending[3:], [SIZES[0], SIZES[2], SIZES[3]]):
            np.testing.assert_array_equal(p.result().sum(axis=1), sizes)
    finally:
        sampler.close()


def test_close_runs_the_launched_batches_and_a_later_launch_starts_again(backend, images):
    """close() returns once every launched batch has its counts and both threads have ended; a launch after it starts
    a new runner."""
    sampler = SamplingEngine(backend, sigma=SIGMA, num_classes=K)
    pending = _launch_all(sampler, images, seed=7)
    threads = sampler._runner._threads
    assert [t.name for t in threads] == ["certserve-sampler-noise", "certserve-sampler"]
    sampler.close()
    assert all(p.done() for p in pending)
    assert not any(t.is_alive() for t in threads)
    again = sampler.launch(images[:1], np.array([9]), np.random.default_rng(1))
    try:
        assert again.result().sum() == 9
    finally:
        sampler.close()


def test_a_sampler_dropped_without_close_ends_its_threads(backend, images):
    """A sampler dropped without close() (its runner unreachable) does not leave its two threads waiting forever.
    Fails while a stage thread held its last batch during its wait (batch -> sampler -> runner kept the runner
    reachable, so its finalizer never ran): checked."""
    sampler = SamplingEngine(backend, sigma=SIGMA, num_classes=K)
    sampler.launch(images[:1], np.array([6]), np.random.default_rng(2)).result()
    threads = list(sampler._runner._threads)
    del sampler
    gc.collect()
    for thread in threads:
        thread.join(timeout=20)
    assert not any(t.is_alive() for t in threads)
