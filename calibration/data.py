"""Datasets and the fixed, recorded splits of the calibration pipeline.

Sources: real Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, or any ``.npz`` with ``x`` (uint8 or
float in [0, 1], N x H x W or N x C x H x W), ``y`` (int labels), optional ``classes``. Images are returned as
float32 (N, C, H, W) in [0, 1].

Splits of the training pool (a seeded permutation; sizes and a digest of the indices go into the manifest):
base-train (the base classifier), surrogate-train (surrogate and, from a held-out part, the meta-learner) and
calibration (conformal). Test is the dataset's official test set. Every subset the pipeline takes of a split
(``Splits.limited``; the tuning part of the calibration split, :mod:`calibration.conformal_fit`; the meta-learner's
part of surrogate-train, :func:`calibration.pipeline.meta_cut`) is a seeded random one, never a prefix or suffix: the pool may be stored in a meaningful order (an .npz sorted by class).

The conformal guarantee needs calibration images exchangeable with test inputs, so disjoint from everything the
base model, surrogate or meta-learner saw. The models trained here see only their own splits. A user's own base
model (``--base``) was trained elsewhere, usually on this very pool: ASSUMED disjoint only as far as the user
declares (``--base-trained-on``: ``none``, or an .npy of the indices it was trained on, which
:func:`declared_training` maps to pool positions and :func:`make_splits` keeps out of calibration and
surrogate-train; one naming an image of a test part carved from the same .npz is refused, since the evaluation would
score the model on its own training images). A false declaration voids the guarantee; nothing here can detect it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path(os.environ.get("CERTSERVE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
LIMIT_STREAM = 20261205  # Splits.limited draws from default_rng([split seed, LIMIT_STREAM, split number])
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    # position of each training-pool image in its source (the .npz's ``x`` array, Fashion-MNIST's training set):
    # the indices a user's --base-trained-on file names; None: the pool is the source, in order
    train_source: np.ndarray | None = None
    source_size: int | None = None  # images in that source (training pool plus a test part carved from it)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])


@dataclass
class Splits:
    seed: int
    base_train: np.ndarray
    surrogate_train: np.ndarray
    calibration: np.ndarray

    def record(self) -> dict:
        """JSON-able description: sizes, seed and a sha256 of the exact index lists."""
        digest = hashlib.sha256()
        for arr in (self.base_train, self.surrogate_train, self.calibration):
            digest.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        return {"seed": self.seed, "base_train": int(len(self.base_train)),
                "surrogate_train": int(len(self.surrogate_train)), "calibration": int(len(self.calibration)),
                "indices_sha256": digest.hexdigest()}

    def limited(self, limit: int | None) -> Splits:
        """A seeded random ``limit`` indices of each split (all of them for None, 0 or a split no larger), kept in
        index order, as a small pipeline run or a partial count run uses. Random, not the first ones: those would
        be the lowest pool indices, a biased sample of a pool stored in order (e.g. sorted by class)."""
        if not limit:
            return self

        def pick(arr: np.ndarray, part: int) -> np.ndarray:
            if len(arr) <= limit:
                return arr
            rng = np.random.default_rng([self.seed, LIMIT_STREAM, part])
            return arr[np.sort(rng.permutation(len(arr))[:limit])]

        return Splits(self.seed, pick(self.base_train, 0), pick(self.surrogate_train, 1), pick(self.calibration, 2))


def load_dataset(source: str) -> Dataset:
    """``fashion-mnist`` (Debian package) or a path to an ``.npz`` file."""
    if source in ("fashion-mnist", "fmnist"):
        return load_fashion_mnist()
    path = Path(source)
    if path.suffix == ".npz":
        return load_npz(path)
    raise ValueError(f"unknown dataset {source!r}: expected 'fashion-mnist' or a path to an .npz file")


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR) -> Dataset:
    train, test = _fashion_mnist_split(root, "train"), _fashion_mnist_split(root, "t10k")
    return Dataset("fashion-mnist", *train, *test, list(FASHION_MNIST_CLASSES))


def load_fashion_mnist_test(root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the Fashion-MNIST test split alone: only its two files are needed (the benchmarks' input,
    e.g. on a GPU host that was carried the test set only, bench/device_run.sh)."""
    return _fashion_mnist_split(root, "t10k")


def _fashion_mnist_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images as float32 in [0, 1], int64 labels) of ``split`` ("train" or "t10k") from Debian's idx .gz files."""
    files = [root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz"]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found ({', '.join(missing)}). Install it with: "
            "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
        )
    with gzip.open(files[0], "rb") as fh:
        images = _to_float(np.frombuffer(fh.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28))
    with gzip.open(files[1], "rb") as fh:
        labels = np.frombuffer(fh.read(), dtype=np.uint8, offset=8).astype(np.int64)
    return images, labels


