"""The one implementation of "Gaussian noise -> base model -> per-class counts", shared by the calibration pipeline,
the evaluation, the benchmarks and the batching engine.

A batch is assembled from *chunks*: chunk j asks for ``sizes[j]`` noisy copies of image j. The backend draws
e ~ N(0, sigma^2 I) i.i.d. for every copy (on the device that runs the model) and the arg-max classes are tallied per
chunk: on the device (a backend with ``launch_counts``: only the (J, K) counts cross the bus) or on the host with one
``np.bincount`` over offset labels. Samples of different chunks are independent, and so are the samples of successive
calls (the generator advances), so any set of chunks of one image forms an i.i.d. sample of f(x + e).

:meth:`SamplingEngine.launch` starts a batch and returns at once (the engine overlaps its bookkeeping with the model):
a device backend queues asynchronous kernels; a host backend (onnxruntime) runs in the sampler's two threads
(:class:`_HostRunner`: one draws the noise, the other runs the model calls, which release the GIL). Batches run in
launch order.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
import weakref
from collections.abc import Callable

import numpy as np

from models.backends import ThreadPriority


class PendingCounts:
    """Counts of one launched batch. ``result()`` blocks until they are on the host; ``model_seconds`` is then the
    time the model call took (host: the call and its tally, not the noise drawn before it; device: launch to
    completion)."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future
        self.model_seconds = 0.0

    def result(self) -> np.ndarray:
        counts, self.model_seconds = self._future.result()
        return counts

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> None:
        """Block until the batch has finished (successfully or not), without raising."""
        concurrent.futures.wait([self._future])


