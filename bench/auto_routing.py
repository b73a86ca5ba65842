"""Tuning ``auto``'s routing threshold (models.defaults.AUTO_MIN_SURROGATE_Z) on held-out images.

``auto`` answers with the surrogate where its calibrated radius is >= z * sigma, else runs the per-input path (the
e-process targeting the surrogate's proposed radius, stopped by PER_INPUT_MIN_GAIN). z = 0 is "the surrogate whenever
it certifies". A larger z sends the images the surrogate certifies only weakly to the per-input path, which spends a
few hundred samples to certify them better; the threshold trades mean radius for mean samples.

Data: the calibration's TUNING images (the ``num_tuning`` images of the bundle's calibration split that
calibration.conformal_fit.tuning_positions names: the first ones for the shipped bundle, fitted before the seeded
cut; disjoint from the conformal calibration images and from the test set), with
their 10^4-sample class counts (``certserve calibrate counts --split calibration``, the counts the bundle was
recalibrated from). Ordered streams from counts: given the class counts of n i.i.d. noisy predictions, every ordering
of them is equally likely, so a uniformly random permutation of the counted predictions has exactly the distribution
of the ordered i.i.d. stream; the per-input replay reads its first AUTO_MAX_SAMPLES.

Rule: among thresholds whose auto route spends <= 150 mean samples (issue 9's auto budget), the z maximizing
mean radius - PER_INPUT_MIN_GAIN x mean samples (the per-input path's own exchange rate of radius for samples).
Radii count 0 for a wrong class. Reference: the clean-class fixed-n Clopper-Pearson bound at all 10^4 samples.

Run: ``python -m bench.auto_routing --counts runs/fmnist-sigma0.25/counts-calibration-10k-8000`` (a few seconds);
writes docs/auto-routing.md.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np

from calibration.evaluate import replay_per_input
from models.defaults import AUTO_MAX_SAMPLES, AUTO_MIN_SURROGATE_Z
from models.surrogate import auto_uses_surrogate, surrogate_answers
from smoothing import PER_INPUT_MIN_GAIN, fixed_n_certificate, proposal_radius

THRESHOLDS = (0.0, 0.4, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4)  # in sigmas
MAX_MEAN_SAMPLES = 150.0


def load_tuning(bundle_dir: str, counts_dir: str):
    """(bundle, tuning images, labels, 10^4-sample counts (N, K), samples per image) after checking that the counts
    belong to this bundle's base model and its calibration split (calibration.counts.labelled_calibration_images)."""
    from calibration.counts import labelled_calibration_images
    from models.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    rec = m.provenance.get("recalibration", {}).get("splits") or m.provenance["splits"]
    lab = labelled_calibration_images(counts_dir, m.provenance.get("dataset", "fashion-mnist"),
                                      calibration_size=rec["calibration"], surrogate_size=rec["surrogate_train"],
                                      split_seed=rec["seed"], model_sha256=bundle.model_sha256)
    from calibration.conformal_fit import calibration_record, tuning_positions

    cal = m.calibration
    if len(lab.images) != cal.num_tuning + cal.num_calibration:
        raise ValueError(f"{counts_dir} counted {len(lab.images)} images; the bundle's calibration was fitted on "
                         f"{cal.num_tuning + cal.num_calibration}: pass the counts it was (re)calibrated from")
    tune = tuning_positions(len(lab.images), cal.num_tuning, calibration_record(m.provenance))
    return bundle, lab.images[tune], lab.labels[tune], lab.counts[tune], lab.meta["num_samples"]


def ordered_hits(counts: np.ndarray, tested: np.ndarray, length: int, rng) -> np.ndarray:
    """(N, length) cumulative hits of the tested class in a uniformly random ordering of each image's counted
    predictions (exactly the law of the ordered i.i.d. stream, see the module docstring)."""
    out = np.empty((len(counts), length), dtype=np.int64)
    for i, (row, c) in enumerate(zip(counts, tested)):
        preds = np.repeat(np.arange(len(row)), row)
        out[i] = np.cumsum(rng.permutation(preds)[:length] == c)
    return out


