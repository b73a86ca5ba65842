"""``certserve calibrate ...`` and ``certserve bundle ...`` subcommands (argparse; heavy imports inside handlers)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def add_calibrate_commands(sub) -> None:
    cal = sub.add_parser("calibrate", help="offline pipeline: counts, surrogate, conformal calibration, evaluation")
    cal_sub = cal.add_subparsers(dest="calibrate", required=True)

    from calibration.config import PipelineConfig
    from calibration.evaluate import non_negative_int, positive_float, positive_int

    all_ = cal_sub.add_parser("all", help="build a full bundle (base, surrogate, meta) from data",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(PipelineConfig):
        flag = "--" + f.name.replace("_", "-")
        type_name = str(f.type)
        if isinstance(f.default, bool):
            all_.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        conv = int if type_name.startswith("int") else float if type_name.startswith("float") else str
        if type_name.startswith("tuple"):
            conv = _float_list
        if "None" in type_name and f.name != "base_trained_on":  # there "none" is a declaration, not "unset"
            conv = _optional(conv)
        all_.add_argument(flag, type=conv, default=f.default, help=f"{_HELP.get(f.name, '')}({type_name})")
    all_.set_defaults(func=_run_all)

    counts = cal_sub.add_parser("counts", help="Monte-Carlo class counts of a model on a data split (resumable)")
    counts.add_argument("--model", required=True, help="base model: .onnx (onnxruntime) or .pt (TorchScript)")
    counts.add_argument("--data", default="fashion-mnist")
    counts.add_argument("--split", choices=["calibration", "surrogate-train", "base-train", "test"], default="test")
    counts.add_argument("--calibration-size", type=int, default=PipelineConfig.calibration_size)
    counts.add_argument("--surrogate-size", type=int, default=PipelineConfig.surrogate_size)
    counts.add_argument("--split-seed", type=non_negative_int, default=0)
    counts.add_argument("--limit", type=positive_int, default=None, help="a seeded random N images of a training-pool split "
                        "(Splits.limited, kept in index order; what `calibrate conformal` reads back); the first N "
                        "of test")
    counts.add_argument("--n", type=positive_int, required=True, help="noise samples per image")
    counts.add_argument("--sigma", type=positive_float, required=True)
    counts.add_argument("--seed", type=non_negative_int, default=0)
    counts.add_argument("--batch-size", type=positive_int, default=1024)
    counts.add_argument("--device", default="auto")
    counts.add_argument("--out", required=True, help="directory of count shards (rerun to resume)")
    counts.set_defaults(func=_run_counts)

    conf = cal_sub.add_parser("conformal", help="(re)calibrate a bundle's surrogate from Monte-Carlo counts of the "
                              "calibration split (probit scores, Mondrian bins, a ladder of risk levels)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    conf.add_argument("bundle", help="bundle with base, surrogate (and meta) models; its models are copied")
    conf.add_argument("--counts", required=True, help="count shards of `certserve calibrate counts --split "
                      "calibration` made with this bundle's base model (full 10k+ samples per image)")
    conf.add_argument("--data", default="fashion-mnist")
    conf.add_argument("--calibration-size", type=int, default=PipelineConfig.calibration_size)
    conf.add_argument("--surrogate-size", type=int, default=PipelineConfig.surrogate_size)
    conf.add_argument("--split-seed", type=non_negative_int, default=0)
    conf.add_argument("--tune-size", type=int, required=True, help="N of the counted images tune the maps and bin "
                      "edges (a seeded random N, the cut recorded as tuning_cut; the first N with --tuning-cut "
                      "first); the rest calibrate")
    conf.add_argument("--tuning-cut", choices=["random", "first"], default="random",
                      help="first: the first --tune-size counted images tune, not a seeded random cut: the shipped "
                      "bundle's cut, the images the default --max-bins and --scale were chosen on "
                      "(docs/conformal-knobs.md); needs counts of the whole calibration split")
    conf.add_argument("--levels", default=",".join(str(a) for a in PipelineConfig.levels), help="risk levels")
    conf.add_argument("--max-bins", type=int, default=PipelineConfig.max_bins)
    conf.add_argument("--scale", choices=["spread", "unit"], default=PipelineConfig.calibration_scale)
    conf.add_argument("--gamma", type=float, default=None, help="training-conditional (PAC) quantiles at this gamma (never below the marginal rank)")
    conf.add_argument("--out", required=True)
    conf.add_argument("--overwrite", action="store_true")
    conf.set_defaults(func=_run_conformal)

    ev = cal_sub.add_parser("evaluate", help="side-by-side evaluation of all certification methods on test images")
    from calibration.evaluate import add_arguments as add_eval_arguments

    add_eval_arguments(ev)


_HELP = {"base_trained_on": "required with --base: 'none' (your model saw no image of --data) or an .npy of the "
                            "indices of --data's images it was trained on (into the .npz's x array; for fashion-mnist "
                            "its training set), kept out of the calibration and surrogate-train splits "}


def _float_list(text: str) -> tuple[float, ...]:
    """Comma-separated numbers, e.g. 0.1,0.05,0.01."""
    return tuple(float(v) for v in text.split(",") if v.strip())


def _optional(conv):
    def parse(text: str):
        return None if text.lower() == "none" else conv(text)

    parse.__name__ = conv.__name__
    return parse


def add_bundle_commands(sub) -> None:
    b = sub.add_parser("bundle", help="create or verify a model bundle")
    b_sub = b.add_subparsers(dest="bundle", required=True)
    create = b_sub.add_parser("create", help="sequential-only bundle from any ONNX classifier taking [0,1] pixels")
    create.add_argument("--base", required=True, help="ONNX classifier, input (N, C, H, W) in [0, 1], output logits")
    create.add_argument("--sigma", type=float, required=True)
    create.add_argument("--input-shape", required=True, help="C,H,W e.g. 1,28,28")
    create.add_argument("--classes", required=True, help="comma-separated class names, in output order")
    create.add_argument("--name", default=None)
    create.add_argument("--out", required=True)
    create.add_argument("--overwrite", action="store_true")
    create.set_defaults(func=_run_bundle_create)
    verify = b_sub.add_parser("verify", help="verify hashes, shapes and schema of a bundle")
    verify.add_argument("path")
    verify.set_defaults(func=_run_bundle_verify)


def _run_all(args) -> int:
    from calibration.config import PipelineConfig
    from calibration.pipeline import run_pipeline

    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    cfg = PipelineConfig(**{k: v for k, v in vars(args).items() if k in names})
    run_pipeline(cfg, command=getattr(args, "command_line", None) or " ".join(["certserve", *sys.argv[1:]]))
    return 0


def _run_counts(args) -> int:
    import numpy as np

    from calibration.counts import compute_counts
    from calibration.data import load_dataset, make_splits
    from calibration.evaluate import sampler_on
    from models.backends import load_backend
    from models.bundle import sha256_file
    from models.sampling import SamplingEngine

    ds = load_dataset(args.data)
    if args.split == "test":
        images = ds.x_test[: args.limit] if args.limit else ds.x_test
    else:
        splits = make_splits(len(ds.x_train), calibration=args.calibration_size,
                             surrogate_train=args.surrogate_size, seed=args.split_seed).limited(args.limit)
        images = ds.x_train[getattr(splits, args.split.replace("-", "_"))]
    backend = sampler_on(args.device, lambda: load_backend(args.model, device=args.device))
    _check_model_fits(backend, args.model, ds)  # before meta.json records this run in --out
    engine = SamplingEngine(backend, sigma=args.sigma, num_classes=len(ds.classes), batch_size=args.batch_size)
    counts = compute_counts(engine, images, args.n, out_dir=args.out, seed=args.seed,
                            model_sha256=sha256_file(args.model))
    top = counts.max(axis=1) / args.n
    print(json.dumps({"images": len(counts), "samples_per_image": args.n, "mean_top_rate": round(float(np.mean(top)), 4),
                      "out": args.out}))
    return 0


def _check_model_fits(backend, path: str, ds) -> None:
    """BundleError/ValueError unless the model takes ``ds``'s images and gives one logit per class of ``ds``:
    another input shape failed in onnxruntime (a traceback) after meta.json was written; more outputs than classes
    failed only where a noisy copy predicted one, fewer counted silently (a class never counted)."""
    import numpy as np

    from calibration.data import check_fits
    from models.bundle import check_model

    if hasattr(backend, "session"):  # onnxruntime: the bundle's own check (one float input, dynamic batch axis)
        check_model(backend, f"--model {path}", list(ds.input_shape), len(ds.classes), expected_by="--data")
        return
    try:
        out = np.asarray(backend.forward(np.zeros((2, *ds.input_shape), dtype=np.float32)))
    except Exception as exc:  # noqa: BLE001 - whatever the framework raises, said on one line
        raise ValueError(f"--model {path}: a forward pass on a batch of 2 images of --data's shape "
                         f"{ds.input_shape} failed: {exc}") from None
    if out.ndim != 2 or len(out) != 2:
        raise ValueError(f"--model {path}: a batch of 2 images gives outputs of shape {out.shape}; expected "
                         f"(2, {len(ds.classes)}): one row of logits per image")
    check_fits(ds, ds.input_shape, out.shape[1], f"--model {path}")


def _run_conformal(args) -> int:
    from calibration.config import levels_problem
    from calibration.pipeline import recalibrate

    try:
        levels = _float_list(args.levels)
    except ValueError:
        levels = ()
    # checked before any work, naming the flag (as `calibrate all`): --max-bins 0 was refused after the fit as "too
    # few calibration images", --levels '' / 'a' with "max() arg is an empty sequence" / "could not convert ...",
    # --levels 0.1,0.1 by the bundle's schema after the fit
    problem = levels_problem(levels)
    if problem is not None:
        raise ValueError(f"--levels must be {problem}, got {args.levels!r}")
    if args.max_bins < 1:
        raise ValueError(f"--max-bins must be an integer >= 1, got {args.max_bins}")
    recalibrate(args.bundle, counts_dir=args.counts, data=args.data, calibration_size=args.calibration_size,
                surrogate_size=args.surrogate_size, split_seed=args.split_seed, tune_size=args.tune_size, out=args.out,
                overwrite=args.overwrite, levels=levels, max_bins=args.max_bins, scale=args.scale, gamma=args.gamma,
                command=getattr(args, "command_line", None), first_tuning=args.tuning_cut == "first")
    return 0


def _run_bundle_create(args) -> int:
    from models.bundle import create_bundle

    try:
        shape = tuple(int(v) for v in args.input_shape.split(","))
        if len(shape) != 3:
            raise ValueError
    except ValueError:
        print(f"error: --input-shape must be C,H,W (three integers), got {args.input_shape!r}", file=sys.stderr)
        return 2
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    bundle = create_bundle(args.out, base=args.base, sigma=args.sigma, input_shape=shape, classes=classes,
                           name=args.name, provenance={"created_by": "certserve bundle create"},
                           overwrite=args.overwrite)
    print(f"bundle {bundle.manifest.name!r} written to {bundle.root} (no surrogate: sequential, fixed and cohen modes; auto always samples)")
    return 0


def _run_bundle_verify(args) -> int:
    from models.bundle import load_bundle

    bundle = load_bundle(args.path)
    m = bundle.manifest
    print(json.dumps({"name": m.name, "sigma": m.sigma, "artifacts": sorted(m.artifacts),
                      "alpha_cal": m.calibration.alpha_cal if m.calibration else None, "ok": True}))
    return 0
