"""The one implementation of "Gaussian noise -> base model -> per-class counts", shared by the calibration pipeline,
the evaluation, the benchmarks and the batching engine.

A batch is assembled from *chunks*: chunk j asks for ``sizes[j]`` noisy copies of image j. The backend draws
e ~ N(0, sigma^2 I) i.i.d. for every copy (on the device that runs the model) and the arg-max classes are tallied per
chunk: on the device (a backend with ``launch_counts``: only the (J, K) counts cross the bus) or on the host with one
``np.bincount`` over offset labels. Samples of different chunks are independent, and so are the samples of successive
calls (the generator advances), so any set of chunks of one image forms an i.i.d. sample of f(x + e).

:meth:`SamplingEngine.launch` starts a batch and returns at once (the engine overlaps its bookkeeping with the model):
a device backend queues asynchronous kernels; a host backend (onnxruntime) runs in the sampler's one runner thread,
which releases the GIL inside the model call. Batches run in launch order.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable

import numpy as np

from models.backends import ThreadPriority


class PendingCounts:
    """Counts of one launched batch. ``result()`` blocks until they are on the host; ``model_seconds`` is then the
    time the model call took (runner thread: its own wall time; device: launch to completion)."""

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
        self.runner_priority = runner_priority  # the runner thread yields the CPU to the request path
        if getattr(backend, "pad_batches", False):  # padded batches stay within the batch size (device memory);
            # a backend shared by engines: the largest of their batch sizes, which one of them runs anyway
            backend.pad_limit = max(self.batch_size, getattr(backend, "pad_limit", None) or 0)
        self._runner: concurrent.futures.ThreadPoolExecutor | None = None
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
        return PendingCounts(self._pool().submit(self._timed_host_counts, backend, images, sizes, rng))

    def close(self) -> None:
        """Stop the runner thread (after the batches already launched); a later launch starts a new one."""
        with self._runner_lock:
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.shutdown(wait=True)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._runner_lock:
            if self._runner is None:
                self._runner = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="certserve-sampler",
                    initializer=(self.runner_priority or ThreadPriority()).apply_to_current_thread)
            return self._runner

    def _timed_host_counts(self, backend, images, sizes, rng) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        counts = self._host_counts(backend, images, sizes, rng)
        return counts, time.perf_counter() - t0

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
        return self._host_counts(self.backend, images, sizes, rng)

    def _host_counts(self, backend, images, sizes, rng) -> np.ndarray:
        preds = np.asarray(backend.noisy_predictions(images, sizes, self.sigma, rng))
        return tally_chunks(preds, sizes, self.num_classes)

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