def routes(bundle, x, y, counts, num_samples: int, *, alpha: float, seed: int) -> dict:
    """Per image: the surrogate's certified radius (credited if its class is right), the per-input path's radius and
    samples, and the fixed-n reference; everything from clean forward passes plus the (permuted) counts."""
    from models.priors import class_and_prior, softmax

    m = bundle.manifest
    base, sur, meta = (bundle.backend(r, device="cpu") for r in ("base", "surrogate", "meta"))
    logits = sur.forward(x)
    tested, prior = class_and_prior(base, sur, meta, x, softmax(logits))
    ans = surrogate_answers(logits, m.calibration, m.sigma, alpha)
    hits = ordered_hits(counts, tested, AUTO_MAX_SAMPLES, np.random.default_rng(seed))
    used, radius = replay_per_input(hits, prior, np.asarray(proposal_radius(ans.z_hat, sigma=m.sigma)), alpha,
                                    m.sigma, AUTO_MAX_SAMPLES)
    k_c = counts[np.arange(len(counts)), tested]
    reference = np.asarray(fixed_n_certificate(k_c, num_samples, alpha, m.sigma)[1])
    return {"surrogate_radius": ans.radius, "surrogate": np.where(ans.class_index == y, ans.radius, 0.0),
            "per_input": np.where(tested == y, radius, 0.0), "used": used.astype(np.float64),
            "reference": np.where(tested == y, reference, 0.0), "sigma": m.sigma, "level": ans.level}


def sweep(r: dict) -> list[dict]:
    """Mean radius, mean samples and certified accuracy of auto at every threshold of THRESHOLDS."""
    rows = []
    for z in THRESHOLDS:
        use = auto_uses_surrogate(r["surrogate_radius"], r["sigma"], z)
        radius, used = np.where(use, r["surrogate"], r["per_input"]), np.where(use, 0.0, r["used"])
        rows.append({"z": z, "surrogate_share": float(use.mean()), "radius": float(radius.mean()),
                     "samples": float(used.mean()), "acc0": float(np.mean(radius > 0)),
                     "acc05": float(np.mean(radius >= 0.5)),
                     "objective": float(radius.mean() - PER_INPUT_MIN_GAIN * used.mean())})
    return rows


def choose(rows: list[dict]) -> dict:
    return max((r for r in rows if r["samples"] <= MAX_MEAN_SAMPLES), key=lambda r: r["objective"])


def report(rows: list[dict], chosen: dict, r: dict, args, seconds: float) -> str:
    ref = float(r["reference"].mean())
    lines = [
        "# Auto routing: when the surrogate answers", "",
        f"Generated {datetime.date.today()} by `python -m bench.auto_routing --counts {args.counts}` "
        f"({seconds:.0f} s). See the module docstring for the data and the rule.", "",
        f"{len(r['used'])} tuning images of the bundle's calibration split (disjoint from the conformal calibration "
        f"images and the test set), alpha = {args.alpha} (surrogate level {r['level']}), per-input budget "
        f"{AUTO_MAX_SAMPLES}, lambda = {PER_INPUT_MIN_GAIN:g}. Reference: the clean-class fixed-n Clopper-Pearson "
        f"radius at all 10^4 samples, mean {ref:.4f}. Per-input path alone: mean radius "
        f"{r['per_input'].mean():.4f} at {r['used'].mean():.1f} samples; surrogate alone: {r['surrogate'].mean():.4f}.",
        "", "| z (sigmas) | radius threshold | surrogate share | mean radius | x reference | mean samples | "
        "cert. acc r=0 | r=0.5 | radius - lambda x samples |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        mark = " **chosen**" if row is chosen else ""
        lines.append(f"| {row['z']:g}{mark} | {row['z'] * r['sigma']:.3f} | {row['surrogate_share']:.3f} | "
                     f"{row['radius']:.4f} | {row['radius'] / ref:.2f} | {row['samples']:.1f} | {row['acc0']:.3f} | "
                     f"{row['acc05']:.3f} | {row['objective']:.4f} |")
    lines += ["", f"Chosen: AUTO_MIN_SURROGATE_Z = {chosen['z']:g} (in models.defaults: {AUTO_MIN_SURROGATE_Z:g}; "
              f"the server's `CERTSERVE_AUTO_MIN_SURROGATE_Z`). Auto then answers {chosen['surrogate_share']:.0%} "
              "of these images with the surrogate (0 samples) and the rest with the per-input path.", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="models/bundles/fmnist-sigma0.25")
    p.add_argument("--counts", required=True, help="count shards of the calibration split (10^4 samples each)")
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--seed", type=int, default=0, help="seed of the stream orderings")
    p.add_argument("--out", default="docs/auto-routing.md")
    args = p.parse_args()
    t0 = time.perf_counter()
    bundle, x, y, counts, num_samples = load_tuning(args.bundle, args.counts)
    r = routes(bundle, x, y, counts, num_samples, alpha=args.alpha, seed=args.seed)
    rows = sweep(r)
    chosen = choose(rows)
    text = report(rows, chosen, r, args, time.perf_counter() - t0)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
