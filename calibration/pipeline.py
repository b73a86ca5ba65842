"""``certserve calibrate all``: data -> base model -> counts -> surrogate -> conformal calibration -> meta prior -> bundle.

Every expensive step leaves its result in the work directory (trained base model, resumable count shards), so a
rerun resumes instead of starting over. The bundle's manifest records the provenance: dataset, split sizes and
index digest, a digest of the training pool (pool_sha256: recalibration checks its --data against it), samples per
image, seeds, the tuning cut and the meta-learner's cut, what a user's own base model was trained on, code version,
device, timings and quality figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calibration.config import PipelineConfig
from calibration.conformal_fit import calibrate_surrogate, describe, level_min_images, tuning_cut
from calibration.counts import compute_counts, images_digest, labelled_calibration_images
from calibration.data import declared_training, load_dataset, make_splits
from calibration.meta import fit_meta_prior
from calibration.train import check_trainable, pick_device, save_torchscript, train_base, train_surrogate
from models.backends import OnnxBackend, load_backend
from models.bundle import BundleError, check_model, create_bundle, sha256_file
from models.defaults import default_batch_size
from models.export import export_onnx
from models.priors import FEATURE_NAMES, meta_features, softmax
from models.sampling import SamplingEngine


def run_pipeline(cfg: PipelineConfig, log=print, *, command: str | None = None) -> Path:
    """Build a bundle as configured; ``command`` (the CLI line) is recorded in the provenance."""
    started, timings = time.time(), {}
    tune = _checked_tune_size(cfg)  # refuse a bad configuration before hours of work, not after
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    ds = load_dataset(cfg.data)
    check_trainable(ds.input_shape)
    seen, base_trained_on = declared_training(cfg.base_trained_on, ds) if cfg.base else (None, None)
    splits = make_splits(len(ds.x_train), calibration=cfg.calibration_size, surrogate_train=cfg.surrogate_size,
                         seed=cfg.split_seed, exclude=seen).limited(cfg.limit)
    sur_idx, cal_idx = splits.surrogate_train, splits.calibration
    x_test, y_test = (ds.x_test[:cfg.limit], ds.y_test[:cfg.limit]) if cfg.limit else (ds.x_test, ds.y_test)
    log(f"data {ds.name}: base-train {len(splits.base_train)}, surrogate-train {len(sur_idx)}, calibration "
        f"{len(cal_idx)}, test {len(ds.x_test)}; device {device}")

    with _timed(timings, "base_seconds"):  # 1. base classifier (trained with noise), or the user's own
        base = _base_model(cfg, ds, splits, work, device)
    base_sha = sha256_file(base.onnx)
    base_quality = _base_quality(base.backend, x_test, y_test, cfg.sigma, cfg.seed)
    log(f"base: {base_quality}")
    engine = SamplingEngine(base.sampler, sigma=cfg.sigma, num_classes=len(ds.classes),
                            batch_size=cfg.batch_size or default_batch_size(device))

    with _timed(timings, "counts_surrogate_train_seconds"):  # 2. Monte-Carlo counts on surrogate-train
        sur_counts = compute_counts(engine, ds.x_train[sur_idx], cfg.train_samples, seed=surrogate_counts_seed(cfg.seed),
                                    out_dir=work / "counts-surrogate-train", model_sha256=base_sha,
                                    progress=cfg.progress)

    # 3. surrogate: soft-label CE on surrogate-train but a seeded random held-out part, which fits the meta-learner
    fit_part, meta_part = meta_cut(len(sur_idx), cfg.meta_fraction, cfg.split_seed)
    with _timed(timings, "surrogate_seconds"):
        surrogate_onnx = _surrogate(cfg, ds, ds.x_train[sur_idx][fit_part], sur_counts[fit_part], base, work, device)

    # 4. conformal calibration on the calibration split (disjoint from everything above): tune (a seeded random
    # part, drawn before any label is read), then calibrate on the rest
    with _timed(timings, "calibration_seconds"):
        cal_counts = compute_counts(engine, ds.x_train[cal_idx], cfg.cal_samples, out_dir=work / "counts-calibration",
                                    seed=cfg.seed + 3, model_sha256=base_sha, progress=cfg.progress)
        sur_backend = OnnxBackend(surrogate_onnx, device="cpu")
        calibration = calibrate_surrogate(sur_backend, ds.x_train[cal_idx], cal_counts, cfg.cal_samples,
                                          tune_size=tune, cut=tuning_cut(cfg.split_seed), levels=cfg.levels,
                                          max_bins=cfg.max_bins, scale=cfg.calibration_scale, gamma=cfg.gamma)
    log(f"conformal calibration ({len(cal_idx)} images, {calibration['num_tuning']} tune):\n{describe(calibration)}")

    with _timed(timings, "meta_seconds"):  # 5. meta-learned priors on the held-out part of surrogate-train
        meta_onnx, meta_fit = _meta_prior(cfg, ds.x_train[sur_idx][meta_part], sur_counts[meta_part], base.backend,
                                          sur_backend, work)
    log(f"meta prior: {meta_fit}")

    timings["total_seconds"] = time.time() - started
    provenance = {
        "dataset": ds.name, "pool_sha256": images_digest(ds.x_train), "splits": splits.record(), "limit": cfg.limit,
        "created_unix": int(time.time()),
        "samples_per_image": {"surrogate_train": cfg.train_samples, "calibration": cfg.cal_samples},
        "seeds": {"pipeline": cfg.seed, "splits": cfg.split_seed}, "code_version": _code_version(),
        "device": device, "sampler": base.sampler.name, "python": platform.python_version(),
        "torch": torch.__version__, "base_quality": base_quality, "base_trained_here": not cfg.base,
        "base_trained_on": base_trained_on, "tuning_cut": tuning_cut(cfg.split_seed), "calibration_from": "build",
        "meta_fit": meta_fit, "meta_cut": {"method": "seeded-permutation", "seed": cfg.split_seed,
                                           "stream": META_STREAM},
        "config": {**dataclasses.asdict(cfg), "tune_size": tune, "tune_size_requested": cfg.tune_size},  # used, asked
        "timings": {k_: round(v, 1) for k_, v in timings.items()}, "command": command,
    }
    bundle = create_bundle(
        cfg.out, base=base.onnx, surrogate=surrogate_onnx, meta=meta_onnx, sigma=cfg.sigma,
        input_shape=ds.input_shape, classes=ds.classes, name=cfg.name or Path(cfg.out).name,
        calibration=calibration,
        meta_features=list(FEATURE_NAMES), provenance=provenance, overwrite=cfg.overwrite)
    log(f"bundle written to {bundle.root} in {timings['total_seconds']:.0f} s")
    (work / "pipeline.json").write_text(json.dumps(provenance, indent=2, default=str))
    return bundle.root


META_STREAM = 50217  # the meta-learner's held-out part draws from default_rng([split seed, META_STREAM])


def meta_cut(num_images: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(surrogate positions, meta-learner positions) among the ``num_images`` surrogate-train images, both sorted:
    a seeded random ``fraction`` (at least one) holds out for the meta-learner. Not the last ones: the split is in
    pool-index order, and a pool stored in order (an .npz sorted by class) would train the surrogate on some classes
    and the meta-learner on others (the surrogate's arg-max is the class every sequential route tests)."""
    n_meta = meta_size(num_images, fraction)
    held = np.sort(np.random.default_rng([int(seed), META_STREAM]).permutation(num_images)[:n_meta])
    return np.setdiff1d(np.arange(num_images), held), held


