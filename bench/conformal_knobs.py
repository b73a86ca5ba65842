"""How the calibration's knobs were chosen: on the TUNING part of the calibration split only (never on the images that
give the quantiles, never on the test set).

The tuning images: the ``--tune`` labelled calibration images that the bundle's calibration tuned on, as
calibration.conformal_fit.tuning_positions names them from the bundle's provenance (``bundle_tuning_positions``): the
first ones for the shipped bundle (fitted before the seeded cut), the recorded seeded subset (``tuning_cut``) else.

Repeated 2-fold splits of the tuning images: fit maps and bins on one half, quantiles on the other, and score the mean
certified radius (0 for wrong or abstained) on that half, at levels 0.05 and 0.01 (the tuning part is too small for
quantiles at 0.001). Knobs: the score's scale ("unit": additive probit scores; "spread": normalized by the local
residual spread) and the most Mondrian bins per level. The rule: the largest mean over both levels.

    python -m bench.conformal_knobs --counts runs/fmnist-sigma0.25/counts-calibration-10k --tune 1024
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from calibration.conformal_fit import calibration_record, fit_calibration, tuning_positions
from calibration.counts import labelled_calibration_images
from models.backends import OnnxBackend
from models.bundle import DEFAULT_BUNDLE_DIR, ConformalLevel, load_bundle
from smoothing import conformal_certificate, surrogate_log_odds

LEVELS = (0.05, 0.01)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_bundle_arguments(p)
    p.add_argument("--counts", required=True)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--calibration-size", type=int, default=8000)
    p.add_argument("--surrogate-size", type=int, default=16000)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--out", default="docs/conformal-knobs.md")
    args = p.parse_args(argv)
    lab = labelled_calibration_images(args.counts, args.data, calibration_size=args.calibration_size,
                                      surrogate_size=args.surrogate_size)
    meta = lab.meta
    surrogate, tune, cut = bundle_tuning_positions(args, len(lab.images))
    cls, g = surrogate_log_odds(OnnxBackend(surrogate, device="cpu").forward(lab.images[tune]))
    hits = lab.counts[tune][np.arange(len(cls)), cls]
    correct = cls == lab.labels[tune]
    results = {}
    for scale, point in (("unit", "isotonic"), ("spread", "isotonic"), ("spread", "raw")):
        for bins in (1, 2, 3, 4):
            per_level = tuning_fold_radius(g, hits, correct, meta["num_samples"], args.sigma, repeats=args.repeats,
                                           max_bins=bins, scale=scale, point=point)
            for alpha, radii in per_level.items():
                results[(f"{scale}" if point == "isotonic" else f"{scale}, raw p_hat", bins, alpha)] = radii
    rows = sorted(((np.mean([np.mean(results[(s, b, a)]) for a in LEVELS]), s, b) for s, b, _ in results), reverse=True)
    lines = ["# Choosing the calibration's knobs (tuning part only)", "",
             f"Command: `python -m bench.conformal_knobs{bundle_flag(args)} --counts {args.counts} --tune {len(tune)}` "
             f"({args.repeats} random 2-fold splits of {cut} {len(tune)} labelled calibration images).", "",
             "| scale | max bins | mean radius, level 0.05 | level 0.01 | mean of both |", "|---|---|---|---|---|"]
    for mean, s, b in dict.fromkeys(rows):
        lines.append(f"| {s} | {b} | {np.mean(results[(s, b, 0.05)]):.4f} | {np.mean(results[(s, b, 0.01)]):.4f} | "
                     f"{mean:.4f} |")
    lines += ["", f"Chosen (largest mean of both levels): scale = {rows[0][1]}, max bins = {rows[0][2]}.", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def add_bundle_arguments(p: argparse.ArgumentParser) -> None:
    """--bundle, --surrogate, --tune: the options naming the tuning images (see bundle_tuning_positions)."""
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE_DIR),
                   help="the bundle whose calibration's tuning images are read (its provenance's tuning cut)")
    p.add_argument("--surrogate", default=None, help="surrogate ONNX (default: the bundle's)")
    p.add_argument("--tune", type=int, default=None,
                   help="how many images tuned (default: the bundle's num_tuning; a bundle with a seeded cut "
                        "takes only that)")


def bundle_tuning_positions(args, num_images: int) -> tuple[str, np.ndarray, str]:
    """(surrogate path, sorted positions among the ``num_images`` labelled calibration images of ``--counts`` of the
    images the calibration of ``args.bundle`` tuned on, words for the cut). calibration.conformal_fit names them from
    the provenance: the first ``--tune`` for a bundle fitted before the seeded cut (the shipped one, as these benches
    always took them), else the recorded seeded subset, which names images only among the counts the calibration
    was fitted on and only for its own num_tuning (ValueError otherwise)."""
    bundle = load_bundle(args.bundle, check_models=False)
    cal, record = bundle.manifest.calibration, calibration_record(bundle.manifest.provenance)
    tune = cal.num_tuning if args.tune is None else args.tune
    if "tuning_cut" in record and (tune, num_images) != (cal.num_tuning, cal.num_tuning + cal.num_calibration):
        raise ValueError(f"{args.bundle} tuned on a seeded {cal.num_tuning} of {cal.num_tuning + cal.num_calibration} "
                         f"labelled images; got --tune {tune} and {num_images} counted images: pass the counts it was "
                         f"(re)calibrated from and --tune {cal.num_tuning}")
    words = "a seeded random" if "tuning_cut" in record else "the first"
    return args.surrogate or str(bundle.path("surrogate")), tuning_positions(num_images, tune, record), words


def bundle_flag(args) -> str:
    """`` --bundle DIR`` for a written command line, where it is not the default bundle."""
    return "" if Path(args.bundle).resolve() == DEFAULT_BUNDLE_DIR else f" --bundle {args.bundle}"


def tuning_fold_radius(g, hits, correct, num_samples: int, sigma: float, *, repeats: int, **options) -> dict:
    """Per level of LEVELS, the mean certified radius (0 for wrong or abstained) on the held-out half of each of
    ``repeats`` seeded 2-fold splits of tuning images (log-odds ``g``, label ``hits``, class ``correct``): maps, bins
    and quantiles fitted on one half (``options``: fit_calibration's knobs), radii scored on the other."""
    results: dict[float, list[float]] = {}
    for rep in range(repeats):
        perm = np.random.default_rng(rep).permutation(len(g))
        fit, held = perm[: len(g) // 2], perm[len(g) // 2:]
        block = fit_calibration(g[fit], hits[fit], g[held], hits[held], num_samples, levels=LEVELS, **options)
        for lv in block["levels"]:
            _, r = conformal_certificate(g[held], sigma, **ConformalLevel(**lv).as_arguments())
            results.setdefault(lv["alpha"], []).append(float(np.mean(np.where(correct[held], r, 0))))
    return results


if __name__ == "__main__":
    raise SystemExit(main())