def load_npz(path: Path, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """An .npz with x, y (and optional x_test, y_test, classes); without a test set, a seeded split is made.
    ValueError, saying what was expected, for anything else (the whole file is checked before any work)."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:  # not a zip, truncated, or object (pickled) arrays
        raise ValueError(f"{path} is not a readable .npz of numeric arrays (np.savez of x, y, ...): {exc}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not an .npz archive of arrays 'x' and 'y'")
    with data:
        if "x" not in data or "y" not in data:
            raise ValueError(f"{path} must contain arrays 'x' (images) and 'y' (labels); found {sorted(data.files)}")
        if ("x_test" in data) != ("y_test" in data):
            raise ValueError(f"{path} must contain both 'x_test' and 'y_test' (a test set), or neither; found "
                             f"{sorted(data.files)}")
        x, y = _to_float(_array(data, "x", path), f"{path}: x"), _labels(_array(data, "y", path), path)
        if len(x) != len(y):
            raise ValueError(f"{path}: x has {len(x)} images but y has {len(y)} labels")
        classes = (_class_names(_array(data, "classes", path), path) if "classes" in data else
                   [str(i) for i in range(int(y.max(initial=0)) + 1)])
        if "x_test" in data:
            x_test = _to_float(_array(data, "x_test", path), f"{path}: x_test")
            y_test = _labels(_array(data, "y_test", path), path, "y_test")
            if not len(x_test):  # a test accuracy of no images is NaN, recorded as null; evaluate stacks nothing
                raise ValueError(f"{path}: x_test holds no images; store a test set (x_test, y_test) or neither "
                                 "(a seeded 20% of x is then held out)")
            if len(x_test) != len(y_test) or x_test.shape[1:] != x.shape[1:]:
                raise ValueError(f"{path}: x_test must hold one image shaped like x's {x.shape[1:]} per label of "
                                 f"y_test; got x_test {x_test.shape[1:]} x {len(x_test)}, y_test {len(y_test)} labels")
            source, size = np.arange(len(x)), len(x)
        else:
            perm = np.random.default_rng(seed).permutation(len(x))
            cut = int(round(len(x) * (1 - test_fraction)))
            x, y, x_test, y_test = x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]
            source, size = perm[:cut], len(perm)
    if y.max(initial=0) >= len(classes) or y_test.max(initial=0) >= len(classes):
        raise ValueError(f"{path}: labels exceed the {len(classes)} classes")
    if len(classes) < 2:  # the bundle needs two classes or more: refused here, not after hours of work
        raise ValueError(f"{path}: a classifier needs at least 2 classes; the labels (and 'classes') give "
                         f"{classes}")
    return Dataset(path.stem, x, y, x_test, y_test, classes, source, size)


def _array(data, name: str, path) -> np.ndarray:
    """``data[name]``, read now: an .npz opens lazily, so an object (pickled) or damaged member fails here, said as
    load_npz says it (numpy's own message names neither the file nor what was expected)."""
    try:
        return data[name]
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a readable .npz of numeric arrays (np.savez of x, y, ...): {name}: {exc}"
                         ) from None


def _class_names(arr, path) -> list[str]:
    """The 'classes' array as names: 1-d, distinct and non-blank (what the bundle's manifest requires, checked
    before any work); bytes decoded as UTF-8 (str(b'cat') would name a class "b'cat'")."""
    arr = np.asarray(arr)
    names = ([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.tolist()]
             if arr.ndim == 1 else None)
    stripped = [n.strip() for n in names or []]
    if names is None or not all(stripped) or len(set(stripped)) != len(stripped):
        raise ValueError(f"{path}: 'classes' must be a 1-d array of distinct, non-blank class names in label "
                         f"order (e.g. np.array(['cat', 'dog'])); got {arr!r}"[:400])
    return names


def make_splits(num_train: int, *, calibration: int, surrogate_train: int, seed: int = 0,
                base_train: int | None = None, exclude: np.ndarray | None = None) -> Splits:
    """Disjoint seeded splits of the training pool; base-train takes the rest unless ``base_train`` is given.

    ``exclude``: pool positions a user's base model was trained on (:func:`declared_training`); they go to the
    base-train part, never to calibration or surrogate-train. None or empty: the splits of the plain permutation."""
    rest = num_train - calibration - surrogate_train
    if calibration < 1 or surrogate_train < 1 or rest < 1:
        raise ValueError(f"splits do not fit: {num_train} training images, calibration={calibration}, "
                         f"surrogate_train={surrogate_train} leave {rest} for base-train")
    n_base = rest if base_train is None else min(base_train, rest)
    perm = np.random.default_rng(seed).permutation(num_train)
    if exclude is not None and len(exclude):
        seen = np.isin(perm, exclude)
        if seen.sum() > rest:
            raise ValueError(f"the base model was trained on {int(seen.sum())} of the {num_train} training images; "
                             f"calibration={calibration} and surrogate_train={surrogate_train} leave only {rest} "
                             "images for them: use smaller splits")
        perm = np.concatenate([perm[seen], perm[~seen]])  # seen images first: inside the base-train part
    return Splits(seed, np.sort(perm[:n_base]), np.sort(perm[rest:rest + surrogate_train]),
                  np.sort(perm[rest + surrogate_train:]))


def declared_training(spec: str, ds: Dataset) -> tuple[np.ndarray | None, dict]:
    """What a user's base model was trained on, as ``--base-trained-on`` declares it: ``none`` (no image of this
    dataset) or an .npy of indices into the source (the .npz's ``x`` array; Fashion-MNIST's 60,000 training
    images). Returns the pool positions to keep out of calibration and surrogate-train, and a provenance record."""
    if spec == "none":
        return None, {"declared": "none", "meaning": "the base model saw no image of this dataset"}
    path = Path(spec)
    if path.suffix != ".npy" or not path.is_file():
        raise ValueError(f"--base-trained-on must be 'none' or an existing .npy file of image indices, got {spec!r}")
    idx = np.load(path, allow_pickle=False)
    size = ds.source_size if ds.source_size is not None else len(ds.x_train)
    if idx.ndim != 1 or idx.dtype.kind not in "iu" or (idx.size and (idx.min() < 0 or idx.max() >= size)):
        raise ValueError(f"{path} must hold a 1-d array of integer indices in [0, {size}) (positions in the data "
                         f"file's x array), got shape {idx.shape}, dtype {idx.dtype}")
    source = ds.train_source if ds.train_source is not None else np.arange(len(ds.x_train))
    in_test = np.setdiff1d(idx, source)  # an .npz without x_test: its test part is carved from the same x array
    if len(in_test):
        raise ValueError(f"{path} names {len(in_test)} images of the test part that {ds.name!r} carves from its x "
                         "array (the images the build's test accuracy and `certserve calibrate evaluate` score): the "
                         "base model's own training images would be scored as test images. Store a test set it never "
                         "saw in the .npz as x_test and y_test")
    pool = np.flatnonzero(np.isin(source, idx))
    return pool, {"declared": "file", "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                  "num_indices": int(len(np.unique(idx))), "excluded_from_pool": int(len(pool))}


def _to_float(x: np.ndarray, what: str = "images") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{what} must be N x H x W or N x C x H x W, got shape {x.shape}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):  # channels last: C would be read as H
        raise ValueError(f"{what} has shape {x.shape}, channels last (N x H x W x C); expected N x C x H x W "
                         "(np.transpose(x, (0, 3, 1, 2))) or N x H x W for grey images")
    if 0 in x.shape[1:]:
        raise ValueError(f"{what} has shape {x.shape}: images of no pixels; expected N x H x W or N x C x H x W")
    if x.dtype == np.uint8:
        if x.size and x.max() == 1:  # 0/1 images stored as uint8 would be read as 0 and 1/255: all but black
            raise ValueError(f"{what}: uint8 images are read as 0-255, but these hold only the values 0 and 1; "
                             "store 0/1 images as float (x.astype(np.float32)) or scale them to 0-255")
        return (x.astype(np.float32) / 255.0)
    if x.dtype.kind not in "fbiu":
        raise ValueError(f"{what} must be uint8 (0-255) or float (0-1) images, got dtype {x.dtype}")
    dtype, x = x.dtype, x.astype(np.float32)
    if not np.all(np.isfinite(x)) or x.min(initial=0) < 0 or x.max(initial=0) > 1:
        raise ValueError(f"{what}: float images must have values in [0, 1] (or be uint8, 0-255); got {dtype} "
                         f"values in [{np.nanmin(x) if x.size else 0}, {np.nanmax(x) if x.size else 0}]")
    return x


def _labels(y, path, name: str = "y") -> np.ndarray:
    y = np.asarray(y)
    # a uint64 label >= 2**63 (e.g. -1 stored unsigned) would turn negative in the cast to int64
    if y.dtype.kind not in "iu" or y.ndim != 1 or (y.size and (y.min() < 0 or y.max() > np.iinfo(np.int64).max)):
        raise ValueError(f"{path}: {name} must be a 1-d array of non-negative integer labels (below 2**63)")
    return y.astype(np.int64)


def check_fits(ds: Dataset, input_shape, num_classes: int, what: str) -> None:
    """ValueError unless ``ds``'s images and classes are what ``what`` (a bundle, a model) takes: images of another
    shape fail inside the model (onnxruntime's traceback); another class count silently compares labels with
    classes of another meaning (an evaluation's accuracies, a count's columns)."""
    if ds.input_shape != tuple(int(d) for d in input_shape) or len(ds.classes) != int(num_classes):
        raise ValueError(f"--data {ds.name!r} holds images of shape {ds.input_shape} in {len(ds.classes)} classes; "
                         f"{what} takes images of shape {tuple(input_shape)} in {num_classes} classes: pass the data "
                         "it was built for")