def meta_size(num_images: int, fraction: float) -> int:
    """How many of ``num_images`` surrogate-train images :func:`meta_cut` holds out for the meta-learner."""
    return max(1, int(round(num_images * fraction)))


def _checked_tune_size(cfg: PipelineConfig) -> int:
    """The tuning images taken from the calibration split; ValueError for a configuration that cannot build a
    valid bundle (checked before any work)."""
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    work = Path(cfg.work).resolve()
    if work == out.resolve() or out.resolve() in work.parents:  # the work files would make out non-empty: refused
        raise ValueError(f"--work {cfg.work} lies in --out {cfg.out}: the bundle directory would hold the work "
                         "files (and be refused, after all the work, as not empty); use a --work outside --out")
    if cfg.base and cfg.base_trained_on is None:
        raise ValueError(
            "--base needs --base-trained-on: the calibration split is carved from the training images of --data, "
            "which your model was probably trained on, and calibrating on images it was trained on voids the "
            "guarantee. Pass --base-trained-on none if it never saw any image of --data, or --base-trained-on "
            "FILE.npy with the indices (into the .npz's x array; for fashion-mnist its 60,000 training images) of "
            "the images it was trained on: those are kept out of the calibration and surrogate-train splits")
    if cfg.base_trained_on is not None and not cfg.base:
        raise ValueError("--base-trained-on describes a model given with --base; without --base the base model is "
                         "trained here on the base-train split")
    n_sur = min(cfg.surrogate_size, cfg.limit or cfg.surrogate_size)  # an empty part failed after base and counts
    if n_sur - meta_size(n_sur, cfg.meta_fraction) < 1:
        raise ValueError(f"the surrogate-train split ({n_sur} images) with --meta-fraction {cfg.meta_fraction} "
                         "leaves no image to train the surrogate on (the rest fit the meta prior): use a larger "
                         "--surrogate-size (and --limit) or a smaller --meta-fraction")
    usable = min(cfg.calibration_size, cfg.limit or cfg.calibration_size)
    need, tune = level_min_images(max(cfg.levels), gamma=cfg.gamma), min(cfg.tune_size, usable // 2)  # the fit's rule
    if usable - tune < need:
        raise ValueError(f"the largest level {max(cfg.levels)} needs at least {need} calibration images besides the "
                         f"tuning ones; got {usable} of which {tune} tune (tune_size is capped at half the split)")
    return tune


@contextlib.contextmanager
def _timed(timings: dict, name: str):
    t0 = time.time()
    yield
    timings[name] = time.time() - t0


@dataclasses.dataclass
class _Base:
    """The base classifier: its ONNX file (hashed into the bundle), a CPU session, the sampler the counts are drawn
    with (TorchScript on CUDA when trained here) and the trained torch module (None for a user's own model)."""

    onnx: Path
    backend: OnnxBackend
    sampler: object
    module: object = None


def _base_model(cfg: PipelineConfig, ds, splits, work: Path, device: str) -> _Base:
    """The user's own base model (--base), or one trained here with noise on base-train (reused from the work
    directory when it was trained exactly so)."""
    if cfg.base:
        backend = OnnxBackend(Path(cfg.base), device=device if device == "cuda" else "cpu")
        try:  # what the bundle will check at the end, checked before any work (a fixed batch axis failed the run
            # with onnxruntime's traceback; a wider output than the data's classes, after all the counts)
            check_model(backend, f"--base {cfg.base}", list(ds.input_shape), len(ds.classes), expected_by="--data")
        except BundleError as exc:
            raise ValueError(f"{exc} (--data {ds.name!r}: images {ds.input_shape}, {len(ds.classes)} classes)"
                             ) from None
        return _Base(Path(cfg.base), backend, backend)
    onnx, script = work / "base.onnx", work / "base.pt"
    # the pool's images and labels, not only the data's name: the split indices name other images in a regenerated
    # or reshuffled file of the same name, where a reused base model's training images would land in calibration
    trained_on = {"data": ds.name, "pool_sha256": images_digest(ds.x_train),
                  "labels_sha256": hashlib.sha256(np.ascontiguousarray(ds.y_train, dtype=np.int64)).hexdigest(),
                  "sigma": cfg.sigma, "splits": splits.record(), "epochs": cfg.base_epochs, "seed": cfg.seed}
    if _reusable_base(work, trained_on):
        module = torch.jit.load(str(script), map_location="cpu")
    else:
        idx = splits.base_train
        module = train_base(ds.x_train[idx], ds.y_train[idx], num_classes=len(ds.classes), sigma=cfg.sigma,
                            epochs=cfg.base_epochs, seed=cfg.seed, device=device)
        example = torch.zeros((1, *ds.input_shape))
        save_torchscript(module, example, script)
        export_onnx(module.cpu(), example, onnx)
        (work / "base.json").write_text(json.dumps(trained_on, indent=2))
    backend = OnnxBackend(onnx, device="cpu")
    return _Base(onnx, backend, load_backend(script, device=device) if device == "cuda" else backend, module)


def _surrogate(cfg: PipelineConfig, ds, x_fit, counts_fit, base: _Base, work: Path, device: str) -> Path:
    """Train the RRISE surrogate on soft labels (initialized from the base model when it was trained here) and
    export it; returns its ONNX file."""
    init = _plain_copy(base.module, len(ds.classes), ds.input_shape) if base.module is not None else None
    surrogate = train_surrogate(x_fit, counts_fit, init=init, epochs=cfg.surrogate_epochs, seed=cfg.seed + 2,
                                device=device)
    return export_onnx(surrogate.cpu(), torch.zeros((1, *ds.input_shape)), work / "surrogate.onnx")


def _meta_prior(cfg: PipelineConfig, x_meta, counts_meta, base_backend, sur_backend, work: Path):
    """(meta.onnx, fit report): the meta-learner of Beta priors from clean-image features, fitted on held-out
    surrogate-train images and their counts."""
    feats, c_meta = meta_features(base_backend.forward(x_meta), softmax(sur_backend.forward(x_meta)))
    hits = counts_meta[np.arange(len(c_meta)), c_meta]
    model, fit = fit_meta_prior(feats, hits, np.full(len(hits), cfg.train_samples))
    onnx = export_onnx(model, torch.zeros((1, len(FEATURE_NAMES))), work / "meta.onnx", input_name="features",
                       output_name="prior")
    return onnx, fit


def recalibrate(bundle_dir, *, counts_dir, data: str, calibration_size: int, surrogate_size: int, split_seed: int,
                tune_size: int, out, overwrite: bool = False, command: str | None = None, log=print,
                first_tuning: bool = False, **options) -> Path:
    """A copy of a bundle whose surrogate calibration is refitted from count shards of its calibration split
    (``certserve calibrate counts --split calibration`` with the bundle's base model; their ``meta.json`` must name
    its sha256 and the images counted). The models are copied unchanged.

    The provenance keeps the build's record and adds this run's as ``recalibration`` (benches read the latest
    there); an earlier recalibration's record moves to the list ``earlier_recalibrations`` (oldest first), and
    ``calibration_from`` becomes "recalibration". The build's top-level fields about its calibration
    (``samples_per_image.calibration``, ``config.cal_samples``, ``config.tune_size``, ``tuning_cut``, ...) then
    describe a calibration that the ``recalibration`` record supersedes.

    ``first_tuning``: the split's first ``tune_size`` images tune instead of a seeded random cut (recorded as no
    ``tuning_cut``, as bundles fitted before 2026-12-05): the shipped bundle's cut, the images its calibration knobs
    (``max_bins``, ``scale``) were chosen on (docs/conformal-knobs.md), so that a rebuild calibrates on none of them.
    Only with counts of the whole calibration split (what that record means)."""
    from models.bundle import load_bundle

    bundle = load_bundle(bundle_dir, for_recalibration=True)
    m = bundle.manifest
    _check_bundle_records_its_splits(m)
    labelled = labelled_calibration_images(counts_dir, data, calibration_size=calibration_size,
                                           surrogate_size=surrogate_size, split_seed=split_seed,
                                           model_sha256=bundle.model_sha256)
    _check_counts_fit_bundle(labelled, m, counts_dir)
    if bundle.path("surrogate") is None:
        raise ValueError(f"bundle {m.name!r} has no surrogate to calibrate")
    if first_tuning and labelled.meta["num_images"] != len(labelled.splits.calibration):
        raise ValueError(f"--tuning-cut first needs counts of the whole calibration split "
                         f"({len(labelled.splits.calibration)} images); {counts_dir} counted "
                         f"{labelled.meta['num_images']}")
    cut = "first" if first_tuning else tuning_cut(split_seed)
    calibration = calibrate_surrogate(bundle.backend("surrogate", device="cpu"), labelled.images, labelled.counts,
                                      labelled.meta["num_samples"], tune_size=tune_size, cut=cut, **options)
    log(describe(calibration))
    built = m.provenance or {}
    provenance = {**built, "calibration_from": "recalibration", "recalibration": {
        "from_bundle": m.name, "dataset": labelled.dataset, "pool_sha256": labelled.pool_sha256,
        "counts": {k: labelled.meta[k] for k in ("num_samples", "seed", "num_images", "sigma")},
        "splits": labelled.splits.record(), "tune_size": tune_size, **({} if first_tuning else {"tuning_cut": cut}),
        "options": options,
        "code_version": _code_version(), "created_unix": int(time.time()), "command": command}}
    if built.get("recalibration") is not None:
        provenance["earlier_recalibrations"] = [*built.get("earlier_recalibrations", []), built["recalibration"]]
    changed = [role for role, art in m.artifacts.items() if sha256_file(bundle.path(role)) != art.sha256]
    if changed:  # a model file replaced on disk while this ran: refused before out changes (it was refused after
        # out's bundle had been replaced, then unlinking its manifest destroyed the bundle an --overwrite named)
        raise ValueError(f"{', '.join(changed)} of {bundle_dir} changed on disk during the recalibration; nothing "
                         "was written: rerun it")
    with tempfile.TemporaryDirectory() as tmp:  # the verified bytes the calibration was fitted on, not the files
        models = {role: Path(tmp) / f"{role}.onnx" for role in m.artifacts}
        for role, path in models.items():
            path.write_bytes(bundle.model_bytes(role))
        new = create_bundle(out, base=models["base"], surrogate=models.get("surrogate"), meta=models.get("meta"),
                            sigma=m.sigma, input_shape=tuple(m.input.shape), classes=list(m.classes), name=m.name,
                            version=m.version, calibration=calibration, meta_features=m.meta_features,
                            provenance=provenance, overwrite=overwrite)
    log(f"bundle written to {new.root}")
    return new.root


def _check_bundle_records_its_splits(manifest) -> None:
    """ValueError unless the bundle's provenance records the splits its models were trained with, as splits that
    ``certserve calibrate counts`` rebuilds: without them no check can keep its models' training images out of
    the calibration split."""
    prov = manifest.provenance or {}
    if prov.get("splits") is None:
        raise ValueError(f"bundle {manifest.name!r} records no splits in its provenance, so nothing shows which "
                         "images its models were trained on, and recalibrating could calibrate on them: rebuild "
                         "it with `certserve calibrate all`")
    if (prov.get("base_trained_on") or {}).get("declared") == "file":
        raise ValueError(f"bundle {manifest.name!r} has a base model declared trained on part of the training pool "
                         f"({prov['base_trained_on'].get('path')}), kept out of its splits; `certserve calibrate "
                         "counts` does not rebuild those splits: rebuild it with `certserve calibrate all --base ... "
                         "--base-trained-on ...`")
    if prov.get("base_trained_here") is False and (prov.get("base_trained_on") or {}).get("declared") != "none":
        raise ValueError(f"bundle {manifest.name!r} has a base model of its user's (--base) with no record of the "
                         "images it was trained on (built before --base-trained-on existed), so its calibration "
                         "split may hold them: rebuild it with `certserve calibrate all --base ... "
                         "--base-trained-on none|FILE.npy`")


def _check_counts_fit_bundle(labelled, manifest, counts_dir) -> None:
    """ValueError unless the counts were drawn at the bundle's sigma and the split arguments rebuild the splits the
    bundle was built with (its provenance must record them, :func:`_check_bundle_records_its_splits`): other
    splits would put images its models were trained on into the calibration split, other noise would calibrate
    another smoothed classifier."""
    if float(labelled.meta["sigma"]) != float(manifest.sigma):
        raise ValueError(f"{counts_dir} was counted at sigma {labelled.meta['sigma']}; the bundle smooths at sigma "
                         f"{manifest.sigma}: count at the bundle's sigma")
    _check_bundle_records_its_splits(manifest)
    prov = manifest.provenance
    # split indices name images only within the pool they were cut from: the same indices into another data
    # source (another dataset, or the same images stored in another order) name images the models may have seen
    if prov.get("pool_sha256") is not None:
        if labelled.pool_sha256 != prov["pool_sha256"]:
            raise ValueError(f"--data {labelled.dataset!r} is not the training pool the bundle was built from (its "
                             "images, in order, differ from the recorded pool_sha256): its split indices would "
                             "name other images, possibly ones the models were trained on; pass the bundle's data")
    elif prov.get("dataset") is not None and labelled.dataset != prov["dataset"]:
        raise ValueError(f"--data {labelled.dataset!r} is not the dataset the bundle was built from "
                         f"({prov['dataset']!r}): its split indices would name other images, possibly ones the "
                         "models were trained on; pass the bundle's data")
    splits = labelled.splits.limited(prov.get("limit"))
    if splits.record() != prov["splits"]:
        legacy = (" (a bundle built with --limit before 2026-12-05 took the first images of each split, which no "
                  "longer rebuilds: rebuild it)" if prov.get("limit") and "tuning_cut" not in prov else "")
        raise ValueError(f"the split arguments give other splits ({splits.record()}) than the bundle was built with "
                         f"({prov['splits']}); pass the bundle's --calibration-size, --surrogate-size and "
                         f"--split-seed{legacy}")
    pipeline_seed = (prov.get("seeds") or {}).get("pipeline")
    if pipeline_seed is not None and int(labelled.meta["seed"]) == surrogate_counts_seed(int(pipeline_seed)):
        raise ValueError(f"{counts_dir} was counted with seed {labelled.meta['seed']}, the seed of the noise the "
                         "bundle's surrogate was trained on: calibration labels need noise independent of the "
                         "surrogate; count with another --seed")


def surrogate_counts_seed(pipeline_seed: int) -> int:
    """The seed of the surrogate's training counts in a build with ``pipeline_seed``."""
    return pipeline_seed + 1


def _reusable_base(work: Path, trained_on: dict) -> bool:
    """True when the work directory holds a base model trained as ``trained_on`` says (data, its pool's images and
    labels, sigma, exact splits, epochs, seed); False when it holds none. A base model trained otherwise is refused,
    not reused: its training images could be this run's calibration images, which would void the surrogate's
    guarantee."""
    files = [work / name for name in ("base.onnx", "base.pt", "base.json")]
    if not any(f.exists() for f in files):
        return False
    recorded = json.loads(files[2].read_text()) if files[2].exists() else None
    if all(f.exists() for f in files) and recorded == trained_on:
        return True
    raise ValueError(f"{work} holds a base model trained {'otherwise' if recorded else 'without a record'} "
                     f"({recorded}; this run: {trained_on}): delete base.onnx, base.pt and base.json there, or use "
                     "another --work directory")


def _base_quality(backend, x, y, sigma, seed) -> dict:
    clean = backend.forward(x).argmax(axis=1)
    noisy = backend.noisy_predictions(x, np.ones(len(x), dtype=np.int64), sigma, np.random.default_rng(seed))
    return {"clean_test_accuracy": round(float((clean == y).mean()), 4),
            "noisy_test_accuracy": round(float((noisy == y).mean()), 4)}


def _plain_copy(module, num_classes, input_shape):
    """A trainable SmallCNN with the weights of ``module`` (a SmallCNN or its TorchScript)."""
    from models.networks import SmallCNN

    c, h, w = input_shape
    model = SmallCNN(c, num_classes, h, w)
    model.load_state_dict({k: v.detach().cpu() for k, v in module.state_dict().items()})
    return model


def _code_version() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
