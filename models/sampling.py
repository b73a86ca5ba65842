"""The one implementation of "Gaussian noise -> base model -> per-class counts", shared by the calibration pipeline,
the evaluation, the benchmarks and the server's sequential worker.

A batch is assembled from *chunks*: chunk j asks for ``sizes[j]`` noisy copies of image j. The backend draws
e ~ N(0, sigma^2 I) i.i.d. for every copy (on the device that runs the model) and returns arg-max classes; counts are
tallied per chunk with one ``np.bincount`` over offset labels. Samples of different chunks are independent, and
so are the samples of successive calls (the generator advances), so any set of chunks of one image forms an
i.i.d. sample of f(x + e).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class SamplingEngine:
    """Batched Monte-Carlo sampler over a backend with ``noisy_predictions(images, repeats, sigma, rng)``."""

    def __init__(self, backend, *, sigma: float, num_classes: int, batch_size: int = 1024):
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.backend = backend
        self.sigma = float(sigma)
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)

    def count_chunks(self, images: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One model call: counts (J, K) of classes over sizes[j] noisy copies of images[j] (sum(sizes) samples)."""
        sizes = np.asarray(sizes, dtype=np.int64)
        preds = np.asarray(self.backend.noisy_predictions(images, sizes, self.sigma, rng))
        if preds.size and (preds.min() < 0 or preds.max() >= self.num_classes):
            # a class index outside [0, K) would be counted for the NEXT chunk's job: refuse, never misattribute
            raise ValueError(f"the model predicted class {int(preds.max())}, but the bundle declares "
                             f"{self.num_classes} classes")
        owner = np.repeat(np.arange(len(sizes)), sizes)
        flat = np.bincount(owner * self.num_classes + preds, minlength=len(sizes) * self.num_classes)
        return flat.reshape(len(sizes), self.num_classes)

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
