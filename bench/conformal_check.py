"""Empirical miscoverage of the surrogate's calibration at levels where it is measurable (issue 9, item 6b).

Data: the bundle's labelled calibration images (count shards of ``certserve calibrate counts --split calibration``,
10^4 samples each). The bundle's ``--tune`` tuning images (as calibration.conformal_fit.tuning_positions names them
from its provenance, see bench.conformal_knobs.bundle_tuning_positions: the first ones for the shipped bundle, the
recorded seeded subset for a bundle fitted since 2026-12-05) fit the maps and bin edges exactly as the bundle's
calibration does; the rest are split at random, ``--repeats`` times, into a calibration part and >= 2,000 held-out
images. Per split and level: the per-bin quantiles from the calibration part, then on the held-out images the share
of certificates whose lower bound exceeds the truth, estimated two ways from the held-out image's own 10^4 samples:
above the point estimate k/n (slightly over-counts: k/n is itself noisy) and above a (1 - 0.001) Clopper-Pearson upper
bound (clear misses).
The guarantee says: mean over splits <= level (marginal over the calibration draw and the inputs).

    python -m bench.conformal_check --counts runs/fmnist-sigma0.25/counts-calibration-10k-8000 --tune 1024 --levels 0.1,0.05,0.01,0.005
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.special import ndtri

from bench.conformal_knobs import add_bundle_arguments, bundle_flag, bundle_tuning_positions
from calibration.conformal_fit import fit_level
from calibration.counts import labelled_calibration_images
from models.backends import OnnxBackend
from models.bundle import ConformalLevel
from smoothing import clopper_pearson_upper, conformal_lower, surrogate_log_odds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_bundle_arguments(p)
    p.add_argument("--counts", required=True)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--calibration-size", type=int, default=8000)
    p.add_argument("--surrogate-size", type=int, default=16000)
    p.add_argument("--held-out", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--levels", default="0.1,0.05,0.01")
    p.add_argument("--max-bins", type=int, default=2, help="as the bundle (calibration.config.PipelineConfig)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/conformal-check.md")
    args = p.parse_args(argv)
    lab = labelled_calibration_images(args.counts, args.data, calibration_size=args.calibration_size,
                                      surrogate_size=args.surrogate_size)
    meta = lab.meta
    surrogate, tune, cut = bundle_tuning_positions(args, len(lab.images))
    cls, g = surrogate_log_odds(OnnxBackend(surrogate, device="cpu").forward(lab.images))
    hits = lab.counts[np.arange(len(cls)), cls]
    rows = [check_level(float(a), g, hits, meta["num_samples"], tune, args) for a in args.levels.split(",")]
    write(rows, args, meta, len(tune), cut)
    return 0


def check_level(alpha, g, hits, n, tune, args) -> dict:
    """Miss rates over ``args.repeats`` random calibration / held-out splits of the non-tuning images (``tune``: the
    sorted positions of the tuning images)."""
    rng = np.random.default_rng(args.seed)
    rest = np.setdiff1d(np.arange(len(g)), tune)
    z_point = ndtri(np.clip(hits / n, 0.0, 1.0))
    z_upper = ndtri(np.asarray(clopper_pearson_upper(hits, n, 0.001)))
    point, clear, certified = [], [], []
    for _ in range(args.repeats):
        perm = rng.permutation(rest)
        test, cal = perm[: args.held_out], perm[args.held_out:]
        lv = fit_level(g[tune], hits[tune], g[cal], hits[cal], n, alpha, max_bins=args.max_bins, num_knots=48,
                       bin_slack=1.05, gamma=None, scale="spread")
        z = conformal_lower(g[test], **ConformalLevel(**lv).as_arguments())
        ok = z > 0
        point.append(np.mean(ok & (z > z_point[test])))
        clear.append(np.mean(ok & (z > z_upper[test])))
        certified.append(np.mean(ok))
    point, clear = np.array(point), np.array(clear)
    return {"alpha": alpha, "calibration": len(rest) - args.held_out, "held_out": args.held_out,
            "bins": len(lv["q_hat"]), "miss_point_mean": float(point.mean()),
            "miss_point_se": float(point.std(ddof=1) / np.sqrt(len(point))), "miss_clear_mean": float(clear.mean()),
            "splits_over_level": float(np.mean(point > alpha)), "certified": float(np.mean(certified))}


def write(rows, args, meta, num_tuning: int, cut: str) -> None:
    lines = ["# Empirical miscoverage of the surrogate's calibration", "",
             f"Command: `python -m bench.conformal_check{bundle_flag(args)} --counts {args.counts} --tune {num_tuning} "
             f"--levels {args.levels}` ({args.repeats} random splits; labels: {meta['num_samples']:,} samples per "
             f"image, {meta['num_images']:,} labelled calibration images, {cut} {num_tuning} tune).", "",
             "| level | calibration images | held-out images | bins | miss rate vs k/n (mean +- SE) | clear misses "
             "(vs CP upper) | splits with realised rate > level | certified share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['alpha']:g} | {r['calibration']} | {r['held_out']} | {r['bins']} | "
                     f"{r['miss_point_mean']:.4f} +- {r['miss_point_se']:.4f} | {r['miss_clear_mean']:.4f} | "
                     f"{r['splits_over_level']:.2f} | {r['certified']:.3f} |")
    lines += ["", "The marginal guarantee bounds the mean over splits by the level; a single split (one bundle) can "
              "exceed it (last-but-one column): that is what the training-conditional option (`--gamma`) bounds.", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