class SamplingEngine:
    """Batched Monte-Carlo sampler over a backend with ``noisy_predictions(images, repeats, sigma, rng)`` (and,
    optionally, ``launch_counts(images, sizes, sigma, rng, num_classes)`` for device-side counts)."""

    def __init__(self, backend, *, sigma: float, num_classes: int, batch_size: int = 1024,
                 runner_priority: ThreadPriority | None = None):
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.backend = backend
        self.sigma = float(sigma)
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.runner_priority = runner_priority  # the runner's threads yield the CPU to the request path
        if getattr(backend, "pad_batches", False):  # padded batches stay within the batch size (device memory);
            # a backend shared by engines: the largest of their batch sizes, which one of them runs anyway
            backend.pad_limit = max(self.batch_size, getattr(backend, "pad_limit", None) or 0)
        self._runner: _HostRunner | None = None
        self._runner_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ asynchronous
    def launch(self, images: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> PendingCounts:
        """Start one model call over the chunks (images[j], sizes[j]); returns at once. Noise is drawn from ``rng``
        at launch (device) or in launch order (runner), so a seeded generator reproduces the same batches (except
        onnxruntime's in-graph CUDA noise: the session's own generator, see models.backends)."""
        sizes = np.asarray(sizes, dtype=np.int64)
        backend = self.backend
        if hasattr(backend, "launch_counts"):
            return backend.launch_counts(images, sizes, self.sigma, rng, self.num_classes)
        return PendingCounts(self._pool().submit(backend, images, sizes, rng))

    def close(self) -> None:
        """Stop the runner's threads (after the batches already launched); a later launch starts new ones."""
        with self._runner_lock:
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.shutdown()

    def _pool(self) -> _HostRunner:
        with self._runner_lock:
            if self._runner is None:
                self._runner = _HostRunner(self, self.runner_priority or ThreadPriority())
            return self._runner

    def _noisy_call(self, backend, images, sizes, rng) -> Callable[[], np.ndarray]:
        """The model call of one batch with its host part done (noise drawn from ``rng`` now), where the backend
        separates them (``prepare_noisy``); else the whole of ``noisy_predictions``, noise drawn when it runs."""
        prepare = getattr(backend, "prepare_noisy", None)
        if prepare is not None:
            return prepare(images, sizes, self.sigma, rng)
        return lambda: backend.noisy_predictions(images, sizes, self.sigma, rng)

    def warm_up(self, image: np.ndarray, rng: np.random.Generator) -> int:
        """On a backend that runs its batches at bucketed sizes (a device backend, ``pad_batches``:
        :func:`models.backends.padded_batch_size`), one call at every bucket up to ``batch_size``, so cuDNN's tuning
        per input shape happens before the first request rather than in it (the largest bucket is the batch size:
        one that does not fit the device fails here, at start-up). The samples are discarded. Returns the number of
        calls (0 where the backend does not pad: the CPU)."""
        if not getattr(self.backend, "pad_batches", False):
            return 0
        from models.backends import padded_batch_size

        limit = getattr(self.backend, "pad_limit", None)
        buckets = sorted({padded_batch_size(n, limit) for n in range(1, self.batch_size + 1)})
        for size in buckets:
            self.count_chunks(image[None], np.array([size]), rng)
        return len(buckets)

    # ------------------------------------------------------------------------------------------ synchronous
    def count_chunks(self, images: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One model call: counts (J, K) of classes over sizes[j] noisy copies of images[j] (sum(sizes) samples)."""
        sizes = np.asarray(sizes, dtype=np.int64)
        if hasattr(self.backend, "launch_counts"):
            return self.launch(images, sizes, rng).result()
        return self._host_counts(self._noisy_call(self.backend, images, sizes, rng), sizes)

    def _host_counts(self, noisy_call: Callable[[], np.ndarray], sizes: np.ndarray) -> np.ndarray:
        """Counts (J, K) of one host batch: its model call (:meth:`_noisy_call`) run and tallied per chunk; the one
        tally of both the synchronous path and the runner's."""
        return tally_chunks(np.asarray(noisy_call()), sizes, self.num_classes)

    def predictions(self, image: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
        """The ordered stream of num_samples noisy predictions for one image (used by the offline evaluation)."""
        out = []
        for start in range(0, num_samples, self.batch_size):
            size = min(self.batch_size, num_samples - start)
            out.append(self.backend.noisy_predictions(image[None], np.array([size]), self.sigma, rng))
        return np.concatenate(out).astype(np.int64)

    def count(self, images: np.ndarray, num_samples, rng: np.random.Generator,
              on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """Counts (J, K) of num_samples[j] noisy samples of each image, packed into full batches across images."""
        n = np.broadcast_to(np.asarray(num_samples, dtype=np.int64), (len(images),))
        if np.any(n < 0):
            raise ValueError("num_samples must be >= 0")
        ends = np.cumsum(n)
        begins = ends - n
        counts = np.zeros((len(images), self.num_classes), dtype=np.int64)
        total = int(ends[-1]) if len(ends) else 0
        for start in range(0, total, self.batch_size):
            stop = min(start + self.batch_size, total)
            first = int(np.searchsorted(ends, start, side="right"))
            last = int(np.searchsorted(ends, stop - 1, side="right"))
            js = np.arange(first, last + 1)
            sizes = np.minimum(ends[js], stop) - np.maximum(begins[js], start)
            keep = sizes > 0
            js, sizes = js[keep], sizes[keep]
            counts[js] += self.count_chunks(images[js], sizes, rng)
            if on_batch is not None:
                on_batch(stop - start)
        return counts


def tally_chunks(preds: np.ndarray, sizes: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (J, K) of the labels ``preds`` (chunk j owns the next sizes[j] of them), with one bincount.

    A class index outside [0, K) would be counted for the NEXT chunk's job: refused, never misattributed. A copy
    whose logits hold a NaN (label ``models.backends.NAN_LABEL``, -1) is counted for no class: the base classifier
    abstains there, a miss for whichever class is tested (each chunk still drew its sizes[j] samples, the trials
    every bound counts), so a lower bound on pA stays valid and one bad input never fails the others' batch."""
    if preds.size and (preds.min() < -1 or preds.max() >= num_classes):
        bad = int(preds.max()) if preds.max() >= num_classes else int(preds.min())
        raise ValueError(f"the model predicted class {bad}, but the bundle declares {num_classes} classes")
    owner = np.repeat(np.arange(len(sizes)), sizes)
    width = num_classes + 1  # the last column: no class (NaN logits), dropped
    flat = np.bincount(owner * width + np.where(preds < 0, num_classes, preds), minlength=len(sizes) * width)
    return flat.reshape(len(sizes), width)[:, :num_classes]


class _HostBatch:
    """One launched batch of a host backend: its host part (:meth:`prepare`: the noisy copies, noise drawn), then its
    model call and tally, and its counts handed out (:meth:`run`: (counts, seconds of the model call and tally) or
    the exception of whichever part failed). The noise is drawn while the previous model call runs, so its time is
    not the model's."""

    def __init__(self, sampler: SamplingEngine, backend, images, sizes, rng):
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._sampler, self._sizes, self._args = sampler, sizes, (backend, images, sizes, rng)
        self._call: Callable[[], np.ndarray] | None = None
        self._error: BaseException | None = None

    def prepare(self) -> None:
        self._call = self._guarded(lambda: self._sampler._noisy_call(*self._args))
        self._args = None

    def run(self) -> None:
        call, self._call = self._call, None
        t0 = time.perf_counter()
        counts = None if self._error else self._guarded(lambda: self._sampler._host_counts(call, self._sizes))
        if self._error is not None:
            self.future.set_exception(self._error)
        else:
            self.future.set_result((counts, time.perf_counter() - t0))

    def _guarded(self, part: Callable[[], object]):
        """``part()``, or None where it raised: the exception is then the batch's outcome (as a thread pool's future
        would carry it)."""
        try:
            return part()
        except BaseException as exc:
            self._error = exc
            return None


class _HostRunner:
    """A host backend's batches, in launch order, through two threads: one draws each batch's noise (its host part:
    numpy), the other runs the model calls (onnxruntime releases the GIL throughout) and hands out the counts.

    So the next batch's noise is drawn while the current model call runs, and the model call starts as soon as the
    previous one has ended. With one thread doing both (a thread pool before), the next call started only after its
    noise had been drawn, and later still where the engine thread, woken by the counts, took the GIL while numpy
    filled the noise and held it through its bookkeeping: measured on a 2-core VM at 1 live job, model busy 0.70 of
    the time against 0.79 for back-to-back synchronous calls. One thread draws all the noise, from the batches' own
    generator in launch order, so the batches, their samples and counts are the same. The cost: two batches' noisy
    copies may be held at once (the one in the model, the next one drawn) instead of one."""

    def __init__(self, sampler: SamplingEngine, priority: ThreadPriority):
        self._sampler = sampler
        self._to_prepare: queue.SimpleQueue = queue.SimpleQueue()
        to_run: queue.SimpleQueue = queue.SimpleQueue()
        self._lock, self._closed = threading.Lock(), False
        stages = [("certserve-sampler-noise", self._to_prepare, _HostBatch.prepare, to_run),
                  ("certserve-sampler", to_run, _HostBatch.run, None)]
        self._threads = [threading.Thread(target=_stage, args=(priority, *stage[1:]), name=stage[0], daemon=True)
                         for stage in stages]
        for thread in self._threads:
            thread.start()
        # shutdown(), a runner dropped without it, and interpreter exit (finalize's atexit) all end the threads
        # the same way: after the batches launched, so no model call is left running at exit
        self._end = weakref.finalize(self, _end_stages, self._to_prepare, self._threads)

    def submit(self, backend, images, sizes, rng) -> concurrent.futures.Future:
        batch = _HostBatch(self._sampler, backend, images, sizes, rng)
        with self._lock:
            if self._closed:
                raise RuntimeError("the sampler's runner is shut down")
            self._to_prepare.put(batch)
        return batch.future

    def shutdown(self) -> None:
        """Run the batches already launched, then end both threads."""
        with self._lock:
            self._closed = True  # no batch is queued after this (submit checks it under the lock)
        self._end()  # once: a later call does nothing


def _end_stages(inbox: queue.SimpleQueue, threads: list[threading.Thread]) -> None:
    """End the stage threads of a :class:`_HostRunner` after the batches already queued, and wait for them, unless
    called in one of them (the runner collected there, its last batch just dropped: joining would wait for itself)."""
    inbox.put(None)
    if threading.current_thread() not in threads:
        for thread in threads:
            thread.join()


def _stage(priority: ThreadPriority, inbox: queue.SimpleQueue, work: Callable[[_HostBatch], None],
           outbox: queue.SimpleQueue | None) -> None:
    """One thread of :class:`_HostRunner`: ``work`` on each batch in arrival order, passed on to ``outbox``; None ends
    it (and is passed on)."""
    priority.apply_to_current_thread()
    while (batch := inbox.get()) is not None:
        work(batch)
        if outbox is not None:
            outbox.put(batch)
        del batch  # not held while waiting: a batch refers to its sampler, which holds the runner (finalize above)
    if outbox is not None:
        outbox.put(None)
