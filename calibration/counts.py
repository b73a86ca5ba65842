"""Monte-Carlo class counts: n noise samples per image through the base model, resumable.

Work is cut into shards of consecutive images. Shard s draws its noise from ``default_rng([seed, s])`` through the
shared :class:`models.sampling.SamplingEngine`, and is written atomically (temp file + rename) once complete. An
interrupted run therefore resumes at the first missing shard and ends with exactly the totals of an uninterrupted
run: nothing lost, nothing counted twice. ``meta.json`` records sigma, n, seed, the model's sha256 and a digest of
the images; a directory holding counts of a different run is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from models.sampling import SamplingEngine


def images_digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.float32).tobytes()).hexdigest()


def compute_counts(engine: SamplingEngine, images: np.ndarray, num_samples: int, *, out_dir: str | Path, seed: int,
                   model_sha256: str, shard_size: int = 256, progress: bool = True,
                   max_shards: int | None = None) -> np.ndarray | None:
    """Counts (N, K) of ``num_samples`` noisy predictions per image; resumes from ``out_dir``.

    ``max_shards`` stops after that many new shards (used to test interruption); returns None when incomplete.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"sigma": engine.sigma, "num_samples": int(num_samples), "seed": int(seed), "model_sha256": model_sha256,
            "num_images": int(len(images)), "num_classes": engine.num_classes, "shard_size": int(shard_size),
            "images_sha256": images_digest(images), "backend": engine.backend.name}
    meta_path = out_dir / "meta.json"
    if not meta_path.exists():  # created only if absent: of two runs started at once, the second compares below
        with contextlib.suppress(FileExistsError):
            _atomic_write(meta_path, json.dumps(meta, indent=2).encode(), exclusive=True)
    old = json.loads(meta_path.read_text())
    differs = {k: (old.get(k), v) for k, v in meta.items() if k != "backend" and old.get(k) != v}
    if differs:
        raise ValueError(f"{out_dir} holds counts of a different run (differs in {sorted(differs)}); "
                         "use another --out directory (`calibrate all`: another --work) or delete it")
    num_shards = -(-len(images) // shard_size)
    todo = [s for s in range(num_shards) if not _shard_path(out_dir, s).exists()]
    done_samples = (len(images) - sum(len(range(s * shard_size, min(len(images), (s + 1) * shard_size))) for s in todo))
    bar = tqdm(total=len(images) * num_samples, initial=done_samples * num_samples, unit="sample", unit_scale=True,
               desc=f"counts {out_dir.name}", disable=not progress, mininterval=1.0)
    for new, s in enumerate(todo):
        if max_shards is not None and new >= max_shards:
            bar.close()
            return None
        chunk = images[s * shard_size:(s + 1) * shard_size]
        rng = np.random.default_rng([int(seed), s])
        counts = engine.count(chunk, num_samples, rng, on_batch=bar.update)
        buf = _npy_bytes(counts.astype(np.int64))
        _atomic_write(_shard_path(out_dir, s), buf)
    bar.close()
    return load_counts(out_dir)


def refine_confident_counts(engine: SamplingEngine, images: np.ndarray, counts: np.ndarray, extra_samples: int, *,
                            min_hits: int, out_dir: str | Path, seed: int, model_sha256: str,
                            progress: bool = True) -> np.ndarray:
    """``counts`` (N, K) plus ``extra_samples`` fresh noisy predictions (their own seed, so independent noise) for
    every image whose top count is at least ``min_hits``: training labels only (the surrogate's soft labels). A
    one-hot 256-sample label cannot tell pA = 0.999 from 0.99, which is where the calibration's largest scores come
    from. Resumable like :func:`compute_counts` (the refined images' shards live in ``out_dir``)."""
    confident = np.flatnonzero(np.asarray(counts).max(axis=1) >= min_hits)
    refined = np.asarray(counts, dtype=np.int64).copy()
    if len(confident):
        refined[confident] += compute_counts(engine, images[confident], extra_samples, out_dir=out_dir, seed=seed,
                                             model_sha256=model_sha256, progress=progress)
    return refined


@dataclass(frozen=True)
class LabelledImages:
    """The calibration-split images counted in a counts directory, with their labels and counts (N, K)."""

    images: np.ndarray
    labels: np.ndarray
    counts: np.ndarray
    meta: dict  # the counts run's meta.json (num_samples, seed, sigma, model_sha256, ...)
    splits: object  # calibration.data.Splits of the training pool
    dataset: str | None = None  # the name of the data source the images were read from (Dataset.name)
    pool_sha256: str | None = None  # images_digest of its whole training pool, in order (what split indices index)


def labelled_calibration_images(counts_dir: str | Path, data: str, *, calibration_size: int, surrogate_size: int,
                                split_seed: int = 0, model_sha256: str | None = None) -> LabelledImages:
    """The ``meta["num_images"]`` images of the calibration split of ``data`` that ``certserve calibrate counts
    --split calibration [--limit N]`` counts (splits seeded as in calibration.data.make_splits, the seeded random
    subset ``Splits.limited``: all of them when N is the split's size) with the count shards of ``counts_dir``,
    after checking that the shards counted exactly these images and, where ``model_sha256`` is given, that base
    model. Raises ValueError otherwise."""
    from calibration.data import load_dataset, make_splits

    counts_dir = Path(counts_dir)
    meta = json.loads((counts_dir / "meta.json").read_text())
    if model_sha256 is not None and meta["model_sha256"] != model_sha256:
        raise ValueError(f"{counts_dir} holds counts of another base model ({meta['model_sha256'][:12]}...), "
                         f"not this bundle's ({model_sha256[:12]}...)")
    ds = load_dataset(data)
    splits = make_splits(len(ds.x_train), calibration=calibration_size, surrogate_train=surrogate_size,
                         seed=split_seed)
    index = splits.limited(meta["num_images"]).calibration
    if len(index) != meta["num_images"] or images_digest(ds.x_train[index]) != meta["images_sha256"]:
        raise ValueError(f"{counts_dir} counted other images than the {meta['num_images']} of this calibration "
                         "split that `certserve calibrate counts --split calibration` counts (a seeded random subset "
                         "when --limit is below the split's size; before 2026-12-05 its first images: recount)")
    return LabelledImages(ds.x_train[index], ds.y_train[index], load_counts(counts_dir), meta, splits, ds.name,
                          images_digest(ds.x_train))


def load_counts(out_dir: str | Path) -> np.ndarray:
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "meta.json").read_text())
    num_shards = -(-meta["num_images"] // meta["shard_size"])
    missing = [s for s in range(num_shards) if not _shard_path(out_dir, s).exists()]
    if missing:
        raise FileNotFoundError(f"{out_dir}: {len(missing)} of {num_shards} shards missing; rerun the counts command to resume")
    return np.concatenate([np.load(_shard_path(out_dir, s)) for s in range(num_shards)])


def _shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard-{shard:06d}.npy"


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def _atomic_write(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``path`` whole or not at all, through a temp file of its own (two runs writing into one directory never
    share one); ``exclusive``: only if ``path`` does not exist yet (FileExistsError otherwise, nothing replaced)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            try:
                os.link(tmp, path)  # atomic create-if-absent
            except FileExistsError:
                raise
            except OSError as exc:  # a file system without hard links (vfat, some FUSE, network and overlay ones)
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                if path.exists():  # create-if-absent as before the link: not atomic, two runs started in the same
                    raise FileExistsError(path) from None  # instant may still both write (the later one wins)
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
